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

    t_plain = timed(plain)
    t_zero = timed(zero_neurons)
    t_heads = timed(mean_heads)
    print(f"  plain {t_plain * 1e3:.0f} ms; zero 64 neurons x 30 layers: {t_zero / t_plain:.3f}x; "
          f"mean-ablate a head x 30 layers: {t_heads / t_plain:.3f}x")
    try:
        from nnsight import LanguageModel
    except ImportError:
        print("  nnsight not installed: no peer comparison")
        return
    lm = LanguageModel(model, tokenizer=tok)
    idx = torch.tensor(NEURONS)

    def nnsight_zero():
        with torch.inference_mode():
            with lm.trace(ids):
                for l in range(30):
                    lm.model.layers[l].mlp.down_proj.input[..., idx] = 0
                out = lm.lm_head.output.save()
            return out

    t_nn = timed(nnsight_zero)
    same = torch.equal(zero_neurons(), nnsight_zero())
    print(f"  nnsight zero ablation: {t_nn / t_plain:.3f}x plain ({t_nn / t_zero:.2f}x actscope's time); "
          f"identical logits: {same}")


if __name__ == "__main__":
    main()
