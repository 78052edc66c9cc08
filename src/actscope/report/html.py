"""The scan report as one self-contained HTML page (inline CSS, PNG/SVG plots, no network).

Every piece of dataset or model text goes through ``esc`` (html.escape), so a ``<script>``
in the corpus is shown as text and never runs.
"""

from __future__ import annotations

import html
from typing import Any

import torch

from .plots import heatmap_figure, line_chart

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:24px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:19px;margin:28px 0 8px;border-bottom:1px solid #d8dce3;padding-bottom:4px}
.meta{color:#5a6272}.cards{display:flex;flex-wrap:wrap;gap:12px}
section.card{background:#fff;border:1px solid #e1e4ea;border-radius:8px;padding:14px 16px;margin:10px 0}
ul.summary li{margin:4px 0}
figure.plot{display:inline-block;margin:8px 16px 8px 0;vertical-align:top}
figcaption{font-weight:600;margin-bottom:4px}
svg.chart text{font-size:10px;fill:#444}svg.chart .frame{fill:#fbfcfd;stroke:#c9ced6}svg.chart .grid{stroke:#e6e9ee}
.legend span{margin-right:10px;font-size:12px}
.hm{display:flex;align-items:center;gap:6px;max-width:100%}.hm img{image-rendering:pixelated;border:1px solid #c9ced6;max-width:calc(100% - 24px);height:auto}
.ylabel{writing-mode:vertical-rl;transform:rotate(180deg);font-size:11px;color:#555}
.xlabel{font-size:11px;color:#555;margin-left:22px}.cbar{display:flex;gap:6px;align-items:center;font-size:11px;margin:4px 0 0 22px}
table{border-collapse:collapse;font-size:12.5px}th,td{border:1px solid #e1e4ea;padding:3px 7px;text-align:left}
th{background:#eef1f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
.tok{white-space:pre;font-family:ui-monospace,Menlo,Consolas,monospace;background:#f1f3f6;border-radius:3px;padding:0 2px}
.ctx{font-family:ui-monospace,Menlo,Consolas,monospace;white-space:pre-wrap;font-size:12px}
.ctx mark{background:#ffd54f;border-radius:2px}
.lens td{font-family:ui-monospace,Menlo,Consolas,monospace;white-space:pre;font-size:11.5px}
.scroll{overflow-x:auto}
"""

# Marks the page as rendered once every plot image has decoded (the browser test reads it).
SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  var charts = document.querySelectorAll('svg.chart polyline').length;
  document.body.setAttribute('data-images-ok', ok + '/' + imgs.length);
  document.body.setAttribute('data-charts', String(charts));
});
"""


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def tok(x: str) -> str:
    return f'<span class="tok">{esc(x)}</span>'


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(rows_cell for rows_cell in r) + "</tr>" for r in rows)
    return f'<div class="scroll"><table><tr>{head}</tr>{body}</table></div>'


def _num(x: Any, fmt: str = "{:,.3g}") -> str:
    return f'<td class="num">{"" if x is None else esc(fmt.format(x))}</td>'


def _cell(x: Any) -> str:
    return f"<td>{x}</td>"


def _sinks(r: dict, arrays: dict) -> str:
    att = r["attention_sinks"]
    if not att.get("enabled"):
        return "<p>Attention patterns were not recorded (scan with patterns enabled).</p>"
    mass = torch.tensor([[h["mass_on_first_token"] for h in l["heads"]] for l in att["per_layer"]])
    out = [heatmap_figure(mass, "Share of attention on the first token", "head", "layer", 0.0, 1.0, (12, 28))]
    if "sink_scores" in arrays:
        per_pos = arrays["sink_scores"].mean(1)  # [layer, key position]
        out.append(heatmap_figure(per_pos.clamp(max=0.2), "Sink score by key position (mean over heads, capped at 0.2)",
                                  "key position", "layer", 0.0, 0.2, (12, 4)))
    tri = att["triad"]
    out.append(line_chart({
        "first token": [t["first_token"]["value_norm"] for t in tri],
        "other tokens": [t["other_tokens"]["value_norm"] for t in tri],
    }, "Value-state norm (value drain)", "layer", "mean ||v||"))
    out.append(line_chart({
        "first token": [t["first_token"]["residual_norm"] for t in tri],
        "other tokens": [t["other_tokens"]["residual_norm"] for t in tri],
    }, "Residual norm entering each layer (residual peak)", "layer", "mean ||h||", log=True))
    dormant = r["dormant_heads"]
    if dormant:
        rows = [[_num(d["layer"], "{}"), _num(d["head"], "{}"), _num(d["dormant_rate"], "{:.0%}"), _num(d["mass_on_first_token"], "{:.0%}")] for d in dormant[:60]]
        out.append(f"<h3>Dormant heads ({len(dormant)})</h3>" + _table(["layer", "head", "dormant on sequences", "mass on first token"], rows))
    sec = att.get("secondary_sinks") or []
    if sec:
        rows = [[_cell(tok(s["token"])), _cell(esc(f"{s['lifetime'][0]}-{s['lifetime'][1]}")), _num(len(s["layers"]), "{}"),
                 _num(s["occurrences"], "{:,}"), _num(s["max_rate"], "{:.0%}")] for s in sec[:20]]
        out.append("<h3>Secondary sinks</h3>" + _table(["token", "lifetime (layers)", "layers", "occurrences", "peak rate"], rows))
    return "".join(out)


def _massive(r: dict) -> str:
    rows = [[_num(m["layer"], "{}"), _num(m["dim"], "{}"), _num(m["position"], "{}"), _cell(tok(m["token"])),
             _num(m["value"], "{:,.1f}"), _num(m["ratio_to_median"], "{:,.0f}"), _num(m["count"], "{:,}")]
            for m in r["massive_activations"][:40]]
    if not rows:
        return "<p>No entries pass both thresholds.</p>"
    peak: dict[int, float] = {}
    for m in r["massive_activations"]:
        peak[m["layer"]] = max(peak.get(m["layer"], 0.0), abs(m["value"]))
    n = r["model"]["n_layers"]
    chart = line_chart({"largest |entry|": [peak.get(l) for l in range(n)], "median |entry|": r["residual_median"]},
                       "Massive activations vs the median, per layer", "layer", "|h| (log)", log=True)
    return chart + _table(["layer", "dim", "position", "token", "value", "x median", "count"], rows)


def _mlp(r: dict, arrays: dict) -> str:
    sp = r["mlp_sparsity"]
    taus = list(sp[0]["density"])
    out = [line_chart({f"|a| > {t}": [s["density"][t] for s in sp] for t in taus},
                      "MLP activation density", "layer", "share of neurons active")]
    chunk_key = next(k for k in sp[0] if k.startswith("chunk_sparsity"))
    out.append(line_chart({
        "token-level (TLS)": [s["token_sparsity"] for s in sp],
        f"chunk-level ({chunk_key.rsplit('_', 1)[1]} tokens)": [s[chunk_key] for s in sp],
        "delta (temporal)": [s["delta_sparsity"] for s in sp],
        "CETT": [s["cett_sparsity"] for s in sp],
    }, f"Sparsity at tau = {sp[0]['tau']:g}", "layer", "sparsity"))
    out.append(line_chart({
        "dead": [d["dead"] for d in r["dead_neurons"]], "rare (<1e-4 of tokens)": [d["rare"] for d in r["dead_neurons"]],
    }, "Dead and rare neurons", "layer", "neurons"))
    out.append(line_chart({"unique codes": [c["uniqueness"] for c in r["neural_codes"]]},
                          "Neural codes: share of tokens with a distinct activation pattern", "layer", "uniqueness"))
    dens = arrays["neuron_density"].sort(dim=1, descending=True).values
    out.append(heatmap_figure(dens, "Per-neuron activation density (each layer sorted, densest left)", "neuron rank",
                              "layer", 0.0, 1.0, (10, 1)))
    return "".join(out)


def _layer_use(r: dict) -> str:
    lu = r["layer_use"]
    return (
        line_chart({"relative update": [u["relative_update"] for u in lu]}, "Relative update ||h_l - h_(l-1)|| / ||h_(l-1)||", "layer", "ratio", log=True)
        + line_chart({"attention": [u["cos_attn_to_residual"] for u in lu], "MLP": [u["cos_mlp_to_residual"] for u in lu]},
                     "Cosine of sublayer output with the residual it reads", "layer", "cosine")
        + line_chart({"logit lens": [u["logit_lens_kl"] for u in lu], "layer skipped": [u["skip_kl"] for u in lu]},
                     "KL divergence to the final output (nats)", "layer", "KL (log)", log=True)
    )


def _lens(r: dict) -> str:
    lens = r.get("logit_lens") or {}
    if not lens:
        return "<p>No logit lens for this model (no final norm or LM head).</p>"
    head = ["layer"] + [f"pos {p}: {t}" for p, t in zip(lens["positions"], lens["tokens"])]
    rows = []
    for layer in lens["layers"]:
        cells = [_num(layer["layer"], "{}")]
        for top, rank in zip(layer["top"], layer["final_token_rank"]):
            shade = max(0, 255 - min(rank, 1000) // 4) if rank else 255
            color = "#c8efc8" if rank == 0 else f"rgb(255,{shade},{shade})"
            cells.append(f'<td style="background:{color}" title="rank of the final prediction: {rank}">{esc(top[0])}</td>')
        rows.append(cells)
    rows.append([_cell("<b>output</b>")] + [_cell(f"<b>{esc(t)}</b>") for t in lens["next_token_prediction"]])
    return ('<p>Top-1 token of the logit lens at each layer; green where it equals the model\'s final prediction, '
            'redder the lower the final prediction ranks.</p><div class="lens">' + _table(head, rows) + "</div>")


def _contexts(r: dict) -> str:
    rows = []
    for n in r["neurons"][:45]:
        ctx = "<br>".join(
            f'{esc(c["before"])}<mark>{esc(c["token"])}</mark>{esc(c["after"])} <span class="meta">({c["value"]:.3g})</span>'
            for c in n["contexts"][:3]
        )
        rows.append([_num(n["layer"], "{}"), _num(n["neuron"], "{}"), _num(n["max"], "{:.3g}"), _num(n["kurtosis"], "{:.3g}"),
                     _num(n["density"], "{:.1%}"), f'<td class="ctx">{ctx}</td>'])
    return _table(["layer", "neuron", "max", "kurtosis", "density", "top-activating contexts"], rows)


def _comparison(r: dict) -> str:
    comp = r.get("comparison")
    if comp is None:
        return ""
    ad = comp["active_dormant_heads"]
    rows = [[_num(h["layer"], "{}"), _num(h["head"], "{}"), _num(h["dormant_rate_main"], "{:.0%}"),
             _num(h["dormant_rate_compare"], "{:.0%}"), _cell(esc(h["dormant_on"]))] for h in ad]
    diff = line_chart({"main": [d["token_sparsity_main"] for d in comp["sparsity_difference"]],
                       "compare": [d["token_sparsity_compare"] for d in comp["sparsity_difference"]]},
                      "Token-level sparsity on the two corpora", "layer", "sparsity")
    table = _table(["layer", "head", "dormant (main)", "dormant (compare)", "dormant on"], rows) if rows else "<p>No active-dormant heads.</p>"
    return (f'<h2>Comparison: {esc(r["source"])} vs {esc(r["compare"]["source"])}</h2><section class="card">'
            f"<h3>Active-dormant heads ({len(ad)})</h3>{table}{diff}</section>")


def render(r: dict, arrays: dict[str, torch.Tensor], fragment: bool = False) -> str:
    m = r["model"]
    summary = "".join(f"<li>{esc(line)}</li>" for line in r["summary"])
    body = (
        f'<h1>actscope scan: {esc(m["name"])}</h1>'
        f'<p class="meta">{esc(m["model_type"])} · {m["n_layers"]} layers · {m["n_heads"]} heads · d_ff {m["d_ff"]} · '
        f'{r["tokens"]:,} tokens of {esc(r["source"])} · actscope {esc(r["actscope_version"])}</p>'
        f'<section class="card"><h2>What stands out</h2><ul class="summary">{summary}</ul></section>'
        f'<h2>Attention sinks and dormant heads</h2><section class="card">{_sinks(r, arrays)}</section>'
        f'<h2>Massive activations</h2><section class="card">{_massive(r)}</section>'
        f'<h2>MLP activation sparsity</h2><section class="card">{_mlp(r, arrays)}</section>'
        f'<h2>Layer use</h2><section class="card">{_layer_use(r)}</section>'
        f'<h2>Logit lens</h2><section class="card">{_lens(r)}</section>'
        f'<h2>Top-activating contexts</h2><section class="card">{_contexts(r)}</section>'
        f"{_comparison(r)}"
    )
    if fragment:
        return f"<style>{CSS}</style><div>{body}</div>"
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; style-src \'unsafe-inline\'; script-src \'unsafe-inline\'">'
        f'<title>actscope scan: {esc(m["name"])}</title><style>{CSS}</style></head>'
        f"<body><main>{body}</main><script>{SCRIPT}</script></body></html>"
    )
