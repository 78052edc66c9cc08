"""Reading an SAE's latents: top contexts, density, logit effects, nearest latents, an HTML browser.

One streaming pass over a store keeps, for every latent, the ``top`` strongest activations seen
so far (a running top-k per latent: ``[d_sae, top]`` values and token indices, merged batch by
batch), so memory is bounded by ``d_sae x top`` whatever the store's size. Contexts are cut from
the store's own token ids, so no model run is needed for them.

The browser is a single HTML file with its data inlined as JSON. Dataset text is untrusted: the
JSON is escaped so that no ``</script>`` or ``<!--`` in a token can end the data block, and the
page inserts text with ``textContent`` only, never as HTML.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..store.reader import ActivationStore, open_store
from .base import SparseAutoencoder
from .data import OutlierPolicy, token_batches


def top_activations(sae: SparseAutoencoder, store: ActivationStore, *, top: int = 10, batch_size: int = 4096,
                    max_tokens: int | None = None) -> dict[str, torch.Tensor]:
    """``values``/``index`` [d_sae, top] (strongest first; index -1 where fewer fired) and
    ``fires`` per latent, over the store's tokens that the SAE's outlier policy keeps."""
    policy = OutlierPolicy.from_dict(sae.meta_.get("outliers")) if sae.meta_.get("outliers") else OutlierPolicy(max_norm_ratio=None)
    values = torch.full((sae.d_sae, top), -torch.inf)
    index = torch.full((sae.d_sae, top), -1, dtype=torch.long)
    fires = torch.zeros(sae.d_sae, dtype=torch.long)
    seen = 0
    for batch in token_batches(store, [sae.site_], batch_size, shuffle=False):
        if max_tokens is not None and seen >= max_tokens:
            break
        x = batch.rows[sae.site_]
        keep = policy.keep(x, batch.positions(store.seq_len))
        with torch.no_grad():
            z = sae.encode(x[keep].float())
        idx = batch.index[keep]
        seen += int(keep.sum())
        fires += (z > 0).sum(0)
        k = min(top, z.shape[0])
        bv, bi = z.t().topk(k, dim=1)  # [d_sae, k]
        all_v = torch.cat([values, bv], 1)
        all_i = torch.cat([index, idx[bi]], 1)
        values, order = all_v.topk(top, dim=1)
        index = all_i.gather(1, order)
    index[values <= 0] = -1
    return {"values": values.clamp_min(0), "index": index, "fires": fires, "tokens": torch.tensor(seen)}


def logit_effects(sae: SparseAutoencoder, unembed: torch.Tensor, n: int = 8) -> dict[str, torch.Tensor]:
    """Top and bottom vocabulary entries of ``W_dec @ W_U`` per latent (``unembed``: [vocab, d])."""
    effects = sae.W_dec_.float() @ unembed.float().t()
    return {"top": effects.topk(n, dim=1).indices, "bottom": (-effects).topk(n, dim=1).indices}


def nearest_latents(sae: SparseAutoencoder, n: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """For each latent, the ``n`` others with the most similar decoder rows (cosine)."""
    W = sae.W_dec_.float()
    W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    sims = W @ W.t()
    sims.fill_diagonal_(-2)
    top = sims.topk(min(n, W.shape[0] - 1), dim=1)
    return top.indices, top.values


def feature_data(sae: SparseAutoencoder, store: ActivationStore | str, *, tokenizer: Any = None, model: Any = None,
                 top: int = 10, window: int = 8, max_tokens: int | None = None) -> list[dict[str, Any]]:
    """One record per latent: density, top contexts (text around the token), nearest latents, and
    with a model, logit effects."""
    store = open_store(str(store)) if not isinstance(store, ActivationStore) else store
    acts = top_activations(sae, store, top=top, max_tokens=max_tokens)
    ids = store.token_ids()
    decode = (lambda t: tokenizer.decode([t])) if tokenizer is not None else str
    near_i, near_v = nearest_latents(sae)
    logits = None
    if model is not None and model.get_output_embeddings() is not None:
        logits = logit_effects(sae, model.get_output_embeddings().weight.detach().cpu())
    n_tok = max(int(acts["tokens"]), 1)
    records = []
    for j in range(sae.d_sae):
        contexts = []
        for v, t in zip(acts["values"][j].tolist(), acts["index"][j].tolist()):
            if t < 0:
                continue
            s, p = divmod(t, store.seq_len)
            lo = max(0, p - window)
            toks = ids[s, lo: p + 2].tolist()
            contexts.append({"value": round(v, 4), "tokens": [decode(x) for x in toks], "at": p - lo})
        rec = {"latent": j, "density": int(acts["fires"][j]) / n_tok, "contexts": contexts,
               "nearest": [[int(i), round(float(c), 3)] for i, c in zip(near_i[j], near_v[j])]}
        if logits is not None:
            rec["logits_top"] = [decode(int(t)) for t in logits["top"][j]]
            rec["logits_bottom"] = [decode(int(t)) for t in logits["bottom"][j]]
        records.append(rec)
    return records


def _safe_json(data: Any) -> str:
    """JSON that cannot close or comment out the <script> block it is inlined in."""
    return (json.dumps(data, ensure_ascii=True).replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("&", "\\u0026").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>SAE features</title>
<style>body{font:14px sans-serif;margin:1em}.lat{border-top:1px solid #ccc;padding:.4em 0}
.ctx{font-family:monospace;white-space:pre-wrap}.hot{background:#fb8;font-weight:bold}.meta{color:#666}</style>
</head><body><h1 id="title"></h1>
<input id="q" placeholder="latent number, or a token to search for" size="40"><div id="list"></div>
<script id="data" type="application/json">__DATA__</script>
<script>
const D = JSON.parse(document.getElementById("data").textContent);
document.getElementById("title").textContent = D.title;
function el(tag, cls, text){const e=document.createElement(tag); if(cls)e.className=cls; if(text!==undefined)e.textContent=text; return e;}
function show(q){
  const list=document.getElementById("list"); list.replaceChildren();
  let shown=0;
  for(const r of D.latents){
    if(q){ if(/^\\d+$/.test(q)){ if(r.latent!==+q) continue; }
      else if(!r.contexts.some(c=>c.tokens.some(t=>t.includes(q)))) continue; }
    if(shown++>=200) break;
    const box=el("div","lat"); box.appendChild(el("b",null,"latent "+r.latent));
    box.appendChild(el("span","meta"," density "+r.density.toExponential(2)+"  nearest "+r.nearest.map(n=>n[0]+" ("+n[1]+")").join(", ")));
    if(r.logits_top) box.appendChild(el("div","meta","promotes: "+r.logits_top.join(" | ")+"   suppresses: "+r.logits_bottom.join(" | ")));
    for(const c of r.contexts){ const line=el("div","ctx"); line.appendChild(el("span","meta",c.value.toFixed(3)+"  "));
      c.tokens.forEach((t,i)=>line.appendChild(el("span",i===c.at?"hot":null,t))); box.appendChild(line); }
    list.appendChild(box);
  }
}
document.getElementById("q").addEventListener("input",e=>show(e.target.value.trim()));
show("");
</script></body></html>"""


def write_browser(records: list[dict[str, Any]], path: str | Path, title: str = "SAE features") -> Path:
    """A self-contained HTML feature browser (search by latent number or token text)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(PAGE.replace("__DATA__", _safe_json({"title": title, "latents": records})), encoding="utf-8")
    return path


def write_neuronpedia(records: list[dict[str, Any]], folder: str | Path, model_id: str, layer: str,
                      per_file: int = 128) -> list[Path]:
    """``batch-{n}.json`` files in Neuronpedia's feature-upload layout: one object per latent
    with its activating contexts (tokens and per-token values, the max at the peak token)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, start in enumerate(range(0, len(records), per_file)):
        batch = []
        for r in records[start: start + per_file]:
            acts = [{"tokens": c["tokens"], "values": [c["value"] if i == c["at"] else 0.0 for i in range(len(c["tokens"]))],
                     "maxValue": c["value"], "maxValueTokenIndex": c["at"]} for c in r["contexts"]]
            batch.append({"modelId": model_id, "layer": layer, "index": str(r["latent"]),
                          "frac_nonzero": r["density"], "activations": acts,
                          "pos_str": r.get("logits_top", []), "neg_str": r.get("logits_bottom", [])})
        p = folder / f"batch-{n}.json"
        p.write_text(json.dumps(batch))
        paths.append(p)
    return paths
