"""Benchmark: steering-vector extraction and steered generation vs the steering-vectors package.

    python bench/steer.py     # peers: pip install --no-deps steering-vectors repeng; pip install scikit-learn

Same contrastive prompt pairs, layers 8-20, difference of means at the last token, on the
default model. Reports the time of each extraction, the cosine between the vectors per layer,
and the time of 40 greedy tokens steered by each. repeng 0.4.0 (PCA of paired differences)
is compared with ``method="pca"``; it names ``np.float_``, gone in numpy 2, so the alias is
restored before importing it. Then a sentiment probe scores steered generations.
"""

from __future__ import annotations

import time
import warnings

import torch

import actscope
from actscope.intervene.steer_effects import calibrate_scale, generate

PAIRS = [
    ("I love this movie, it was", "I hate this movie, it was"),
    ("What a wonderful day, I feel", "What a terrible day, I feel"),
    ("The food was delicious and", "The food was disgusting and"),
    ("She smiled happily because", "She cried sadly because"),
    ("This is the best thing that", "This is the worst thing that"),
    ("I am so grateful for", "I am so angry about"),
    ("The party was fun and everyone", "The party was awful and everyone"),
    ("He praised the team for", "He blamed the team for"),
] * 4
LAYERS = list(range(8, 21))
PROMPT = "Today I went to the market and"


def main() -> None:
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")
    model, tok = actscope.load_model("default")
    pos, neg = [p for p, _ in PAIRS], [n for _, n in PAIRS]
    t0 = time.perf_counter()
    ours = actscope.steering_vector(model, tok, pos, neg, layers=LAYERS, batch_size=8)
    t_ours = time.perf_counter() - t0
    rows = [("actscope extraction", t_ours)]
    try:
        from steering_vectors import train_steering_vector
    except ImportError:
        train_steering_vector = None
        print("steering-vectors not installed")
    if train_steering_vector is not None:
        t0 = time.perf_counter()
        theirs = train_steering_vector(model, tok, list(PAIRS), layers=LAYERS, read_token_index=-1,
                                       show_progress=False, batch_size=8)
        rows.append(("steering-vectors extraction", time.perf_counter() - t0))
        cos = [float(torch.nn.functional.cosine_similarity(ours.directions[l], theirs.layer_activations[l].float(), dim=0))
               for l in LAYERS]
        print(f"cosine per layer (ours vs steering-vectors): min {min(cos):.6f}, max {max(cos):.6f}")
    repeng_vec = repeng_extraction(model, tok, rows)
    t0 = time.perf_counter()
    generate(model, tok, PROMPT, 40)
    rows.append(("plain generation, 40 tokens", time.perf_counter() - t0))
    t0 = time.perf_counter()
    with ours.apply(model, scale=4.0):
        steered = generate(model, tok, PROMPT, 40)
    rows.append(("actscope steered generation", time.perf_counter() - t0))
    if train_steering_vector is not None:
        t0 = time.perf_counter()
        with theirs.apply(model, multiplier=4.0):
            theirs_text = generate(model, tok, PROMPT, 40)
        rows.append(("steering-vectors steered generation", time.perf_counter() - t0))
        print(f"same steered text: {theirs_text == steered}")
    if repeng_vec is not None:
        repeng_generation(model, tok, repeng_vec, rows)
    print("| step | seconds |")
    print("|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.2f} |")
    # a readable before/after: the largest scale whose KL to the unsteered output stays <= 0.5 nats
    scale = calibrate_scale(model, tok, ours, [PROMPT, "My weekend was", "The movie made me feel"], epsilon=0.5, max_scale=4.0, steps=8)
    print(f"\nKL-bounded scale (KL <= 0.5): {scale:.3f}")
    for prompt in [PROMPT, "My weekend was", "The movie made me feel"]:
        print(f"| {prompt!r} | {generate(model, tok, prompt, 20)!r} |", end=" ")
        for sign in (1, -1):
            with ours.apply(model, scale=sign * scale):
                print(f"{generate(model, tok, prompt, 20)!r} |", end=" ")
        print()
    sentiment_shift(model, tok, ours, scale)


def repeng_extraction(model, tok, rows):
    """repeng's PCA of paired differences against ``steering_vector(method="pca")``: time and cosine."""
    import numpy as np

    if not hasattr(np, "float_"):
        np.float_ = np.float64  # repeng 0.4 still names this numpy 1 alias
    try:
        from repeng import ControlVector, DatasetEntry
    except ImportError:
        print("repeng not installed")
        return None
    data = [DatasetEntry(p, n) for p, n in PAIRS]
    t0 = time.perf_counter()
    theirs = ControlVector.train(model, tok, data, hidden_layers=LAYERS, batch_size=16, method="pca_diff")
    rows.append(("repeng extraction (pca_diff)", time.perf_counter() - t0))
    t0 = time.perf_counter()
    ours = actscope.steering_vector(model, tok, [p for p, _ in PAIRS], [n for _, n in PAIRS], layers=LAYERS,
                                    method="pca", batch_size=16)
    rows.append(("actscope extraction (pca)", time.perf_counter() - t0))
    cos = [abs(float(torch.nn.functional.cosine_similarity(ours.directions[l], torch.from_numpy(theirs.directions[l]), dim=0)))
           for l in LAYERS]  # a principal axis has no sign of its own
    print(f"|cosine| per layer (ours pca vs repeng pca_diff): min {min(cos):.6f}, max {max(cos):.6f}")
    return theirs


def repeng_generation(model, tok, theirs, rows) -> None:
    """Steered generation through repeng's ControlModel vs actscope with the same (GGUF-imported) vector."""
    import tempfile
    from pathlib import Path

    from repeng import ControlModel

    with tempfile.TemporaryDirectory() as tmp:
        theirs.export_gguf(str(Path(tmp) / "v.gguf"))
        ours = actscope.SteeringVector.from_gguf(Path(tmp) / "v.gguf")
    with ours.apply(model, scale=4.0):
        t0 = time.perf_counter()
        ours_text = generate(model, tok, PROMPT, 40)
        rows.append(("actscope steered generation, repeng's vector", time.perf_counter() - t0))
    wrapped = ControlModel(model, LAYERS)  # repeng wraps the layers in place; reset and unwrap after
    try:
        wrapped.set_control(theirs, 4.0)
        t0 = time.perf_counter()
        theirs_text = generate(model, tok, PROMPT, 40)
        rows.append(("repeng steered generation", time.perf_counter() - t0))
    finally:
        wrapped.reset()
        wrapped.unwrap()
    print(f"same steered text as repeng: {ours_text == theirs_text}")


NEUTRAL = [
    "Today I went to the market and", "My weekend was", "The movie made me feel",
    "When I opened the letter,", "The weather this morning", "After the meeting, my boss",
    "The new restaurant on our street", "Last summer we travelled to", "My neighbour told me that",
    "The book I am reading is", "At the end of the day, I", "The train was late, so",
]


def sentiment_shift(model, tok, vec, scale: float, n_tokens: int = 30) -> None:
    """Steer greedy continuations of neutral prompts both ways; score them with a probe."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from sentiment import SentimentProbe, word_balance

    probe = SentimentProbe(model, tok)
    print(f"\nsentiment probe: held-out accuracy {probe.heldout_accuracy:.2f} on 40 labelled sentences")
    texts = {"unsteered": [generate(model, tok, p, n_tokens) for p in NEUTRAL]}
    for sign, name in ((1, f"steered +{scale:.2f}"), (-1, f"steered -{scale:.2f}")):
        with vec.apply(model, scale=sign * scale):
            texts[name] = [generate(model, tok, p, n_tokens) for p in NEUTRAL]
    print("| generations | mean P(positive) (probe) | texts judged positive | word balance (per 100 words) |")
    print("|---|---|---|---|")
    for name, outs in texts.items():
        full = [p + t for p, t in zip(NEUTRAL, outs)]
        p_pos = probe.score(full)
        bal = sum(word_balance(t) for t in outs) / len(outs)
        print(f"| {name} | {float(p_pos.mean()):.2f} | {int((p_pos > 0.5).sum())}/{len(outs)} | {100 * bal:+.1f} |")


if __name__ == "__main__":
    main()
