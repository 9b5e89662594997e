"""The evidence of a lowrank step in a report: the rank chosen for each layer against the
largest rank that still saves parameters, and the singular-value energy curves of a few
layers (the flatter the curve, the less low rank pays)."""
from __future__ import annotations

from .plots import svd_energy
from .svg import esc, finite
from .text import count, figure, num, table

MAX_CURVES_DRAWN = 4


def lowrank_details(details) -> str:
    lr = details.get("lowrank") if isinstance(details, dict) else None
    if not isinstance(lr, dict):
        return ""
    layers = [e for e in lr.get("layers") or [] if isinstance(e, dict)]
    out = []
    crit, value = lr.get("criterion"), lr.get("value")
    before, after = lr.get("params_before"), lr.get("params_after")
    line = (f"<p>Low rank by {esc(crit)} {esc(value)}: {esc(lr.get('factorized', '?'))} of {len(layers)} layers "
            "factorized")
    if finite(before) and finite(after) and before:
        line += f"; their weights {count(before)} \u2192 {count(after)} ({100 * after / before:.1f}% kept)"
    out.append(line + ".</p>")
    if layers:
        rows = [[str(e.get("layer", "?")), "\u00d7".join(str(s) for s in e.get("shape") or []),
                 str(e.get("rank", "?")), str(e.get("max_rank", "?")), num(e.get("break_even"), ".1f"),
                 num(100 * e["energy_kept"], ".2f") if finite(e.get("energy_kept")) else "\u2014",
                 num(e.get("relative_error")), "yes" if e.get("factorized") else "no: left dense"]
                for e in layers]
        out.append(f"<details><summary>Rank per layer ({len(layers)})</summary>"
                   + table(["layer", "shape", "rank", "max rank", "break-even rank", "energy kept %",
                            "relative error", "factorized"], rows, "num lowrank-ranks") + "</details>")
        out.append(figure("svd-energy", svd_energy, _drawn(layers)))
    quality = details.get("quality_before_finetune")
    if isinstance(quality, dict) and finite(quality.get("value")):   # the fine-tune itself: training_details
        out.append(f"<p>Quality after factorizing, before the fine-tune: {num(quality['value'])} "
                   f"({esc(quality.get('name', ''))}).</p>")
    return "\n".join(out)


def _drawn(layers: list[dict]) -> list[dict]:
    """A few curves: the first and last layer and the flattest and steepest spectra (the
    rank fraction the criterion asked for, highest and lowest)."""
    if len(layers) <= MAX_CURVES_DRAWN:
        return layers

    def frac(e):
        r, k = e.get("rank"), e.get("max_rank")
        return r / k if finite(r) and finite(k) and k else 0.0

    picks = [0, len(layers) - 1, max(range(len(layers)), key=lambda i: frac(layers[i])),
             min(range(len(layers)), key=lambda i: frac(layers[i]))]
    keep = sorted(set(picks))
    return [layers[i] for i in keep][:MAX_CURVES_DRAWN]
