"""The plots of a compress run, each a function from result.json data to a Plot.

A function raises PlotSkipped (with the reason) when its data cannot be drawn;
the page then says so instead of showing an empty frame. Bar charts show at
most MAX_BARS layers, long series are downsampled.
"""
from __future__ import annotations

from dataclasses import dataclass

from .svg import (PALETTE, Band, Chart, PlotSkipped, band_bottom, circle, downsample, finite, line,
                  polyline, rect, short)

MAX_BARS = 48      # layers in one bar chart
MAX_CURVES = 8     # curves in one line chart
MAX_BINS = 160     # histogram bins drawn
MAX_GRID = 256     # quantization grid lines drawn


@dataclass
class Plot:
    kind: str      # the figure's data-plot
    svg: str
    caption: str


def bar_width(n: int) -> int:
    return max(640, min(1100, 110 + 18 * n))


def cap_rows(rows: list, cap: int, score) -> tuple[list, str]:
    """At most `cap` rows, the highest-scoring ones, kept in their original order."""
    if len(rows) <= cap:
        return rows, ""
    keep = set(sorted(range(len(rows)), key=lambda i: score(rows[i]), reverse=True)[:cap])
    return [r for i, r in enumerate(rows) if i in keep], f" Showing {cap} of {len(rows)} layers (the largest values)."


def bar(c: Chart, xb: Band, y, i: int, j: int, k: int, v: float, color: str, tip: str, extra="", **data) -> None:
    """Bar j of k in band i: from the baseline (0, or the bottom of a log axis) to v."""
    w = xb.width / k
    base = y.r0 if y.log else y(min(max(0.0, y.lo), y.hi))
    top = y(v)
    c.marks.append(rect(xb.start(i) + j * w, min(base, top), w * 0.92, abs(base - top), color, tip=tip,
                        extra=extra, value=repr(float(v)), **data))


def _vals(rows, key) -> list[float]:
    return [r.get(key) for r in rows if finite(r.get(key))]


def layer_errors(layers: list[dict], step: int | None = None, cap: int = MAX_BARS, pruning: bool = False) -> Plot:
    """Bars per layer: the recorded error and, where present, the reference it is compared with
    (RTN for quantization; magnitude pruning at the same sparsity for a pruning step)."""
    rows = [r for r in layers or [] if isinstance(r, dict)]
    vals = _vals(rows, "error") + _vals(rows, "error_rtn")
    if not vals:
        raise PlotSkipped("no layer has a recorded error")
    rows, note = cap_rows(rows, cap, lambda r: r.get("error") if finite(r.get("error")) else float("-inf"))
    series = [("error", "error", PALETTE[0])]
    if _vals(rows, "error_rtn"):
        series.append(("error_rtn", "magnitude pruning (same layer)" if pruning else "RTN error (same layer)",
                        "#9aa3b5"))
    pos = [v for v in vals if v > 0]
    log = len(pos) == len(vals) and max(pos) / min(pos) > 1e3
    labels = [str(r.get("name", "?")) for r in rows]
    w = bar_width(len(rows))
    c = Chart(f"Per-layer error{f' (step {step})' if step is not None else ''}", width=w, bottom=band_bottom(labels, w))
    y = c.yscale(min(pos) if log else min(0.0, min(vals)), max(vals), log=log)
    xb = Band(labels, c.x0, c.x1)
    c.axes(xb, y, ylabel="error" + (" (log)" if log else ""))
    for i, r in enumerate(rows):
        for j, (key, label, color) in enumerate(series):
            v = r.get(key)
            if finite(v):
                bar(c, xb, y, i, j, len(series), v, color, f"{labels[i]}: {label} {v:.4g}",
                    series=key, layer=labels[i])
    if len(series) > 1:
        for _, label, color in series:
            c.add_legend(label, color)
    return Plot("layer-error", c.svg(), "Error per layer after the step, lower is better: the step's own measure "
                "(output error on calibration data, or weight MSE without it; see each layer's note)"
                + (("; grey bars are the same layer pruned by magnitude at the same sparsity, for comparison."
                    if pruning else "; grey bars are the same layer rounded to nearest (RTN), for comparison.")
                   if len(series) > 1 else ".") + (" Log scale." if log else "") + note)


def layer_sqnr(layers: list[dict], step: int | None = None, cap: int = MAX_BARS) -> Plot:
    """Bars per layer: signal-to-quantization-noise ratio of the weights in dB (higher is better)."""
    rows = [r for r in layers or [] if isinstance(r, dict) and finite(r.get("sqnr_db"))]
    if not rows:
        raise PlotSkipped("no layer has an SQNR")
    rows, note = cap_rows(rows, cap, lambda r: -r["sqnr_db"])
    vals = [r["sqnr_db"] for r in rows]
    labels = [str(r.get("name", "?")) for r in rows]
    w = bar_width(len(rows))
    c = Chart(f"Per-layer SQNR{f' (step {step})' if step is not None else ''}", width=w, bottom=band_bottom(labels, w))
    y = c.yscale(min(0.0, min(vals)), max(0.0, max(vals)))
    xb = Band(labels, c.x0, c.x1)
    c.axes(xb, y, ylabel="SQNR (dB)")
    for i, v in enumerate(vals):
        bar(c, xb, y, i, 0, 1, v, PALETTE[2], f"{labels[i]}: {v:.2f} dB", series="sqnr_db", layer=labels[i])
    return Plot("layer-sqnr", c.svg(), "Weight SQNR per layer in dB, higher is better (the lowest shown when "
                "capped)." + note)


def _hist(h) -> tuple[list[float], list[float]] | None:
    if not isinstance(h, dict):
        return None
    edges, counts = h.get("edges"), h.get("counts")
    if not isinstance(edges, list) or not isinstance(counts, list) or len(edges) != len(counts) + 1 or not counts:
        return None
    if not all(finite(v) for v in edges + counts):
        return None
    if len(counts) > MAX_BINS:  # merge neighbours: k bins into one
        k = -(-len(counts) // MAX_BINS)
        counts = [sum(counts[i:i + k]) for i in range(0, len(counts), k)]
        edges = edges[::k] + ([edges[-1]] if (len(edges) - 1) % k else [])
    return edges, counts


def weight_hist(entry: dict) -> Plot:
    """Histogram of a layer's weights before (bars) and after (outline) the step, with the
    quantization grid as vertical ticks and pruning thresholds +-t as dashed lines."""
    h = _hist(entry.get("hist"))
    if h is None:
        raise PlotSkipped("no valid histogram (edges must be one longer than counts, all finite)")
    edges, counts = h
    after = _hist(entry.get("hist_after"))
    grid = [g for g in entry.get("grid") or [] if finite(g)]
    thr = sorted({abs(t) for t in entry.get("thresholds") or [] if finite(t)})
    xs = edges + (after[0] if after else []) + grid + thr + [-t for t in thr]
    top = max(counts + (after[1] if after else []))
    if top <= 0:
        raise PlotSkipped("every histogram count is zero")
    layer, fmt = entry.get("layer", "?"), entry.get("format") or ""
    c = Chart(f"Weights of {short(layer, 40)}" + (f" ({fmt})" if fmt else ""), height=260)
    x, y = c.xscale(min(xs), max(xs)), c.yscale(0, top)
    c.axes(x, y, xlabel="weight value", ylabel="count")
    for i, n in enumerate(counts):
        x0, x1 = x(edges[i]), x(edges[i + 1])
        c.marks.append(rect(x0, y(n), max(x1 - x0, 0.5), y(0) - y(n), "#8fb3e8", mark="bar",
                            tip=f"[{edges[i]:.4g}, {edges[i + 1]:.4g}): {n:g}", series="before", value=n))
    c.add_legend("original", "#8fb3e8")
    if after:
        e2, n2 = after
        pts = [(x(e2[0]), y(0))]
        for i, n in enumerate(n2):
            pts += [(x(e2[i]), y(n)), (x(e2[i + 1]), y(n))]
        pts.append((x(e2[-1]), y(0)))
        c.marks.append(polyline(pts, PALETTE[1], mark="hist-after", width=1.4, tip="after the step"))
        c.add_legend("after the step", PALETTE[1], "line")
    if grid:
        for i in downsample(sorted(grid), MAX_GRID):
            g = sorted(grid)[i]
            c.marks.append(line(x(g), c.y0, x(g), c.y1, "#1b7a43", mark="grid", width=0.8, value=g))
        c.add_legend(f"quantization grid ({len(grid)} values)", "#1b7a43", "line")
    for t in thr:
        for s in (-t, t):
            c.marks.append(line(x(s), c.y0, x(s), c.y1, PALETTE[3], mark="threshold", dash=True, value=s,
                                tip=f"pruning threshold {s:.4g}"))
    if thr:
        c.add_legend("pruning threshold", PALETTE[3], "dash")
    step = entry.get("step")
    return Plot("weight-hist", c.svg(), f"Weight histogram of {layer}"
                + (f" at step {step}" if step is not None else "") + ": bars before the step"
                + (", outline after it (dequantized)" if after else "")
                + ("; green ticks are the values one quantization group can represent" if grid else "")
                + ("; dashed lines are the pruning magnitude thresholds" if thr else "") + ".")


def staircase(d: dict) -> Plot:
    """w_hat against w for one quantization group: the step function and the identity line."""
    w, wh = d.get("w") or [], d.get("w_hat") or []
    pairs = sorted((a, b) for a, b in zip(w, wh) if finite(a) and finite(b))
    if len(pairs) < 2:
        raise PlotSkipped("fewer than two (w, w_hat) pairs")
    pairs = [pairs[i] for i in downsample(pairs, 512)]
    lo = min(min(a, b) for a, b in pairs)
    hi = max(max(a, b) for a, b in pairs)
    c = Chart(f"Quantization staircase: {short(d.get('layer', '?'), 36)} ({d.get('format') or '?'})",
              width=520, height=420)
    x, y = c.xscale(lo, hi), c.yscale(lo, hi)
    c.axes(x, y, xlabel="original weight w", ylabel="quantized w\u0302")
    c.marks.append(line(x(x.lo), y(x.lo), x(x.hi), y(x.hi), "#999", mark="identity", dash=True, width=1))
    pts = []
    for i, (a, b) in enumerate(pairs):
        pts.append((x(a), y(b)))
        if i + 1 < len(pairs):
            pts.append((x(pairs[i + 1][0]), y(b)))
    c.marks.append(polyline(pts, PALETTE[0], mark="step"))
    for a, b in pairs:
        c.marks.append(circle(x(a), y(b), 2, PALETTE[0], tip=f"w {a:.4g} -> {b:.4g}", w=a, w_hat=b))
    c.add_legend("w\u0302(w)", PALETTE[0], "line")
    c.add_legend("identity", "#999", "dash")
    levels = len({b for _, b in pairs})
    return Plot("staircase", c.svg(), f"One real quantization group of {d.get('layer', '?')}: each weight "
                f"against the value it is stored as ({len(pairs)} weights on {levels} levels). The distance to "
                "the dashed identity line is the rounding error.")


def sensitivity(entries: list[dict], cap: int = MAX_BARS) -> Plot:
    """Per-layer error at each candidate bit width (log scale), the chosen width outlined."""
    rows = [e for e in entries or [] if isinstance(e, dict) and isinstance(e.get("errors"), dict)]
    widths = sorted({int(k) for e in rows for k in e["errors"] if str(k).isdigit()})
    pos = [v for e in rows for v in e["errors"].values() if finite(v) and v > 0]
    if not rows or not widths or not pos:
        raise PlotSkipped("no positive sensitivity errors")
    rows, note = cap_rows(rows, cap, lambda e: max([v for v in e["errors"].values() if finite(v)] or [0]))
    labels = [str(e.get("layer", "?")) for e in rows]
    w = bar_width(round(len(rows) * 1.5))
    c = Chart("Layer sensitivity: error per bit width", width=w, bottom=band_bottom(labels, w))
    y = c.yscale(min(pos), max(pos), log=True)
    xb = Band(labels, c.x0, c.x1, pad=0.15)
    c.axes(xb, y, ylabel="error (log)")
    dropped = 0
    for i, e in enumerate(rows):
        errs = {int(k): v for k, v in e["errors"].items() if str(k).isdigit()}
        for j, b in enumerate(widths):
            v = errs.get(b)
            if not finite(v) or v <= 0:
                dropped += v is not None
                continue
            chosen = e.get("bits") == b
            extra = ' stroke="#111" stroke-width="1.5"' if chosen else ' fill-opacity="0.45"'
            bar(c, xb, y, i, j, len(widths), v, PALETTE[j % len(PALETTE)],
                f"{labels[i]}: {b}-bit error {v:.4g}" + (" (chosen)" if chosen else ""), extra=extra,
                layer=labels[i], bits=b, chosen=str(chosen).lower())
    for j, b in enumerate(widths):
        c.add_legend(f"{b}-bit", PALETTE[j % len(PALETTE)])
    c.add_legend("chosen: solid, outlined", "#111", "line")
    return Plot("sensitivity", c.svg(), "Error of each layer quantized at each candidate bit width (log scale); "
                "the width the allocation chose is solid and outlined." + note
                + (f" {dropped} zero or negative errors are not drawn on the log axis." if dropped else ""))


def svd_energy(entries: list[dict], cap: int = MAX_CURVES) -> Plot:
    """Cumulative singular-value energy per rank for each layer, the kept rank marked.
    An entry's "energy" is the curve at ranks 1, 2, ..., or at the ranks its "ranks" lists
    (a downsampled curve)."""
    rows = []
    for e in entries or []:
        pts = _energy_points(e) if isinstance(e, dict) else []
        if pts:
            rows.append((e, pts))
    if not rows:
        raise PlotSkipped("no energy curves")
    note = f" Showing {cap} of {len(rows)} layers." if len(rows) > cap else ""
    rows = rows[:cap]
    n = max(pts[-1][0] for _, pts in rows)
    c = Chart("Singular-value energy kept per rank", height=320)
    x, y = c.xscale(1, max(n, 2)), c.yscale(0, 1)
    c.axes(x, y, xlabel="rank", ylabel="cumulative energy")
    for k, (e, pts) in enumerate(rows):
        color, name = PALETTE[k % len(PALETTE)], str(e.get("layer", "?"))
        idx = downsample(pts, 300)
        c.marks.append(polyline([(x(pts[i][0]), y(pts[i][1])) for i in idx], color, tip=name, layer=name))
        r = e.get("rank")
        at = dict(pts)
        if isinstance(r, int) and r in at:
            c.marks.append(circle(x(r), y(at[r]), 4.5, color, mark="kept", layer=name, rank=r,
                                  tip=f"{name}: rank {r} keeps {100 * at[r]:.1f}% of the energy",
                                  extra=' stroke="#111" stroke-width="1"'))
        c.add_legend(short(name, 18), color, "line")
    return Plot("svd-energy", c.svg(), "Fraction of each weight matrix's squared singular values kept by the "
                "first r ranks; the dot marks the rank kept." + note)


def _energy_points(e: dict) -> list[tuple[int, float]]:
    """(rank, energy) pairs of an entry, in rank order; unreadable points dropped."""
    en = e.get("energy") or []
    ranks = e.get("ranks")
    if not isinstance(ranks, list) or len(ranks) != len(en):
        ranks = list(range(1, len(en) + 1))
    return sorted((r, v) for r, v in zip(ranks, en) if isinstance(r, int) and r >= 1 and finite(v))

