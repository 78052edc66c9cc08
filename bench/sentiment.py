"""A small sentiment scorer for steering experiments: a linear probe plus a word count.

The probe is a logistic regression on the *unsteered* default model's mean residual stream
(layer 24) over a text, trained on the labelled sentences below (written for this purpose,
disjoint from the steering pairs). Scoring a steered generation by re-reading it with the
unsteered model measures what the text says, not the steering vector itself. The word count
(positive minus negative words, per word) is a model-free second opinion.
"""

from __future__ import annotations

import re

import torch

import actscope

POSITIVE = [
    "The concert last night was wonderful and everyone left smiling.",
    "I am delighted with the new garden, it looks beautiful.",
    "Our trip to the coast was relaxing and full of sunshine.",
    "She was thrilled to hear the good news from her doctor.",
    "The team celebrated a great victory together.",
    "This soup is delicious, warm and comforting.",
    "He felt proud and happy after finishing the marathon.",
    "The children laughed and played joyfully in the park.",
    "What a lovely surprise, thank you so much!",
    "The service was friendly and the staff were kind.",
    "I enjoyed every page of this charming book.",
    "We had a fantastic time at the wedding.",
    "The sunrise over the hills was breathtaking.",
    "My new job is exciting and my colleagues are great.",
    "They were grateful for the generous help of their neighbours.",
    "The puppy is adorable and full of joy.",
    "It was a peaceful, pleasant afternoon by the lake.",
    "I love how bright and cheerful this room feels.",
    "The students were excited and eager to learn.",
    "Winning the prize made her incredibly happy.",
]
NEGATIVE = [
    "The concert last night was awful and everyone left angry.",
    "I am upset about the ruined garden, it looks terrible.",
    "Our trip to the coast was stressful and full of rain.",
    "She was devastated to hear the bad news from her doctor.",
    "The team suffered a painful defeat together.",
    "This soup is disgusting, cold and bland.",
    "He felt ashamed and miserable after quitting the marathon.",
    "The children cried and argued bitterly in the park.",
    "What a horrible shock, I cannot believe it.",
    "The service was rude and the staff were hostile.",
    "I hated every page of this tedious book.",
    "We had a dreadful time at the wedding.",
    "The storm over the hills was frightening.",
    "My new job is boring and my colleagues are unpleasant.",
    "They were furious about the selfish behaviour of their neighbours.",
    "The puppy is sick and whimpering in pain.",
    "It was a gloomy, depressing afternoon by the lake.",
    "I hate how dark and dreary this room feels.",
    "The students were anxious and afraid to fail.",
    "Losing the prize made her incredibly sad.",
]
POS_WORDS = set("""good great wonderful happy joy joyful love lovely beautiful delighted delicious
excellent fantastic grateful kind pleasant pleasure enjoy enjoyed excited exciting smile smiling
proud peaceful bright cheerful amazing best glad thank thanks fun awesome blessed laugh laughed""".split())
NEG_WORDS = set("""bad awful terrible horrible sad angry hate hated upset miserable cry cried crying
painful pain fear afraid frightening dreadful disgusting rude hostile gloomy depressing dreary worst
war accident sick lost losing devastated furious anxious boring tedious hurt alone lonely""".split())
LAYER = 24


def features(model, tok, texts: list[str]) -> torch.Tensor:
    """Mean residual stream at layer ``LAYER`` over each text (unsteered model)."""
    out = []
    with torch.inference_mode(), actscope.trace(model, [f"blocks.{LAYER}.hook_resid_post"]) as cache:
        for text in texts:
            ids = tok(text, return_tensors="pt").input_ids
            model(input_ids=ids)
            h = cache.all(f"blocks.{LAYER}.hook_resid_post")[-1][0, 1:]  # skip the first token (sink)
            out.append(h.mean(0).float())
    return torch.stack(out)


def _fit(z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-regularised logistic regression by L-BFGS."""
    w = torch.zeros(z.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y) + 1e-2 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


class SentimentProbe:
    def __init__(self, model, tok):
        self.model, self.tok = model, tok
        x = features(model, tok, POSITIVE + NEGATIVE)
        y = torch.tensor([1.0] * len(POSITIVE) + [0.0] * len(NEGATIVE))
        self.mu, self.sd = x.mean(0), x.std(0) + 1e-6
        z = (x - self.mu) / self.sd
        # held-out accuracy: fit on even-numbered sentences, test on odd-numbered ones, and back
        even = torch.arange(len(y)) % 2 == 0
        correct = 0
        for train in (even, ~even):
            w, b = _fit(z[train], y[train])
            correct += int(((z[~train] @ w + b > 0).float() == y[~train]).sum())
        self.heldout_accuracy = correct / len(y)
        self.w, self.b = _fit(z, y)

    def score(self, texts: list[str]) -> torch.Tensor:
        """P(positive) per text."""
        z = (features(self.model, self.tok, texts) - self.mu) / self.sd
        return torch.sigmoid(z @ self.w + self.b)


def word_balance(text: str) -> float:
    """(positive - negative words) per word."""
    words = re.findall(r"[a-z']+", text.lower())
    if not words:
        return 0.0
    return (sum(w in POS_WORDS for w in words) - sum(w in NEG_WORDS for w in words)) / len(words)
