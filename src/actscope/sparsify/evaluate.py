"""Perplexity against sparsity, and the PPL-p% sparsity: how far each method goes at little cost.

Every held-out row is split into a prompt (its first half) and a continuation. The prompt runs
with the KV cache, then the continuation is scored from that cache, the way decoding sees it;
this is also what CoreInfer needs (core neurons are chosen on the prompt, then fixed). For the
threshold methods the result equals scoring the whole row at once.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import TokenBatches, load_tokens
from ..errors import SparsifyError
from ..kvcache import output_cache, with_cache
from .swap import apply
from .calibrate import calibrate
from .choice import choice_accuracy, continuation_items, load_choice_file
from .config import SparsityConfig

DEFAULT_SPARSITIES = (0.25, 0.4, 0.5, 0.6, 0.7)


def perplexity(model: nn.Module, tokens: TokenBatches, config: SparsityConfig | None = None,
               batch_size: int = 4) -> tuple[float, float]:
    """``(perplexity, achieved sparsity)`` on the continuation halves of ``tokens``' rows."""
    rows, achieved = continuation_nll(model, tokens, config, batch_size)
    return _perplexity(rows, tokens), achieved


def _perplexity(row_nll: torch.Tensor, tokens: TokenBatches) -> float:
    """Perplexity from per-row summed losses over the continuation halves (equal-length rows)."""
    return math.exp(float(row_nll.mean()) / (tokens.seq_len - tokens.seq_len // 2))


def continuation_nll(model: nn.Module, tokens: TokenBatches, config: SparsityConfig | None = None,
                     batch_size: int = 4) -> tuple[torch.Tensor, float]:
    """``(summed negative log-likelihood per row, achieved sparsity)`` on the continuation halves.

    Per-row sums, not one total, so that two methods scored on the same rows can be compared
    row by row (``SparsityEval.compare``).
    """
    device = next(model.parameters()).device
    split = tokens.seq_len // 2
    rows = []
    with torch.inference_mode(), apply(model, config or SparsityConfig("teal", 0.0)) as handle:
        totals = {p: torch.zeros_like(m.counter) for p, m in handle.modules.items()}
        for batch in tokens.batches(batch_size):
            batch = batch.to(device)
            first = model(input_ids=batch[:, :split], use_cache=True)
            handle.reset()  # achieved sparsity is measured where it pays: on the continuation
            rest = model(input_ids=batch[:, split:-1], **with_cache(output_cache(first)), use_cache=True)
            for p, m in handle.modules.items():
                totals[p] += m.counter
            logits = torch.cat([first.logits[:, -1:], rest.logits], dim=1).float()
            targets = batch[:, split:]
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
            rows.append(nll.double().sum(dim=1).cpu())
        for p, m in handle.modules.items():
            m.counter.copy_(totals[p])
        achieved = handle.achieved()["overall"] if handle.modules else 0.0
    return torch.cat(rows), achieved


@dataclass
class SparsityEval:
    """Perplexity-vs-sparsity curves per method, with PPL-p% sparsities."""

    dense_ppl: float
    curves: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # method -> points
    meta: dict[str, Any] = field(default_factory=dict)
    dense_rows: list[float] = field(default_factory=list)  # per-row summed NLL of the dense model

    def compare(self, method: str, other: str, target: float, resamples: int = 2000,
                seed: int = 0) -> dict[str, float] | None:
        """``method``'s perplexity over ``other``'s at one target, with a 95% paired bootstrap interval.

        Both were scored on the same held-out rows, so rows are resampled together: the interval
        says whether a difference of a fraction of a percent is more than which rows were drawn.
        Neighbouring rows are consecutive stretches of one text and share its topics, so they are
        resampled in runs of about sqrt(rows) consecutive rows (a moving-block bootstrap); single
        rows would treat them as independent and give too narrow an interval.
        ``other="dense"`` compares with the dense model. ``None`` if either lacks per-row losses.
        """
        a = next((c.get("row_nll") for c in self.curves.get(method, []) if c["target"] == target), None)
        b = self.dense_rows if other == "dense" else next(
            (c.get("row_nll") for c in self.curves.get(other, []) if c["target"] == target), None)
        if not a or not b or len(a) != len(b):
            return None
        diff = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
        per_row_tokens = self.meta["continuation_tokens"]
        n = len(diff)
        run = max(1, math.isqrt(n))
        n_runs = -(-n // run)
        gen = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, n - run + 1, (resamples, n_runs, 1), generator=gen)
        idx = (starts + torch.arange(run)).reshape(resamples, -1)[:, :n]
        diffs = diff[idx].mean(dim=1) / per_row_tokens  # log perplexity ratio per resample
        low, high = torch.quantile(diffs, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
        mean = float(diff.mean()) / per_row_tokens
        return {"ratio": math.exp(mean), "low": math.exp(low), "high": math.exp(high), "rows": n, "run": run}

    def comparisons(self) -> dict[str, dict[str, dict[str, float]]]:
        """Every method against the first one listed, at each target both reached."""
        methods = list(self.curves)
        out: dict[str, dict[str, dict[str, float]]] = {}
        for m in methods[1:]:
            for c in self.curves[m]:
                if (r := self.compare(m, methods[0], c["target"])) is not None:
                    out.setdefault(f"{m} vs {methods[0]}", {})[f"{c['target']:g}"] = r
        return out

    def ppl_p_sparsity(self, method: str, p: float) -> float:
        """Highest sparsity whose perplexity is within ``p``% of dense (linear in log ppl between points)."""
        limit = math.log(self.dense_ppl * (1 + p / 100))
        pts = [(0.0, math.log(self.dense_ppl))] + [(c["achieved"], math.log(c["ppl"])) for c in self.curves[method]]
        pts.sort()
        best = 0.0
        for (s0, l0), (s1, l1) in zip(pts, pts[1:]):
            if l1 <= limit:
                best = s1
                continue
            if l0 <= limit < l1:
                best = s0 + (limit - l0) / (l1 - l0) * (s1 - s0)
            break
        return best

    def to_dict(self) -> dict[str, Any]:
        return {
            "dense_ppl": self.dense_ppl,
            "curves": self.curves,
            "ppl_p_sparsity": {m: {f"{p}%": self.ppl_p_sparsity(m, p) for p in (1, 5)} for m in self.curves},
            "paired": self.comparisons(),
            "meta": self.meta,
            "dense_row_nll": self.dense_rows,
        }

    def plot_svg(self) -> str:
        from ..report.plots import line_chart

        xs = sorted({c["target"] for pts in self.curves.values() for c in pts})
        series: dict[str, list[float | None]] = {
            m: [next((c["ppl"] for c in pts if c["target"] == x), None) for x in xs] for m, pts in self.curves.items()
        }
        series["dense"] = [self.dense_ppl] * len(xs)
        return line_chart(series, "Perplexity vs sparsity (held-out text)", "target sparsity", "perplexity",
                          log=True, x=xs, height=340)

    def save(self, folder: str | os.PathLike) -> Path:
        """``sparsity_eval.json`` and ``ppl_vs_sparsity.svg``."""
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        (out / "sparsity_eval.json").write_text(json.dumps(self.to_dict(), indent=1))
        (out / "ppl_vs_sparsity.svg").write_text(standalone_svg(self.plot_svg()))
        return out


def standalone_svg(figure: str) -> str:
    """The ``<svg>`` of a report figure as a file of its own: namespace, styles and legend inside."""
    import re

    svg = figure[figure.index("<svg"): figure.index("</svg>")]
    svg = svg.replace("<svg ", '<svg xmlns="http://www.w3.org/2000/svg" ', 1)
    style = ("<style>text{font:11px sans-serif;fill:#333}.frame{fill:none;stroke:#999}"
             ".grid{stroke:#e4e4e4}</style>")
    legend = re.findall(r'<span style="color:([^"]+)">&#9632; ([^<]*)</span>', figure)
    items = "".join(f'<text x="{66 + 88 * (i % 5)}" y="{24 + 14 * (i // 5)}" style="fill:{c}">&#9632; {name}</text>'
                    for i, (c, name) in enumerate(legend))
    return svg.replace(">", ">" + style, 1) + items + "</svg>\n"


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    data: Any = None,
    *,
    methods: Sequence[str] = ("teal", "wina", "cats", "chess", "topk", "coreinfer"),
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    calib_tokens: int = 8192,
    eval_tokens: int = 8192,
    seq_len: int = 256,
    batch_size: int = 4,
    choices: int | str | os.PathLike | None = None,
    progress: bool = True,
    **calibrate_kwargs: Any,
) -> SparsityEval:
    """Calibrate each method at each sparsity on the first ``calib_tokens`` of ``data`` and
    measure perplexity on the next ``eval_tokens`` (held out: calibration never sees them).

    ``choices`` adds multiple-choice accuracy at every point: a number builds that many
    continuation items from the held-out text; a path reads a JSONL file (see ``choice.py``).
    """
    tokens = load_tokens(data, tokenizer, seq_len, calib_tokens + eval_tokens)
    n_cal = calib_tokens // seq_len
    if tokens.num_sequences - n_cal < 1:
        raise SparsifyError(f"the data gives only {tokens.num_tokens} tokens; need more than --calib-tokens "
                            f"({calib_tokens}) to hold some out for evaluation")
    cal = TokenBatches(tokens.input_ids[:n_cal], tokens.doc_ids[:n_cal], tokens.source)
    held = TokenBatches(tokens.input_ids[n_cal:], tokens.doc_ids[n_cal:], tokens.source)
    items = None
    if isinstance(choices, int) and not isinstance(choices, bool) and choices > 0:
        context = min(48, held.seq_len * 3 // 4)  # short rows: keep a quarter for the continuation
        items = continuation_items(held, n=choices, context=context, length=min(16, held.seq_len - context))
    elif isinstance(choices, (str, os.PathLike)):
        items = load_choice_file(choices, tokenizer)
    dense_rows, _ = continuation_nll(model, held, None, batch_size)
    per_row = held.seq_len - held.seq_len // 2
    meta = {"calib_tokens": cal.num_tokens, "eval_tokens": held.num_tokens, "seq_len": seq_len,
            "continuation_tokens": per_row, "source": tokens.source}
    result = SparsityEval(_perplexity(dense_rows, held), dense_rows=dense_rows.tolist(), meta=meta)
    if items:
        result.meta.update(choice_items=len(items), choice_source=str(choices), dense_accuracy=choice_accuracy(model, items))
    bar = tqdm(total=len(methods) * len(sparsities), desc="sparsify eval", disable=not progress)
    for method in methods:
        points = []
        for s in sparsities:
            config = calibrate(model, method=method, sparsity=s, tokens=cal, batch_size=batch_size,
                               progress=False, **calibrate_kwargs)
            rows, achieved = continuation_nll(model, held, config, batch_size)
            point = {"target": s, "achieved": achieved, "ppl": _perplexity(rows, held), "row_nll": rows.tolist()}
            if items:
                point["accuracy"] = choice_accuracy(model, items, config)
            points.append(point)
            bar.update(1)
        result.curves[method] = points
    bar.close()
    return result
