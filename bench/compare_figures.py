"""The README's Compare figures, on the default model (uses the store that bench/compare.py records).

    python bench/compare_figures.py      # -> docs/img/compare/*.png|svg and the numbers quoted
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

import actscope
from actscope.compare import encode_layers, pool_features, probe_layers, stream_cka, synthetic_fmri, tr_units
from actscope.compare.probe_layers import Labels

STORE = "bench/out/compare-store"
IMG = Path("docs/img/compare")


def main() -> None:
    IMG.mkdir(parents=True, exist_ok=True)
    store = actscope.open_store(STORE)
    sites = [f"blocks.{i}.hook_resid_post" for i in range(30)]
    # 1. layer x layer CKA, plain and guarded, on the first 4,096 tokens
    cka = stream_cka(store, sites, max_tokens=4096, guard=True)
    cka.save("bench/out/compare-cka")
    for name in ("cka.png", "cka_guarded.png"):
        (IMG / name).write_bytes(Path("bench/out/compare-cka", name).read_bytes())
    print("flagged:", {s: cka.outliers[s]["dims"] for s in cka.flagged[:3]}, len(cka.flagged), "sites")
    print("CKA(layer 5, layer 25): plain %.3f guarded %.3f" % (cka.matrix[5, 25], cka.guarded.matrix[5, 25]))
    print("mean off-diagonal: plain %.3f guarded %.3f" % (
        cka.matrix[~np.eye(30, dtype=bool)].mean(), cka.guarded.matrix[~np.eye(30, dtype=bool)].mean()))
    # 2. probe: is the current token inside an open parenthesis? That needs the context (the
    #    tokens since the last "(" or ")"), so the current token alone should not give it away.
    tok = actscope.load_model("default")[1]
    ids = store.token_ids().reshape(-1).numpy()[:8192]
    pieces = tok.convert_ids_to_tokens(ids.tolist())
    inside = np.zeros(len(ids), dtype=int)
    depth = 0
    for i, piece in enumerate(pieces):
        if i % store.seq_len == 0:
            depth = 0  # the model sees one sequence at a time
        inside[i] = depth > 0  # open before this token
        depth = max(0, depth + piece.count("(") - piece.count(")"))
    rows = np.array([i for i in range(8192) if i % store.seq_len >= 8])  # some context first
    # balance the classes (every inside token, as many outside ones drawn at random), so that
    # chance is 0.5 and the control task cannot score by predicting the majority class
    pos, neg = rows[inside[rows] == 1], rows[inside[rows] == 0]
    neg = np.random.default_rng(0).choice(neg, size=len(pos), replace=False)
    rows = np.sort(np.concatenate([pos, neg]))
    print(f"probe rows: {len(rows)} ({len(pos)} inside parentheses, {len(neg)} outside)")
    lab = Labels(inside[rows], rows=rows, types=ids[rows])
    every3 = sites[::3]
    probe = probe_layers(store, every3, lab, C=0.1)
    probe.save("bench/out/compare-probe")
    (IMG / "probe.svg").write_text(Path("bench/out/compare-probe/probe.svg").read_text())
    print("probe accuracy:", dict(zip([s.split(".")[1] for s in every3], np.round(probe.accuracy, 3))))
    print("selectivity:", np.round(probe.selectivity, 3).tolist(), "majority", round(probe.chance, 3))
    # 3. encoding on synthetic fMRI planted on layer 20 (16 tokens per 2 s TR)
    units = tr_units(store.num_tokens, 16)
    pooled = {s: pool_features(store, s, units) for s in every3}
    sim = synthetic_fmri(pooled["blocks.21.hook_resid_post"], 200, ceiling=(0.3, 0.8), n_repeats=4, seed=0)
    enc = encode_layers(store, every3, sim.responses, tokens_per_tr=16, delays=range(0, 9),
                        alphas=np.logspace(0, 8, 9), ceiling=sim.ceiling, pooled=pooled)
    enc.save("bench/out/compare-encode")
    (IMG / "encoding.svg").write_text(Path("bench/out/compare-encode/encoding.svg").read_text())
    print("encoding mean r:", dict(zip([s.split(".")[1] for s in every3], np.round(enc.mean_r, 3))),
          "ceiling", round(float(sim.ceiling.mean()), 3), "best", enc.best_site)


if __name__ == "__main__":
    main()
