"""Benchmark: actscope.compare against the reference packages, measured in one run.

    python bench/compare.py                     # everything (records a 20k-token store first)
    python bench/compare.py --layers 10         # CKA over the first 10 layers only (faster)

Each method runs in a fresh child process, so its time and peak RSS (VmHWM) are its own:
- streaming CKA: stream_cka over L x L blocks.*.hook_resid_post of a 20k-token store of the
  default model (exact, float64, one pass) vs the same values computed in memory (every site
  loaded, centred in float64, one product per pair);
- minibatch CKA: torch-cka's CKA.compare (float32, its own unbiased HSIC) vs our minibatch_cka
  (float64) on the same batches: time and largest difference;
- ridge: RidgeEncoder vs himalaya RidgeCV at RidgeCV's defaults (alphas [0.1, 1], 5 folds) and
  with test folds much larger than the rank (2 folds of 10k samples, 50 features);
- RSA at 1,000 conditions x 10,000 channels: RDMs (euclidean, correlation) and comparisons
  (spearman, tau-a) vs rsatoolbox.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

OUT = Path("bench/out")
STORE = OUT / "compare-store"


def peak_mb() -> float:
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024


def sites(layers: int) -> list[str]:
    return [f"blocks.{i}.hook_resid_post" for i in range(layers)]


def child(name: str, layers: int) -> dict:
    import torch

    torch.set_num_threads(2)
    warnings.simplefilter("ignore")
    import actscope
    from actscope.compare import RidgeEncoder, compare_rdms, minibatch_cka_matrix, rdm
    from actscope.compare.cka import _ratio

    t0 = time.perf_counter()
    out: dict = {}
    if name == "cka-stream":
        res = actscope.compare.stream_cka(str(STORE), sites(layers))
        out = {"matrix": res.matrix.tolist(), "debiased": res.debiased.tolist(), "n": res.n_tokens}
    elif name == "cka-memory":
        store = actscope.open_store(str(STORE))
        data = {}
        for s in sites(layers):
            x = store.read(s).float().numpy().astype(np.float64)
            data[s] = x - x.mean(0)
        norms = {s: float(np.sum((x.T @ x) ** 2)) for s, x in data.items()}
        m = np.eye(layers)
        for i, a in enumerate(sites(layers)):
            for j in range(i + 1, layers):
                b = sites(layers)[j]
                m[i, j] = m[j, i] = _ratio(float(np.sum((data[a].T @ data[b]) ** 2)), norms[a], norms[b])
        out = {"matrix": m.tolist()}
    elif name in ("mb-ours", "mb-torchcka"):
        store = actscope.open_store(str(STORE))
        names = sites(layers)
        feats = torch.stack([store.read(s, 0, 256 * 20).float() for s in names], 1)  # [tokens, L, d]
        batches = [feats[i:i + 256] for i in range(0, len(feats), 256)]
        if name == "mb-ours":
            per_site = [[b[:, i] for i in range(layers)] for b in batches]
            m = minibatch_cka_matrix((xs, xs) for xs in per_site)
        else:
            from torch_cka import CKA

            class Pick(torch.nn.Module):
                def __init__(self, i):
                    super().__init__()
                    self.i = i

                def forward(self, x):
                    return x[:, self.i]

            class Layers(torch.nn.Module):
                def __init__(self):
                    super().__init__()
                    self.picks = torch.nn.ModuleList(Pick(i) for i in range(layers))

                def forward(self, x):
                    return [p(x) for p in self.picks]

            loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(feats), batch_size=256)
            names_ = [f"picks.{i}" for i in range(layers)]
            cka = CKA(Layers(), Layers(), "a", "b", names_, names_)
            cka.compare(loader)
            m = cka.hsic_matrix.double().numpy()
        out = {"matrix": m.tolist()}
    elif name.startswith("ridge-"):
        setting, impl = name.split("-")[1:]
        rs = np.random.RandomState(0)
        if setting == "default":
            n, p, t, alphas, cv = 2000, 200, 5000, [0.1, 1.0], 5
        else:
            n, p, t, alphas, cv = 20000, 50, 2000, list(np.logspace(-2, 5, 8)), 2
        X = rs.randn(n, p)
        Y = X @ (rs.randn(p, t) * 0.1) + rs.randn(n, t)
        t0 = time.perf_counter()
        if impl == "himalaya":
            from himalaya.ridge import RidgeCV

            est = RidgeCV(alphas=alphas, cv=cv).fit(X, Y)
        else:
            est = RidgeEncoder(alphas=alphas, cv=cv).fit(X, Y)
        out = {"alphas": np.asarray(est.best_alphas_).tolist()[:200], "coef00": float(est.coef_[0, 0])}
    elif name.startswith("rsa-"):
        impl = name.split("-")[1]
        rs = np.random.RandomState(0)
        X = rs.randn(1000, 10000)
        X2 = X + rs.randn(1000, 10000)
        t0 = time.perf_counter()
        times = {}
        if impl == "rsatoolbox":
            import rsatoolbox

            for metric in ("euclidean", "correlation"):
                s = time.perf_counter()
                a = rsatoolbox.rdm.calc_rdm(rsatoolbox.data.Dataset(X), method=metric)
                b = rsatoolbox.rdm.calc_rdm(rsatoolbox.data.Dataset(X2), method=metric)
                times[f"rdm {metric} (x2)"] = time.perf_counter() - s
            for method in ("spearman", "tau-a"):
                s = time.perf_counter()
                v = float(rsatoolbox.rdm.compare(a, b, method=method)[0, 0])
                times[f"compare {method}"] = time.perf_counter() - s
                out[method] = v
        else:
            for metric in ("euclidean", "correlation"):
                s = time.perf_counter()
                a, b = rdm(X, metric), rdm(X2, metric)
                times[f"rdm {metric} (x2)"] = time.perf_counter() - s
            for method in ("spearman", "tau-a"):
                s = time.perf_counter()
                out[method] = compare_rdms(a, b, method)
                times[f"compare {method}"] = time.perf_counter() - s
        out["times"] = times
    out.update(seconds=time.perf_counter() - t0, peak_rss_mb=peak_mb())
    return out


def run_child(name: str, layers: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", name, "--layers", str(layers)],
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ensure_store(tokens: int) -> None:
    import actscope

    if (STORE / "manifest.json").exists() and actscope.open_store(str(STORE)).num_tokens >= tokens:
        return
    model, tok = actscope.load_model("default")
    actscope.record(model, tok, str(STORE), ["blocks.*.hook_resid_post"], max_tokens=tokens, seq_len=128,
                    dtype="bfloat16", overwrite=True)


def machine() -> str:
    try:
        info = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        info = ""
    model = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("Model name")), platform.processor())
    flags = next((l for l in info.splitlines() if l.startswith("Flags")), "")
    isa = [f for f in ("avx512f", "avx2", "fma") if f" {f}" in flags]
    return f"{model}; {os.cpu_count()} CPUs; ISA: {', '.join(isa) or 'no avx2/avx512'}; numpy {np.__version__}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--tokens", type=int, default=20_000)
    ap.add_argument("--only", default="cka,mb,ridge,rsa")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.layers)))
        return
    OUT.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}")
    only = set(args.only.split(","))
    report: dict = {"machine": machine(), "date": time.strftime("%Y-%m-%d")}
    if only & {"cka", "mb"}:
        ensure_store(args.tokens)
    if "cka" in only:
        s, m = run_child("cka-stream", args.layers), run_child("cka-memory", args.layers)
        diff = float(np.abs(np.array(s["matrix"]) - np.array(m["matrix"])).max())
        print(f"CKA {args.layers}x{args.layers} over {s['n']} tokens: streaming {s['seconds']:.1f} s "
              f"{s['peak_rss_mb']:.0f} MB | in memory {m['seconds']:.1f} s {m['peak_rss_mb']:.0f} MB | "
              f"time ratio {m['seconds'] / s['seconds']:.2f}x, memory ratio {m['peak_rss_mb'] / s['peak_rss_mb']:.2f}x, "
              f"max |diff| {diff:.1e}")
        report["cka"] = {"stream": {k: s[k] for k in ("seconds", "peak_rss_mb")},
                         "memory": {k: m[k] for k in ("seconds", "peak_rss_mb")}, "max_diff": diff}
    if "mb" in only:
        k = min(args.layers, 8)
        o, t = run_child("mb-ours", k), run_child("mb-torchcka", k)
        diff = float(np.abs(np.array(o["matrix"]) - np.array(t["matrix"])).max())
        print(f"minibatch CKA {k}x{k}, 20 batches of 256: ours (float64) {o['seconds']:.2f} s | torch-cka (float32) "
              f"{t['seconds']:.2f} s | speed ratio {t['seconds'] / o['seconds']:.2f}x | max |diff| {diff:.1e}")
        report["minibatch"] = {"ours_s": o["seconds"], "torch_cka_s": t["seconds"], "max_diff": diff}
    if "ridge" in only:
        for setting in ("default", "bigtest"):
            h, o = run_child(f"ridge-{setting}-himalaya", 0), run_child(f"ridge-{setting}-ours", 0)
            same = float(np.mean(np.isclose(h["alphas"], o["alphas"], rtol=1e-9)))
            print(f"ridge {setting}: himalaya {h['seconds']:.2f} s {h['peak_rss_mb']:.0f} MB | ours {o['seconds']:.2f} s "
                  f"{o['peak_rss_mb']:.0f} MB | speed-up {h['seconds'] / o['seconds']:.2f}x | same alphas {same:.1%}")
            report[f"ridge_{setting}"] = {"himalaya": h, "ours": o}
    if "rsa" in only:
        r, o = run_child("rsa-rsatoolbox", 0), run_child("rsa-ours", 0)
        for key in r["times"]:
            print(f"RSA {key}: rsatoolbox {r['times'][key]:.2f} s | ours {o['times'][key]:.2f} s | "
                  f"speed-up {r['times'][key] / o['times'][key]:.2f}x")
        print(f"RSA peak RSS: rsatoolbox {r['peak_rss_mb']:.0f} MB | ours {o['peak_rss_mb']:.0f} MB; "
              f"spearman diff {abs(r['spearman'] - o['spearman']):.1e}, tau-a diff {abs(r['tau-a'] - o['tau-a']):.1e}")
        report["rsa"] = {"rsatoolbox": r, "ours": o}
    (OUT / "compare.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
