"""Turn accumulated scan statistics into the report: a JSON-ready dict and a ScanReport object."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .. import __version__
from .summary import summarize


def _round(x: Any, digits: int = 6) -> Any:
    if isinstance(x, float):
        return round(x, digits) if x == x and abs(x) != float("inf") else None
    if isinstance(x, dict):
        return {k: _round(v, digits) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_round(v, digits) for v in x]
    return x


def _context(tokens, index: int, decode, before: int = 8, after: int = 3) -> dict:
    seq, pos = divmod(int(index), tokens.seq_len)
    row = tokens.input_ids[seq].tolist()
    left = "".join(decode(t) for t in row[max(0, pos - before) : pos])
    right = "".join(decode(t) for t in row[pos + 1 : pos + 1 + after])
    return {"sequence": seq, "position": pos, "before": left, "token": decode(row[pos]), "after": right}


def _attention_section(ctx: ReportContext, st) -> tuple[dict, list]:
    att = st.attention
    if att is None:
        return {"enabled": False}, []
    scores = att.sink_scores()  # [L, H, T]
    first = att.mass_on_first()
    dormant = att.dormant_rate()
    per_layer = []
    for l in range(ctx.n_layers):
        heads = []
        for h in range(att.n_heads):
            score, pos = scores[l, h].max(0)
            heads.append({
                "head": h, "sink_position": int(pos), "sink_score": float(score),
                "mass_on_first_token": float(first[l, h]), "dormant_rate": float(dormant[l, h]),
            })
        per_layer.append({"layer": l, "heads": heads})
    dormant_heads = [
        {"layer": l, "head": h, "dormant_rate": float(dormant[l, h]), "mass_on_first_token": float(first[l, h])}
        for l in range(ctx.n_layers) for h in range(att.n_heads) if dormant[l, h] >= 0.5
    ]
    section = {
        "enabled": True,
        "dormant_threshold": att.dormant_threshold,
        "per_layer": per_layer,
        "secondary_sinks": att.secondary_sinks(ctx.decode)[:50],
        "triad": att.triad_table(),
    }
    return section, dormant_heads


def _neurons(ctx: ReportContext, st, per_layer: int = 3) -> list[dict]:
    """The most extreme neurons of each layer (by max activation), with top contexts."""
    rows = []
    for l, m in enumerate(st.mlp):
        mx = m.max
        for n in mx.topk(min(per_layer, mx.numel())).indices.tolist():
            contexts = [
                {**_context(st.tokens, idx, ctx.decode), "value": float(v)}
                for v, idx in zip(m.top.values[:, n].tolist(), m.top.index[:, n].tolist())
            ]
            rows.append({
                "layer": l, "neuron": n, "max": float(mx[n]), "mean": float(m.moments.mean[n]),
                "std": float(m.moments.std[n]), "kurtosis": float(m.moments.kurtosis[n]),
                "density": float(m.neuron_density()[n]), "contexts": contexts,
            })
    return rows


def corpus_section(ctx: ReportContext, st) -> dict:
    mlp = [m.summary(ctx.rare) for m in st.mlp]
    attention, dormant = _attention_section(ctx, st)
    return {
        "tokens": st.n_tokens,
        "source": st.tokens.source,
        "mlp_sparsity": [{"layer": l, **{k: v for k, v in s.items() if k not in ("dead_neurons", "rare_neurons", "code_uniqueness")}} for l, s in enumerate(mlp)],
        "massive_activations": st.massive.results(ctx.decode)[:200],
        "residual_median": [st.massive.median(l) for l in range(ctx.n_layers)],
        "attention_sinks": attention,
        "dormant_heads": dormant,
        "layer_use": st.layers.results(),
        "dead_neurons": [{"layer": l, "dead": s["dead_neurons"], "rare": s["rare_neurons"], "d_ff": st.mlp[l].d_ff} for l, s in enumerate(mlp)],
        "neural_codes": [{"layer": l, "uniqueness": s["code_uniqueness"]} for l, s in enumerate(mlp)],
        "neurons": _neurons(ctx, st),
    }


def compare_sections(a: dict, b: dict) -> dict:
    """Heads dormant on one corpus and active on the other; per-layer sparsity differences.

    A head is active-dormant when it is dormant on at least half the sequences of one corpus
    and its dormant rates on the two corpora differ by at least 0.5.
    """
    out: dict[str, Any] = {"active_dormant_heads": [], "sparsity_difference": []}
    if a["attention_sinks"].get("enabled") and b["attention_sinks"].get("enabled"):
        for la, lb in zip(a["attention_sinks"]["per_layer"], b["attention_sinks"]["per_layer"]):
            for ha, hb in zip(la["heads"], lb["heads"]):
                ra, rb = ha["dormant_rate"], hb["dormant_rate"]
                if max(ra, rb) >= 0.5 and abs(ra - rb) >= 0.5:
                    out["active_dormant_heads"].append({
                        "layer": la["layer"], "head": ha["head"], "dormant_rate_main": ra, "dormant_rate_compare": rb,
                        "dormant_on": "main" if ra > rb else "compare",
                    })
    for sa, sb in zip(a["mlp_sparsity"], b["mlp_sparsity"]):
        out["sparsity_difference"].append({
            "layer": sa["layer"], "token_sparsity_main": sa["token_sparsity"], "token_sparsity_compare": sb["token_sparsity"],
            "difference": sa["token_sparsity"] - sb["token_sparsity"],
        })
    return out


@dataclass(frozen=True)
class ReportContext:
    """What the report needs beside the accumulated statistics: a few facts about the model and
    the run, so that building the report never reaches into the scanner."""

    model_name: str
    model_type: str
    n_layers: int
    n_heads: int
    config: dict
    rare: float
    decode: Callable[[int], str]
    logit_lens: dict


def build_report(ctx: ReportContext, main, other=None) -> "ScanReport":
    body = corpus_section(ctx, main)
    report: dict[str, Any] = {
        "actscope_version": __version__,
        "model": {
            "name": ctx.model_name,
            "model_type": ctx.model_type,
            "n_layers": ctx.n_layers,
            "n_heads": ctx.n_heads,
            "d_ff": main.mlp[0].d_ff,
        },
        "config": ctx.config,
        **body,
        "logit_lens": ctx.logit_lens,
    }
    if other is not None:
        report["compare"] = corpus_section(ctx, other)
        report["comparison"] = compare_sections(body, report["compare"])
    report["summary"] = summarize(report)
    arrays = {
        "neuron_density": torch.stack([m.neuron_density() for m in main.mlp]).float(),
        "neuron_mean": torch.stack([m.moments.mean for m in main.mlp]).float(),
        "neuron_std": torch.stack([m.moments.std for m in main.mlp]).float(),
        "neuron_max": torch.stack([m.max for m in main.mlp]).float(),
        "neuron_kurtosis": torch.stack([m.moments.kurtosis for m in main.mlp]).float(),
    }
    if main.attention is not None:
        arrays["sink_scores"] = main.attention.sink_scores().float()
    return ScanReport(_round(report), arrays)


class ScanReport:
    """The scan's result: ``.data`` (JSON-ready), ``.arrays`` (per-neuron tensors)."""

    def __init__(self, data: dict, arrays: dict[str, torch.Tensor]):
        self.data = data
        self.arrays = arrays

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        text = json.dumps(self.data, indent=1, ensure_ascii=False)
        if path is not None:
            _atomic_write(Path(path), text.encode())
        return text

    def to_html(self) -> str:
        from .html import render

        return render(self.data, self.arrays)

    def save_html(self, path: str | os.PathLike) -> Path:
        _atomic_write(Path(path), self.to_html().encode())
        return Path(path)

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``report.json``, ``report.html`` and ``neurons.safetensors`` as one folder.

        The three files are written into a temporary sibling folder that then replaces ``folder``
        by renames, so a kill at any moment leaves the old report or the new one, never a new
        ``report.json`` beside an old ``report.html``.
        """
        from safetensors.torch import save

        out = check_report_folder(folder)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            self.to_json(tmp / "report.json")
            self.save_html(tmp / "report.html")
            _atomic_write(tmp / "neurons.safetensors", save({k: v.contiguous() for k, v in self.arrays.items()}))
            if out.exists():
                old = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
                os.rename(out, old)
                os.rename(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out / "report.html"

    def _repr_html_(self) -> str:
        from .html import render

        return render(self.data, self.arrays, fragment=True)


REPORT_FILES = ("report.json", "report.html", "neurons.safetensors")


def check_report_folder(folder: str | os.PathLike) -> Path:
    """Check that ``folder`` can take a report, before a scan spends its pass: refused when it is a
    file, holds files that are not a report's (the whole folder is replaced), or cannot be written."""
    from ..errors import ActscopeError

    out = Path(folder).expanduser()
    if out.exists() and not out.is_dir():
        raise ActscopeError(f"--out {out} is a file; give a folder for the report")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in REPORT_FILES)
        if foreign:
            raise ActscopeError(f"--out {out} holds other files ({', '.join(foreign[:3])}); the report replaces the "
                                "folder as a whole: choose an empty or new folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = Path(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=out.parent))
        probe.rmdir()
    except OSError as exc:
        raise ActscopeError(f"--out {out}: cannot write there ({exc.strerror or exc})") from None
    return out


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
