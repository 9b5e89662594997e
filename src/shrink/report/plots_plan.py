"""The plots of deployment and search: memory fit per format (from a plan), the
roofline, and the size-quality Pareto front of a search."""
from __future__ import annotations

import re

from .plots import Plot, bar_width
from .svg import (PALETTE, Band, Chart, PlotSkipped, band_bottom, circle, finite, fmt_bytes, fmt_num, line,
                  polyline, rect, short, text)

FIT_COLORS = {True: ("#2a9d5b", "#8fd1a9", "#cdebd8"), False: ("#c0392b", "#e8948a", "#f4cdc8"),
              None: ("#3366cc", "#99b3e6", "#d0dcf3")}
_UNITS = {"B": 1, "kB": 1e3, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
          "KiB": 2 ** 10, "MiB": 2 ** 20, "GiB": 2 ** 30, "TiB": 2 ** 40}


def usable_memory(plan: dict) -> tuple[float, str] | None:
    """The device memory a plan fits against: `usable_bytes` when the plan has it as a
    number, else the last figure of its `usable_bytes` derivation, else the device's memory."""
    if finite(plan.get("usable_bytes")):
        return float(plan["usable_bytes"]), "usable memory"
    text_ = (plan.get("derivations") or {}).get("usable_bytes")
    if isinstance(text_, str):
        m = re.search(r"([\d][\d,]*\.?\d*)\s*(TiB|GiB|MiB|KiB|TB|GB|MB|kB|KB|B)\s*$", text_.split("=")[-1].strip())
        if m:
            return float(m.group(1).replace(",", "")) * _UNITS[m.group(2)], "usable memory"
    dev = plan.get("device") or {}
    if finite(dev.get("memory_bytes")):
        return float(dev["memory_bytes"]), "device memory"
    return None


def memory_fit(plan: dict) -> Plot:
    """A bar per format: weights + KV cache (+ activations) stacked, coloured by whether it
    fits, with the device's usable memory as a line."""
    fmts = [f for f in plan.get("formats") or [] if isinstance(f, dict) and finite(f.get("total_bytes"))
            and f["total_bytes"] >= 0]
    if not fmts:
        raise PlotSkipped("the plan lists no format with a total size")
    dev = plan.get("device")
    limit = usable_memory(plan) if dev else None
    labels = [str(f.get("name", "?")) for f in fmts]
    width = bar_width(len(fmts))
    c = Chart("Memory needed per format" + (f" on {(dev or {}).get('name', '?')}" if dev else ""),
              width=width, bottom=band_bottom(labels, width))
    biggest = max(f["total_bytes"] for f in fmts)
    off_scale = limit is not None and limit[0] > 5 * biggest  # drawn to scale, every bar would be a sliver
    top = max([biggest] + ([limit[0]] if limit and not off_scale else []))
    y, xb = c.yscale(0, 1.08 * top if top > 0 else 1), Band(labels, c.x0, c.x1, pad=0.3)  # room for the labels
    c.axes(xb, y, ylabel="bytes", yfmt=fmt_bytes)
    parts_seen = set()
    for i, f in enumerate(fmts):
        w = f.get("weight_bytes") if finite(f.get("weight_bytes")) else f["total_bytes"]
        kv = f.get("kv_cache_bytes") if finite(f.get("kv_cache_bytes")) else 0
        rest = max(f["total_bytes"] - w - kv, 0)
        fits = f.get("fits") if f.get("fits") in (True, False) else None
        colors, base = FIT_COLORS[fits], 0.0
        for part, v, color in (("weights", w, colors[0]), ("kv-cache", kv, colors[1]),
                               ("activations", rest, colors[2])):
            if v <= 0 and part != "weights":
                continue
            parts_seen.add((part, fits))
            c.marks.append(rect(xb.start(i), y(base + v), xb.width, y(base) - y(base + v), color,
                                tip=f"{labels[i]}: {part} {fmt_bytes(v)}", format=labels[i], part=part,
                                value=v, fits=str(fits).lower()))
            base += v
        c.overlay.append(text(xb.center(i), y(base) - 4, fmt_bytes(base), 9, "middle", "#333"))
    for fits, label in ((True, "weights (fits)"), (False, "weights (does not fit)"), (None, "weights")):
        if ("weights", fits) in parts_seen:
            c.add_legend(label, FIT_COLORS[fits][0])
    if any(p == "kv-cache" for p, _ in parts_seen):
        c.add_legend("KV cache (lighter)", "#bbbbbb")
    if any(p == "activations" for p, _ in parts_seen):
        c.add_legend("activations (lightest)", "#dddddd")
    if off_scale:
        c.overlay.append(text(c.x1 - 4, c.y0 + 12, f"{limit[1]} {fmt_bytes(limit[0])}: far above every bar "
                              f"({limit[0] / biggest:,.0f}\u00d7 the largest)", 10, "end", "#111"))
    elif limit:
        py = y(limit[0])
        c.marks.append(line(c.x0, py, c.x1, py, "#111", mark="limit", dash=True, value=limit[0],
                            tip=f"{limit[1]}: {fmt_bytes(limit[0])}"))
        c.overlay.append(text(c.x1 - 4, py - 4, f"{limit[1]} {fmt_bytes(limit[0])}", 10, "end", "#111"))
        c.add_legend(limit[1], "#111", "dash")
    return Plot("memory-fit", c.svg(), "Bytes each format needs: weights, then KV cache and activations stacked "
                "on top; green fits the device, red does not" + (f"; the dashed line is the {limit[1]}"
                                                                 if limit and not off_scale else "") + ".")


def _fmt_flops(v: float) -> str:
    for unit, f in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if v >= f:
            return f"{v / f:.3g}{unit}"
    return fmt_num(v)


def roofline(d: dict) -> Plot:
    """Log-log roofline: attainable FLOP/s = min(peak, bandwidth x intensity) per peak,
    the ridge points, and the model's operating points labelled."""
    bw = d.get("bandwidth_bytes_per_s")
    if not finite(bw) or bw <= 0:
        raise PlotSkipped("no positive memory bandwidth")
    roofs: dict[float, list[str]] = {}
    for name, p in (d.get("peak_flops") or {}).items():
        if finite(p) and p > 0:
            roofs.setdefault(float(p), []).append(str(name))
    if not roofs:
        raise PlotSkipped("no positive peak FLOP/s")
    pts = [p for p in d.get("points") or [] if isinstance(p, dict) and finite(p.get("intensity"))
           and finite(p.get("flops_per_s")) and p["intensity"] > 0 and p["flops_per_s"] > 0]
    dropped = len(d.get("points") or []) - len(pts)
    ridges = [p / bw for p in roofs]
    xlo = min([min(ridges) / 100] + [p["intensity"] / 3 for p in pts])
    xhi = max([max(ridges) * 4] + [p["intensity"] * 3 for p in pts])
    ylo = min([bw * xlo] + [p["flops_per_s"] / 3 for p in pts])
    yhi = max(roofs) * 2
    c = Chart(f"Roofline of {d.get('device') or 'the device'}", height=360)
    x, y = c.xscale(xlo, xhi, log=True), c.yscale(ylo, yhi, log=True)
    c.axes(x, y, xlabel="arithmetic intensity (FLOP/byte)", ylabel="attainable FLOP/s", yfmt=_fmt_flops)
    for k, (peak, names) in enumerate(sorted(roofs.items())):
        color, label, ridge = PALETTE[k % len(PALETTE)], "/".join(names), peak / bw
        curve = [(x.lo, min(peak, bw * x.lo))] + ([(ridge, peak)] if x.lo < ridge < x.hi else []) + [(x.hi, peak)]
        c.marks.append(polyline([(x(a), y(b)) for a, b in curve], color, mark="roof", roof=label, peak=peak,
                                tip=f"{label}: peak {_fmt_flops(peak)}FLOP/s"))
        if x.lo < ridge < x.hi:
            c.marks.append(circle(x(ridge), y(peak), 3.5, color, mark="ridge", roof=label, intensity=ridge,
                                  tip=f"ridge {label}: {ridge:.3g} FLOP/byte"))
        c.add_legend(f"{label} {_fmt_flops(peak)}FLOP/s", color, "line")
    merged: dict[tuple[float, float], list[str]] = {}  # formats at the same point share one dot
    for p in pts:
        merged.setdefault((float(p["intensity"]), float(p["flops_per_s"])), []).append(str(p.get("label", "")))
    numbered = len(merged) > 3
    key = []
    for n, ((ix, fl), labels) in enumerate(sorted(merged.items()), 1):
        label = " / ".join(labels)
        px, py = x(ix), y(fl)
        c.marks.append(circle(px, py, 5, "#111", tip=f"{label}: {ix:.3g} FLOP/byte, {_fmt_flops(fl)}FLOP/s",
                              label=label, intensity=ix, flops_per_s=fl))
        tag = str(n) if numbered else short(label, 28)
        right = px > c.x1 - 140
        dy = 6 + 11 * ((n - 1) % 3) if numbered else 6  # stagger the numbers of neighbouring dots
        c.overlay.append(text(px - 7 if right else px + 7, py - dy, tag, 10, "end" if right else "start", "#111"))
        key.append(f"{n} {label} ({ix:.3g} FLOP/byte, {_fmt_flops(fl)}FLOP/s)")
    return Plot("roofline", c.svg(), f"Bandwidth {bw / 1e9:,.0f} GB/s: left of its ridge a kernel is memory-bound "
                "(the sloped line), right of it compute-bound (the flat line); dots are this model's operating points"
                + (": " + "; ".join(key) if numbered else "") + "."
                + (f" {dropped} points without positive values are not drawn." if dropped else ""))


def quality_limits(constraints: dict, baseline_quality) -> list[tuple[str, float]]:
    """Quality lines to draw: the search's `quality_floor` when recorded, else the minimum
    quality and the max drop turned into a quality (relative to the baseline: x (1 - drop%)
    for higher-is-better, x (1 + drop%) otherwise)."""
    out = []
    if finite(constraints.get("quality_floor")):  # the search's own floor: max drop and min quality combined
        return [("quality floor", float(constraints["quality_floor"]))]
    if finite(constraints.get("min_quality")):
        out.append(("min quality", float(constraints["min_quality"])))
    drop = constraints.get("max_drop")
    if finite(drop) and finite(baseline_quality):
        hib = constraints.get("higher_is_better", True) is not False
        out.append((f"max drop {drop:g}%", baseline_quality * (1 - drop / 100 if hib else 1 + drop / 100)))
    return out


def pareto(candidates: list[dict], chosen: dict | None, constraints: dict | None,
           baseline_quality: float | None = None) -> Plot:
    """Quality against size for every candidate; the Pareto front joined, the chosen one
    ringed, the constraints as dashed lines."""
    cons = constraints or {}
    pts = [c_ for c_ in candidates or [] if isinstance(c_, dict) and finite(c_.get("size_bytes"))
           and c_["size_bytes"] > 0 and finite((c_.get("quality") or {}).get("value"))]
    if not pts:
        raise PlotSkipped("no candidate has both a size and a quality")
    missing = len(candidates) - len(pts)
    sizes = [p["size_bytes"] for p in pts]
    qs = [p["quality"]["value"] for p in pts]
    qname = cons.get("quality_name") or pts[0]["quality"].get("name") or "quality"
    limits = quality_limits(cons, baseline_quality)
    max_size = cons.get("max_size_bytes") if finite(cons.get("max_size_bytes")) else None
    xs = sizes + ([max_size] if max_size and max_size > 0 else [])
    ys = qs + [v for _, v in limits]
    log = max(xs) / min(xs) > 20
    c = Chart("Size and quality of the candidates", height=360)
    dx, dy = 0.06 * (max(xs) - min(xs)), 0.06 * (max(ys) - min(ys))  # no point on the frame
    x = c.xscale(min(xs) * 0.8, max(xs) * 1.25, log=True) if log else c.xscale(max(min(xs) - dx, 0), max(xs) + dx)
    y = c.yscale(min(ys) - dy, max(ys) + dy)
    hib = cons.get("higher_is_better", True) is not False
    c.axes(x, y, xlabel="size (bytes)" + (", log" if log else ""),
           ylabel=f"{qname} ({'higher' if hib else 'lower'} is better)", xfmt=fmt_bytes)
    # the search's front also weighs latency; in this plane its size x quality front is the one to join
    fk = "on_front_size_quality" if any("on_front_size_quality" in p for p in pts) else "on_front"
    front = sorted((p for p in pts if p.get(fk)), key=lambda p: p["size_bytes"])
    if len(front) > 1:
        c.marks.append(polyline([(x(p["size_bytes"]), y(p["quality"]["value"])) for p in front], PALETTE[0],
                                mark="front", tip="Pareto front"))
    proxy_only = [p for p in pts if p.get("stage") == "proxy"]
    for p in pts:
        proxy = p.get("stage") == "proxy"  # scored on the proxy's smaller data: not the same scale
        feas = p.get("feasible") is not False or proxy
        extra = "" if feas else f' fill-opacity="0.15" stroke="{PALETTE[0]}" stroke-width="1.2"'
        px, py = x(p["size_bytes"]), y(p["quality"]["value"])
        name = str(p.get("name", "?"))
        colour = "#c9ced8" if proxy else (PALETTE[0] if p.get(fk) else "#8a94a8")
        c.marks.append(circle(px, py, 3 if proxy else (5 if p.get(fk) else 4), colour,
                              extra=extra, name=name, size_bytes=p["size_bytes"], quality=p["quality"]["value"],
                              on_front=str(bool(p.get(fk))).lower(), feasible=str(feas).lower(),
                              stage=p.get("stage") or "", tip=f"{name}: {fmt_bytes(p['size_bytes'])}, "
                              f"{qname} {p['quality']['value']:.4g}" + ("" if feas else " (infeasible)")))
        if len(pts) <= 14:
            right = px > c.x1 - 90
            label = short(name, 20) + (" (proxy)" if proxy else "")
            c.overlay.append(text(px - 7 if right else px + 7, py - 6, label, 9, "end" if right else "start",
                                  "#333"))
    if chosen and finite(chosen.get("size_bytes")) and finite((chosen.get("quality") or {}).get("value")):
        c.marks.append(circle(x(chosen["size_bytes"]), y(chosen["quality"]["value"]), 9, "none", mark="chosen",
                              extra=f' stroke="{PALETTE[3]}" stroke-width="2.5"', name=str(chosen.get("name", "?")),
                              tip=f"chosen: {chosen.get('name', '?')}"))
        c.add_legend("chosen", PALETTE[3], "dot")
    c.add_legend("on the front", PALETTE[0], "dot")
    c.add_legend("dominated", "#8a94a8", "dot")
    if proxy_only:
        c.add_legend("proxy only", "#c9ced8", "dot")
    if max_size:
        c.marks.append(line(x(max_size), c.y0, x(max_size), c.y1, PALETTE[3], mark="constraint", dash=True,
                            value=max_size, tip=f"max size {fmt_bytes(max_size)}"))
        c.overlay.append(text(x(max_size) - 4, c.y0 + 12, f"max size {fmt_bytes(max_size)}", 10, "end",
                              PALETTE[3]))
    for label, v in limits:
        c.marks.append(line(c.x0, y(v), c.x1, y(v), PALETTE[1], mark="constraint", dash=True, value=v,
                            tip=f"{label}: {qname} {v:.4g}"))
        c.overlay.append(text(c.x0 + 4, y(v) - 4, f"{label} ({v:.4g})", 10, fill=PALETTE[1]))
    if max_size or limits:
        c.add_legend("constraint", PALETTE[3], "dash")
    return Plot("pareto", c.svg(), f"Every candidate's stored size against its {qname}; the line joins the "
                "candidates no other beats on both" + (" (the table's front also weighs latency)"
                                                        if fk != "on_front" else "") + ". Hollow points break a constraint." +
                (f" {missing} candidates without a size or quality are not drawn." if missing else "") +
                (" Light points were only screened on the proxy (a quarter of the data): their quality is on "
                 "that smaller sample, not the same scale as the fully evaluated ones." if proxy_only else ""))
