"""The evidence of an early_exit step in a report: the exits and their heads, each exit's
quality alone, and the trade-off across confidence thresholds (quality against the mean
depth and compute run, the batch-1 latency), as a table and a plot (seed 004's curve)."""
from __future__ import annotations

from .plots import Plot
from .svg import PALETTE, Chart, PlotSkipped, circle, esc, finite, polyline, text
from .text import figure, num, table


def _pct(v) -> str:
    return f"{100 * v:.1f}" if finite(v) else "\u2014"


def tradeoff_plot(rows: list[dict], chosen=None) -> Plot:
    pts = [r for r in rows if isinstance(r, dict) and finite(r.get("quality"))
           and finite(r.get("compute_fraction", r.get("depth_fraction")))]
    if len(pts) < 2:
        raise PlotSkipped("fewer than two thresholds with a quality and a depth")
    key = "compute_fraction" if all(finite(r.get("compute_fraction")) for r in pts) else "depth_fraction"
    xs, ys = [float(r[key]) for r in pts], [float(r["quality"]) for r in pts]
    c = Chart("Early exit: quality against the computation run", height=300)
    x, y = c.xscale(min(0.0, min(xs)), max(1.0, max(xs))), c.yscale(min(ys), max(ys))
    what = "mean compute per sample (fraction of the full model's MACs)" if key == "compute_fraction" else \
        "mean depth (fraction of the layers)"
    c.axes(x, y, xlabel=what, ylabel=str(pts[0].get("quality_name") or "quality"))
    order = sorted(range(len(pts)), key=lambda i: xs[i])
    c.marks.append(polyline([(x(xs[i]), y(ys[i])) for i in order], PALETTE[0], tip="thresholds"))
    for i, r in enumerate(pts):
        t = r.get("threshold")
        mine = chosen is not None and t == chosen
        c.marks.append(circle(x(xs[i]), y(ys[i]), 5 if mine else 3.5, PALETTE[1] if mine else PALETTE[0],
                              mark="threshold", threshold=t,
                              tip=f"threshold {t}: {num(ys[i])} at {_pct(xs[i])}% of the compute"))
        c.overlay.append(text(x(xs[i]) + 6, y(ys[i]) - 6, f"{t:g}" if finite(t) else "?", 9, fill="#555"))
    c.add_legend("threshold", PALETTE[0], "dot")
    if chosen is not None:
        c.add_legend("the step's threshold", PALETTE[1], "dot")
    return Plot("early-exit-tradeoff", c.svg(), "Each point is one confidence threshold: samples leave at the "
                "first exit whose top probability reaches it. Lower thresholds run less and risk more.")


def early_exit_details(details) -> str:
    ee = details.get("early_exit") if isinstance(details, dict) else None
    if not isinstance(ee, dict):
        return ""
    heads = [h for h in ee.get("heads") or [] if isinstance(h, dict)]
    out = [f"<p>Early exit: exits after layers {esc(ee.get('exits'))} of {esc(ee.get('layers', '?'))}, "
           f"{esc(ee.get('head_params', '?'))} head parameters against the model's {esc(ee.get('model_params', '?'))}; "
           f"threshold {esc(ee.get('threshold'))}; "
           f"{'the base trained too' if ee.get('train_base') else 'the base frozen (full depth unchanged)'}; "
           f"loss: {esc(ee.get('loss', '?'))}.</p>"]
    if heads:
        out.append(table(["exit after layer", "layers run", "head input", "pool", "parameters"],
                         [[str(h.get("exit")), str(h.get("layers_run")), str(h.get("in_features")),
                           str(h.get("pool")), str(h.get("params"))] for h in heads], "num early-exit-heads"))
    eq = [q for q in ee.get("exit_quality") or [] if isinstance(q, dict)]
    if eq:
        def label(q: dict) -> str:
            return "final head" if q.get("exit") == "final" else f"exit after layer {esc(q.get('exit'))}"

        out.append("<p>Each exit alone: " + ", ".join(f"{label(q)} {num(q.get('value'))}" for q in eq)
                   + f" ({esc(eq[0].get('name', 'quality'))}).</p>")
    rows = [r for r in ee.get("tradeoff") or [] if isinstance(r, dict)]
    if rows:
        body = []
        for r in rows:
            fr = r.get("fractions") if isinstance(r.get("fractions"), list) else []
            body.append([num(r.get("threshold")), num(r.get("quality")), " / ".join(_pct(f) for f in fr) or "\u2014",
                         num(r.get("mean_layers"), ".2f"), _pct(r.get("depth_fraction")),
                         _pct(r.get("compute_fraction")), num(r.get("latency_ms"), ".3f")])
        name = rows[0].get("quality_name") or "quality"
        out.append(table(["threshold", str(name), "% leaving at each exit (final last)", "mean layers",
                          "depth %", "compute %", "batch-1 ms"], body, "num early-exit-tradeoff"))
        notes = [ee.get("quality_source"), ee.get("latency_note")]
        out.append("<p>" + esc("; ".join(n for n in notes if n)) + ".</p>")
        out.append(figure("early-exit-tradeoff", tradeoff_plot, rows, ee.get("threshold")))
    return "\n".join(out)
