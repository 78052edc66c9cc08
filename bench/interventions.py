"""Benchmark: attribution patching, subspace patching and ablation on the default model.

    python bench/interventions.py     # nnsight (bench extra) adds the ablation comparison

In one run, on the France/Italy prompt pair of bench/patch.py:
- attribution patching (2 forward + 1 backward) against real patching (fast sweep) of
  resid_pre, attn_out and mlp_out: time ratio and Pearson r per site family;
- subspace patching of one direction at blocks.6.hook_resid_pre against patching the whole
  site, with the null-space share of a random direction;
- ablation overhead: zero-ablating 64 neurons in every layer's MLP, and mean-ablating head 3
  in every layer, as a ratio of plain forward time; with nnsight, the same zero ablation and
  a check that both give identical logits.
"""

from __future__ import annotations

import statistics
import time
import warnings
import torch

import actscope

CLEAN = "In the summer of that year the famous painter moved from France to the capital city of"
CORRUPT = "In the summer of that year the famous painter moved from Italy to the capital city of"
NEURONS = list(range(0, 1536, 24))  # 64 neurons per layer


def timed(fn, repeat: int = 5) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")
    model, tok = actscope.load_model("default")
    kw = dict(metric="logit_diff", target=" Paris", foil=" Rome")

    print("attribution patching vs real patching (fast sweep)")
    for family in ("resid_pre", "attn_out", "mlp_out"):
        t0 = time.perf_counter()
        est = actscope.attribution_patch(model, tok, CLEAN, CORRUPT, sites=family, check=False, **kw)
        t_attr = time.perf_counter() - t0
        t0 = time.perf_counter()
        real = actscope.patch(model, tok, CLEAN, CORRUPT, sites=family, **kw)
        t_real = time.perf_counter() - t0
        a, b = est.estimate.effect.flatten().double(), real.effect.flatten().double()
        r = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
        print(f"  {family:>9}: attribution {t_attr:.2f}s, real sweep {t_real:.2f}s "
              f"({t_real / t_attr:.0f}x slower), Pearson r = {r:.3f}")

    print("subspace patching (blocks.6.hook_resid_pre)")
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(576, 1, generator=g)
    t_sub = timed(lambda: actscope.subspace_patch(model, tok, CLEAN, CORRUPT, "blocks.6.hook_resid_pre",
                                                  direction, **kw), 3)
    full = torch.eye(576)
    t_full = timed(lambda: actscope.subspace_patch(model, tok, CLEAN, CORRUPT, "blocks.6.hook_resid_pre",
                                                   full, **kw), 3)
    res = actscope.subspace_patch(model, tok, CLEAN, CORRUPT, "blocks.6.hook_resid_pre", direction, **kw)
    print(f"  rank-1: {t_sub:.2f}s, whole site: {t_full:.2f}s; effect of a random direction "
          f"{res['effect']:.3f}, its null-space share {res['null_fraction'][0]:.3f}")

    print("ablation overhead (one forward of 128 tokens)")
    ids = tok(" ".join([CLEAN] * 8), return_tensors="pt").input_ids[:, :128]
    means = torch.zeros(9, 64)

    def plain():
        with torch.inference_mode():
            return model(ids).logits

    def zero_neurons():
        with torch.inference_mode(), actscope.ablate(model, "blocks.*.mlp.hook_post", units=NEURONS):
            return model(ids).logits

    def mean_heads():
        with torch.inference_mode(), actscope.ablate(model, "blocks.*.attn.hook_z", units=[3], mode="mean",
                                                     values=means):
            return model(ids).logits

    try:
        from nnsight import LanguageModel
    except ImportError:
        LanguageModel = None
        print("  nnsight not installed: no peer comparison")
    fns = {"plain": plain, "zero": zero_neurons, "heads": mean_heads}
    if LanguageModel is not None:
        lm = LanguageModel(model, tokenizer=tok)
        idx = torch.tensor(NEURONS)

        def nnsight_zero():
            with torch.inference_mode():
                with lm.trace(ids):
                    for l in range(30):
                        lm.model.layers[l].mlp.down_proj.input[..., idx] = 0
                    out = lm.lm_head.output.save()
                return out

        fns["nnsight"] = nnsight_zero
    # interleaved rounds, ratios within a round, median over rounds: drift on these machines is
    # larger than the differences being measured
    ratios: dict[str, list[float]] = {k: [] for k in fns if k != "plain"}
    for f in fns.values():
        f()
    for _ in range(9):
        times = {k: timed(f, 2) for k, f in fns.items()}
        for k in ratios:
            ratios[k].append(times[k] / times["plain"])
    med = {k: statistics.median(v) for k, v in ratios.items()}
    print(f"  median of 9 interleaved rounds: zero 64 neurons x 30 layers: {med['zero']:.3f}x plain; "
          f"mean-ablate a head x 30 layers: {med['heads']:.3f}x plain")
    if "nnsight" in med:
        same = torch.equal(zero_neurons(), fns["nnsight"]())
        print(f"  nnsight zero ablation: {med['nnsight']:.3f}x plain ({med['nnsight'] / med['zero']:.2f}x actscope's "
              f"time); identical logits: {same}")


if __name__ == "__main__":
    main()
