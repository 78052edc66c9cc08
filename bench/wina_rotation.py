"""Why WINA and TEAL tie on the default model, and what WINA's orthogonalising transform does.

    python bench/wina_rotation.py

Part 1: at 50% sparsity, the relative output error ``||W (x - x_kept)||^2 / ||W x||^2`` of every
sparsified linear on held-out text, for TEAL's and WINA's thresholds (each linear on its own,
dense input). WINA's ranking ``|x_i| * ||W[:, i]||`` only differs from TEAL's ``|x_i|`` where
column norms differ, so the script also prints their spread per projection.

Part 2: WINA's guarantee assumes column-orthogonal weights, which the paper obtains by a
transform of the model. Here it is done exactly (computational invariance, as in SliceGPT): the
RMSNorm gains are folded into the following linears, and the residual stream is rotated by one
orthogonal ``Q`` (embeddings, every reading and writing projection, the LM head). ``gram``
takes ``Q`` from the eigenvectors of the summed Gram matrices ``sum W^T W`` of all
residual-reading projections, so that their stacked columns become orthogonal; ``pca`` takes the
principal axes of the residual inputs instead. Then both methods are calibrated and scored on
the rotated model. Same data as bench/sparsify.py: 4k calibration tokens, 4k held-out.
"""

from __future__ import annotations

import collections
import copy
import warnings

import torch
import torch.nn.functional as F

import actscope
from actscope.data import TokenBatches, load_tokens
from actscope.sparsify import calibrate, perplexity
from actscope.sparsify.kernel import mask


def reading_groups(model):
    """(RMSNorm, the projections reading its output) per sub-layer."""
    for layer in model.model.layers:
        a, f = layer.self_attn, layer.mlp
        yield layer.input_layernorm, [a.q_proj, a.k_proj, a.v_proj]
        yield layer.post_attention_layernorm, [f.gate_proj, f.up_proj]


@torch.no_grad()
def rotate(model, q: torch.Tensor) -> None:
    """Rotate a Llama-family model's residual stream by ``q``: same function, new basis."""
    inner = model.model
    if model.lm_head.weight is inner.embed_tokens.weight:  # folding the final norm unties them
        model.lm_head.weight = torch.nn.Parameter(inner.embed_tokens.weight.detach().clone())
    emb = inner.embed_tokens.weight
    emb.copy_((emb.double() @ q).to(emb.dtype))

    def fold(norm, linears):
        g = norm.weight.double()
        for lin in linears:
            lin.weight.copy_(((lin.weight.double() * g) @ q).to(lin.weight.dtype))
        norm.weight.fill_(1.0)

    for norm, linears in reading_groups(model):
        fold(norm, linears)
    for layer in inner.layers:
        for lin in (layer.self_attn.o_proj, layer.mlp.down_proj):
            lin.weight.copy_((q.T @ lin.weight.double()).to(lin.weight.dtype))
            if lin.bias is not None:
                lin.bias.copy_((lin.bias.double() @ q).to(lin.bias.dtype))
    fold(inner.norm, [model.lm_head])


def gram_rotation(model) -> torch.Tensor:
    d = model.config.hidden_size
    m = torch.zeros(d, d, dtype=torch.float64)
    for norm, linears in reading_groups(model):
        for lin in linears:
            w = lin.weight.double() * norm.weight.double()
            m += w.T @ w / (w ** 2).sum()
    return torch.linalg.eigh(m).eigenvectors


@torch.no_grad()
def pca_rotation(model, ids: torch.Tensor) -> torch.Tensor:
    d = model.config.hidden_size
    cov = torch.zeros(d, d, dtype=torch.float64)

    def hook(mod, inp, out):
        x = inp[0].reshape(-1, d).double()
        cov.add_(x.T @ x)

    hooks = [norm.register_forward_hook(hook) for norm, _ in reading_groups(model)]
    for i in range(0, ids.shape[0], 4):
        model(input_ids=ids[i:i + 4])
    for h in hooks:
        h.remove()
    return torch.linalg.eigh(cov).eigenvectors


@torch.no_grad()
def output_errors(model, cal: TokenBatches, held: torch.Tensor) -> None:
    cfgs = {m: calibrate(model, method=m, sparsity=0.5, tokens=cal, progress=False) for m in ("teal", "wina")}
    mods = dict(model.named_modules())
    err = {m: collections.defaultdict(float) for m in cfgs}
    ref: dict[str, float] = collections.defaultdict(float)

    def hook(name):
        def on(mod, inp, out):
            x = inp[0].reshape(-1, mod.in_features).float()
            ref[name] += float((out.float() ** 2).sum())
            for m, c in cfgs.items():
                keep = mask(x, c.thresholds[name], mod.weight.float().norm(dim=0) if m == "wina" else None)
                err[m][name] += float((F.linear(x * ~keep, mod.weight.float()) ** 2).sum())
        return on

    hooks = [mods[n].register_forward_hook(hook(n)) for n in cfgs["teal"].thresholds]
    for i in range(0, held.shape[0], 4):
        model(input_ids=held[i:i + 4])
    for h in hooks:
        h.remove()
    by_kind = collections.defaultdict(list)
    for n in ref:
        by_kind[n.split(".")[-1]].append(n)
    print("| projection | column-norm spread (std/mean) | TEAL rel. error | WINA rel. error |\n|---|---|---|---|")
    for kind, names in by_kind.items():
        norms = [mods[n].weight.float().norm(dim=0) for n in names]
        cv = sum(float(c.std() / c.mean()) for c in norms) / len(norms)
        t = sum(err["teal"][n] / ref[n] for n in names) / len(names)
        w = sum(err["wina"][n] / ref[n] for n in names) / len(names)
        print(f"| {kind} | {cv:.3f} | {t:.4f} | {w:.4f} |")
    wins = sum(err["wina"][n] < err["teal"][n] for n in ref)
    print(f"WINA has the lower error in {wins} of {len(ref)} linears\n", flush=True)


def main() -> None:
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")
    base, tok = actscope.load_model("default")
    toks = load_tokens(None, tok, 256, 8192)
    cal = TokenBatches(toks.input_ids[:16], toks.doc_ids[:16], toks.source)
    held = TokenBatches(toks.input_ids[16:32], toks.doc_ids[16:32], toks.source)
    output_errors(base, cal, held.input_ids)
    x = held.input_ids[:2]
    with torch.no_grad():
        want = base(input_ids=x).logits
    print("| basis | method | 25% | 50% |\n|---|---|---|---|")
    for kind in ("original", "gram", "pca"):
        model = copy.deepcopy(base)
        if kind != "original":
            rotate(model, gram_rotation(model) if kind == "gram" else pca_rotation(model, cal.input_ids))
            with torch.no_grad():
                drift = float((model(input_ids=x).logits - want).abs().max())
            print(f"({kind}: largest logit change from the rotation alone {drift:.1e}; "
                  f"dense perplexity {perplexity(model, held)[0]:.3f})")
        for method in ("teal", "wina"):
            ppl = [perplexity(model, held, calibrate(model, method=method, sparsity=s, tokens=cal, progress=False))[0]
                   for s in (0.25, 0.5)]
            print(f"| {kind} | {method} | {ppl[0]:.2f} | {ppl[1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
