"""The SAE feature browser: one self-contained HTML file, its data inlined as JSON.

Dataset text is untrusted. The JSON is escaped so that no ``</script>``, ``<!--`` or ``&`` in a
token can end or comment out the data block, and the page builds every element with
``textContent``, never ``innerHTML``, so a token is always shown as text.

Token strings go into one table (``strings``) and contexts refer to them by number: thousands of
latents x tens of contexts repeat the same few thousand tokens, and the table keeps the page a
fraction of the size that inlining every string would give.

Search: a latent number, or text that one of a latent's context tokens contains. The URL's
fragment is a search too (``features.html#1234`` opens latent 1234 with its bins unfolded), which
is how a screenshot or a link shows one latent.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def safe_json(data: Any) -> str:
    """JSON that cannot close or comment out the <script> block it is inlined in."""
    return (json.dumps(data, ensure_ascii=True).replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("&", "\\u0026").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def _compact(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Records with their context tokens as numbers into one string table: ``[value, at, [ids]]``."""
    table: dict[str, int] = {}

    def ctx(c: dict[str, Any]) -> list:
        return [c["value"], c["at"], [table.setdefault(t, len(table)) for t in c["tokens"]]]

    latents = []
    for r in records:
        out = {k: v for k, v in r.items() if k not in ("contexts", "bins")}
        out["top"] = [ctx(c) for c in r["contexts"]]
        out["bins"] = [{"lo": b["lo"], "hi": b["hi"], "count": b["count"], "contexts": [ctx(c) for c in b["contexts"]]}
                       for b in r.get("bins", [])]
        latents.append(out)
    return {"strings": list(table), "latents": latents}


PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>SAE features</title>
<style>body{font:14px sans-serif;margin:1em}.lat{border-top:1px solid #ccc;padding:.4em 0}
.ctx{font-family:monospace;white-space:pre-wrap}.hot{background:#fb8;font-weight:bold}.meta{color:#666}
.bin{margin-left:1em}summary{cursor:pointer;color:#444}h2{font-size:15px;margin:.3em 0}</style>
</head><body><h1 id="title"></h1>
<input id="q" placeholder="latent number, or a token to search for" size="40"> <span id="count" class="meta"></span>
<div id="list"></div>
<script id="data" type="application/json">__DATA__</script>
<script>
const D = JSON.parse(document.getElementById("data").textContent);
const S = D.strings;
document.getElementById("title").textContent = D.title;
function el(tag, cls, text){const e=document.createElement(tag); if(cls)e.className=cls; if(text!==undefined)e.textContent=text; return e;}
function line(c){const d=el("div","ctx"); d.appendChild(el("span","meta",c[0].toFixed(3)+"  "));
  c[2].forEach((t,i)=>d.appendChild(el("span",i===c[1]?"hot":null,S[t].replace(/\\n/g,"\\u21b5")))); return d;}
function matcher(q){
  if(!q) return ()=>true;
  if(/^\\d+$/.test(q)) return r=>r.latent===+q;
  const hit=new Set(); S.forEach((s,i)=>{ if(s.includes(q)) hit.add(i); });
  const has=c=>c[2].some(t=>hit.has(t));
  return r=>r.top.some(has)||r.bins.some(b=>b.contexts.some(has));
}
function show(q){
  const list=document.getElementById("list"); list.replaceChildren();
  const keep=matcher(q), one=/^\\d+$/.test(q); let found=0;
  for(const r of D.latents){
    if(!keep(r)) continue;
    if(found++>=200) continue;
    const box=el("div","lat"); box.id="latent-"+r.latent; box.appendChild(el("b",null,"latent "+r.latent));
    box.appendChild(el("span","meta","  max "+r.max.toFixed(3)+"  density "+r.density.toExponential(2)+
      "  nearest "+r.nearest.map(n=>n[0]+" ("+n[1]+")").join(", ")));
    if(r.logits_top) box.appendChild(el("div","meta","promotes: "+r.logits_top.join(" | ")+"   suppresses: "+r.logits_bottom.join(" | ")));
    box.appendChild(el("h2",null,"top activations"));
    r.top.forEach(c=>box.appendChild(line(c)));
    for(const b of r.bins){
      const d=el("details","bin"); if(one) d.open=true;
      d.appendChild(el("summary",null,"activations "+b.lo.toFixed(2)+" to "+b.hi.toFixed(2)+" ("+b.count+" tokens, "+b.contexts.length+" sampled)"));
      b.contexts.forEach(c=>d.appendChild(line(c))); box.appendChild(d);
    }
    list.appendChild(box);
  }
  document.getElementById("count").textContent=found+" of "+D.latents.length+" latents"+(found>200?", first 200 shown":"");
}
let start=location.hash.slice(1); try{ start=decodeURIComponent(start); }catch(e){ /* a bare % stays as typed */ }
document.getElementById("q").value=start;
document.getElementById("q").addEventListener("input",e=>show(e.target.value.trim()));
show(start.trim());
</script></body></html>"""


def write_browser(records: list[dict[str, Any]], path: str | Path, title: str = "SAE features") -> Path:
    """A self-contained HTML feature browser (search by latent number or token text)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"title": title, **_compact(records)}
    path.write_text(PAGE.replace("__DATA__", safe_json(data)), encoding="utf-8")
    return path
