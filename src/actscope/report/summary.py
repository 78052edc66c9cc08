"""A short plain-language summary of what is unusual in a scanned model."""

from __future__ import annotations


def _span(layers: list[int]) -> str:
    """Layers as runs of consecutive layers, e.g. ``"layer 2 and layers 11-27"``.

    Not ``min-max``: a phenomenon present in layer 2 and from layer 11 on is absent in 3-10, and
    a single range would claim it is there too."""
    if not layers:
        return "no layers"
    runs: list[list[int]] = []
    for layer in sorted(set(layers)):
        if runs and layer == runs[-1][1] + 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer])
    parts = [f"layer {a}" if a == b else f"layers {a}-{b}" for a, b in runs]
    return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"


def summarize(r: dict) -> list[str]:
    lines: list[str] = []
    massive = r.get("massive_activations") or []
    if massive:
        top = massive[0]
        same = [m for m in massive if m["dim"] == top["dim"] and m["position"] == top["position"]]
        where = f"position {top['position']}"
        if top["position"] == 0 and top["count"] >= r.get("tokens", 0) // max(r["config"]["seq_len"], 1):
            where = "position 0 of every sequence"
        # massive_activations is sorted by |value|, so ``top`` is where this dimension peaks
        lines.append(
            f"Massive activation: residual dimension {top['dim']} at {where} appears in "
            f"{_span([m['layer'] for m in same])}, peaking in layer {top['layer']} at {top['value']:,.0f} "
            f"({top['ratio_to_median']:,.0f}x the median; largest on token {top['token']!r})."
        )
    else:
        lines.append("No massive activations above the thresholds.")
    att = r.get("attention_sinks", {})
    if att.get("enabled"):
        mass = [sum(h["mass_on_first_token"] for h in l["heads"]) / len(l["heads"]) for l in att["per_layer"]]
        sinky = [i for i, m in enumerate(mass) if m >= 0.5]
        best = max(range(len(mass)), key=lambda i: mass[i])
        lines.append(
            f"Attention sink: heads put on average {sum(mass) / len(mass):.0%} of their attention on the first "
            f"token; {len(sinky)} of {len(mass)} layers put half or more there (peak {mass[best]:.0%} in layer {best})."
        )
        dormant = r.get("dormant_heads") or []
        lines.append(
            f"{len(dormant)} head{'s are' if len(dormant) != 1 else ' is'} dormant (>{att['dormant_threshold']:.0%} of their attention on the sink) "
            "on at least half of the sequences." if dormant else "No head is dormant on most sequences."
        )
        if att.get("secondary_sinks"):
            s = att["secondary_sinks"][0]
            lines.append(f"Secondary sink: token {s['token']!r} collects attention in {_span(s['layers'])}.")
    sp = r.get("mlp_sparsity") or []
    if sp:
        tau = sp[0]["tau"]
        dens = [1 - s["token_sparsity"] for s in sp]
        lo, hi = min(range(len(dens)), key=dens.__getitem__), max(range(len(dens)), key=dens.__getitem__)
        lines.append(
            f"MLP activations with |a| > {tau:g}: density from {dens[lo]:.1%} (layer {lo}) to {dens[hi]:.1%} (layer {hi})."
        )
    dead = sum(d["dead"] for d in r.get("dead_neurons") or [])
    if dead:
        lines.append(f"{dead} MLP neurons never exceed the threshold on this corpus (dead).")
    use = [u for u in r.get("layer_use") or [] if u.get("skip_kl") is not None]
    if use:
        least = min(use, key=lambda u: u["skip_kl"])
        most = max(use, key=lambda u: u["skip_kl"])
        lines.append(
            f"Skipping layer {least['layer']} changes the output least (KL {least['skip_kl']:.3g}); "
            f"skipping layer {most['layer']} most (KL {most['skip_kl']:.3g})."
        )
    comp = r.get("comparison")
    if comp is not None:
        lines.append(f"{len(comp['active_dormant_heads'])} heads are dormant on one corpus and active on the other.")
    return lines
