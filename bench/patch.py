"""Benchmark: a full activation-patching sweep (all 30 layers x all positions of resid_pre).

    python bench/patch.py          # needs the bench extra for the peers

On the default model with a ~16-token prompt pair, it times, in one run:
- actscope fast sweep (KV-cache reuse + one batched forward per position);
- actscope naive loop (one forward per cell);
- nnsight naive loop (one trace per cell, setting the layer input);
- transformer-lens TransformerBridge naive loop (run_with_hooks per cell);
and checks that all results agree with the fast sweep.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import torch

import actscope

CLEAN = "In the summer of that year the famous painter moved from France to the capital city of"
CORRUPT = "In the summer of that year the famous painter moved from Italy to the capital city of"


def main() -> None:
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")
    model, tok = actscope.load_model("default")
    clean_ids = tok(CLEAN, return_tensors="pt").input_ids
    corrupt_ids = tok(CORRUPT, return_tensors="pt").input_ids
    T = corrupt_ids.shape[1]
    assert clean_ids.shape[1] == T
    target, foil = tok(" Paris", add_special_tokens=False).input_ids[0], tok(" Rome", add_special_tokens=False).input_ids[0]
    metric = lambda logits: logits[:, target] - logits[:, foil]  # noqa: E731
    print(f"prompt: {T} tokens, 30 layers -> {30 * T} cells")
    results, times = {}, {}

    t0 = time.perf_counter()
    fast = actscope.patch(model, tok, CLEAN, CORRUPT, metric=metric)
    times["actscope fast sweep"] = time.perf_counter() - t0
    results["actscope fast sweep"] = fast.patched
    t0 = time.perf_counter()
    results["actscope naive loop"] = actscope.patch(model, tok, CLEAN, CORRUPT, metric=metric, method="naive").patched
    times["actscope naive loop"] = time.perf_counter() - t0

    try:
        from nnsight import LanguageModel
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:
        LanguageModel = None
        print("peers not installed (pip install -e '.[bench]')")
    if LanguageModel is not None:
        lm = LanguageModel(model, tokenizer=tok)
        with torch.inference_mode():
            clean_h = []  # filled inside the trace: nnsight hands back only saved values
            with lm.trace(clean_ids):
                for l in range(30):
                    clean_h.append(lm.model.layers[l].input.save())
            out = torch.empty(30, T)
            t0 = time.perf_counter()
            for l in range(30):
                for p in range(T):
                    with lm.trace(corrupt_ids):
                        lm.model.layers[l].input[:, p] = clean_h[l][:, p]
                        logits = lm.lm_head.output[:, -1].save()
                    out[l, p] = metric(logits)[0]
            times["nnsight naive loop"] = time.perf_counter() - t0
            results["nnsight naive loop"] = out

        from actscope.models import resolve_spec

        eager, _ = actscope.load_model("default", attn_implementation="eager")
        bridge = TransformerBridge.boot_transformers(resolve_spec("default")[1], hf_model=eager, tokenizer=tok, device="cpu")
        with torch.inference_mode():
            _, cache = bridge.run_with_cache(clean_ids, names_filter=lambda n: n.endswith("hook_resid_pre"))
            out = torch.empty(30, T)
            t0 = time.perf_counter()
            for l in range(30):
                for p in range(T):
                    def hook(x, hook, l=l, p=p):
                        x = x.clone()
                        x[:, p] = cache[f"blocks.{l}.hook_resid_pre"][:, p]
                        return x

                    logits = bridge.run_with_hooks(corrupt_ids, fwd_hooks=[(f"blocks.{l}.hook_resid_pre", hook)])
                    out[l, p] = metric(logits[:, -1])[0]
            times["tl-bridge naive loop"] = time.perf_counter() - t0
            results["tl-bridge naive loop (eager attention)"] = out
            times["tl-bridge naive loop (eager attention)"] = times.pop("tl-bridge naive loop")

    ref = results["actscope fast sweep"]
    peers = [k for k in times if not k.startswith("actscope")]
    fastest_peer = min((times[k] for k in peers), default=None)
    print("| method | seconds | speed-up of the fast sweep | max abs diff vs fast sweep |")
    print("|---|---|---|---|")
    rows = {}
    for name, seconds in times.items():
        diff = float((results[name] - ref).abs().max())
        rows[name] = {"seconds": seconds, "max_abs_diff": diff}
        print(f"| {name} | {seconds:.2f} | {seconds / times['actscope fast sweep']:.1f}x | {diff:.2e} |")
    if fastest_peer:
        print(f"fast sweep vs fastest peer: {fastest_peer / times['actscope fast sweep']:.1f}x")
    Path("bench/out").mkdir(parents=True, exist_ok=True)
    Path("bench/out/patch.json").write_text(json.dumps({"tokens": T, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
