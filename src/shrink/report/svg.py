"""SVG primitives for the report: scales with nice ticks, and a chart frame with
axes, a legend and one group of marks. No plotting library: string building,
every piece of text escaped.

The marks group carries its axis transform as data attributes
(`data-x-scale="linear|log|band"`, `data-x-domain="lo hi"`, `data-x-range="r0 r1"`,
the same for y), so a reader (or a test) can map any mark back to data.
"""
from __future__ import annotations

import math
from html import escape

PALETTE = ("#3366cc", "#dc7a12", "#2a9d5b", "#c0392b", "#8e44ad", "#16a2b8",
           "#b5892e", "#e377c2", "#555555", "#17becf", "#7f7f00", "#1f3a93")


class PlotSkipped(Exception):
    """The data cannot be drawn (empty, all missing, nothing positive on a log
    axis...); the message says why, and the page shows it instead of the plot."""


def finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def esc(v) -> str:
    return escape(str(v), quote=True)


def fmt_num(v: float) -> str:
    """Compact tick label: 0, 12, 0.25, 1.5k, 3e-5."""
    if v == 0:
        return "0"
    a = abs(v)
    if 1e-3 <= a < 1e4:
        s = f"{v:.4g}"
    elif 1e4 <= a < 1e6:
        s = f"{v / 1e3:.4g}k"
    else:
        s = f"{v:.2g}".replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")
    return s


def fmt_bytes(v: float) -> str:
    for unit, f in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(v) >= f:
            return f"{v / f:.3g} {unit}"
    return f"{v:.3g} B"


def _f(v: float) -> str:
    """A coordinate: two decimals, no trailing zeros."""
    s = f"{v:.2f}".rstrip("0").rstrip(".")
    return "0" if s == "-0" else s


def nice_step(span: float, n: int) -> float:
    raw = span / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


class Scale:
    """A continuous axis: data [lo, hi] -> pixels [r0, r1], linear or log10."""

    def __init__(self, lo: float, hi: float, r0: float, r1: float, log: bool = False, nice: bool = True):
        if not (finite(lo) and finite(hi)):
            raise PlotSkipped("no finite values to draw")
        if log and (lo <= 0 or hi <= 0):
            raise PlotSkipped("a log axis needs positive values")
        lo, hi = min(lo, hi), max(lo, hi)
        if lo == hi:  # one value: widen around it
            if log:
                lo, hi = lo / 2, hi * 2
            else:
                d = abs(lo) * 0.1 or 1.0
                lo, hi = lo - d, hi + d
        if nice and log:
            a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
            if b - a <= 8:
                lo, hi = 10.0 ** a, 10.0 ** b
        elif nice:
            step = nice_step(hi - lo, 5)
            lo, hi = math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step
        self.lo, self.hi, self.r0, self.r1, self.log = lo, hi, r0, r1, log

    def _t(self, v: float) -> float:
        return math.log10(v) if self.log else v

    def __call__(self, v: float) -> float:
        if self.log:
            v = max(v, self.lo * 1e-3)  # never log(0): a non-positive value sits below the axis
        t = (self._t(v) - self._t(self.lo)) / (self._t(self.hi) - self._t(self.lo))
        return self.r0 + t * (self.r1 - self.r0)

    def invert(self, px: float) -> float:
        t = (px - self.r0) / (self.r1 - self.r0)
        v = self._t(self.lo) + t * (self._t(self.hi) - self._t(self.lo))
        return 10 ** v if self.log else v

    def ticks(self) -> list[float]:
        if self.log:
            a, b = math.ceil(math.log10(self.lo) - 1e-9), math.floor(math.log10(self.hi) + 1e-9)
            decades = [10.0 ** e for e in range(a, b + 1)]
            if len(decades) >= 2:
                k = max(1, math.ceil(len(decades) / 8))
                return decades[::k]
            out = [m * 10.0 ** e for e in range(a - 1, b + 1) for m in (1, 2, 5)]
            return [t for t in out if self.lo * (1 - 1e-9) <= t <= self.hi * (1 + 1e-9)] or [self.lo, self.hi]
        step = nice_step(self.hi - self.lo, 5)
        first = math.ceil(self.lo / step - 1e-9)
        out, i = [], first
        while i * step <= self.hi + step * 1e-9 and len(out) < 20:
            out.append(round(i * step, 12))
            i += 1
        return out

    def attrs(self, axis: str) -> str:
        return (f' data-{axis}-scale="{"log" if self.log else "linear"}" data-{axis}-domain="{self.lo!r} {self.hi!r}"'
                f' data-{axis}-range="{self.r0!r} {self.r1!r}"')


class Band:
    """A categorical axis: n equal bands over [r0, r1]."""

    log = False

    def __init__(self, labels: list[str], r0: float, r1: float, pad: float = 0.2):
        if not labels:
            raise PlotSkipped("nothing to draw")
        self.labels, self.r0, self.r1, self.pad = labels, r0, r1, pad
        self.step = (r1 - r0) / len(labels)

    def start(self, i: int) -> float:
        return self.r0 + i * self.step + self.step * self.pad / 2

    @property
    def width(self) -> float:
        return self.step * (1 - self.pad)

    def center(self, i: int) -> float:
        return self.r0 + (i + 0.5) * self.step

    def attrs(self, axis: str) -> str:
        return f' data-{axis}-scale="band" data-{axis}-domain="0 {len(self.labels)}" data-{axis}-range="{self.r0!r} {self.r1!r}"'


def _data(data: dict) -> str:
    return "".join(f' data-{k.replace("_", "-")}="{esc(v)}"' for k, v in data.items())


def _tip(tip: str | None) -> str:
    return f"<title>{esc(tip)}</title>" if tip else ""


def rect(x, y, w, h, fill, mark="bar", tip=None, extra="", **data) -> str:
    return (f'<rect data-mark="{mark}" x="{_f(x)}" y="{_f(y)}" width="{_f(max(w, 0))}" height="{_f(max(h, 0))}" '
            f'fill="{fill}"{extra}{_data(data)}>{_tip(tip)}</rect>')


def circle(cx, cy, r, fill, mark="point", tip=None, extra="", **data) -> str:
    return (f'<circle data-mark="{mark}" cx="{_f(cx)}" cy="{_f(cy)}" r="{_f(r)}" fill="{fill}"{extra}{_data(data)}>'
            f'{_tip(tip)}</circle>')


def line(x1, y1, x2, y2, stroke, mark="line", dash=False, width=1.5, tip=None, **data) -> str:
    d = ' stroke-dasharray="5 3"' if dash else ""
    return (f'<line data-mark="{mark}" x1="{_f(x1)}" y1="{_f(y1)}" x2="{_f(x2)}" y2="{_f(y2)}" stroke="{stroke}" '
            f'stroke-width="{width}"{d}{_data(data)}>{_tip(tip)}</line>')


def polyline(points, stroke, mark="line", dash=False, width=1.8, tip=None, **data) -> str:
    pts = " ".join(f"{_f(x)},{_f(y)}" for x, y in points)
    d = ' stroke-dasharray="5 3"' if dash else ""
    return (f'<polyline data-mark="{mark}" points="{pts}" fill="none" stroke="{stroke}" stroke-width="{width}"'
            f' stroke-linejoin="round"{d}{_data(data)}>{_tip(tip)}</polyline>')


def text(x, y, s, size=11, anchor="start", fill="#222", extra="") -> str:
    return f'<text x="{_f(x)}" y="{_f(y)}" font-size="{size}" text-anchor="{anchor}" fill="{fill}"{extra}>{esc(s)}</text>'


def short(label: str, n: int = 22) -> str:
    """Long layer names keep their tail, the informative end."""
    label = str(label)
    return label if len(label) <= n else "\u2026" + label[-(n - 1):]


def rotated(labels: list[str], step: float) -> bool:
    """Whether category labels are drawn at 45 degrees: many of them, or too wide for their band."""
    return len(labels) > 6 or max(len(short(s)) for s in labels) * 6 > step


def band_bottom(labels: list[str], width: int, left: int = 66, right: int = 18) -> int:
    """The bottom margin a band axis needs for its labels."""
    if not labels or not rotated(labels, (width - left - right) / len(labels)):
        return 46
    return min(120, 24 + int(3.9 * max(len(short(s)) for s in labels)))


def downsample(xs: list, n: int = 400) -> list[int]:
    """Indices of at most n evenly spaced items, first and last kept."""
    if len(xs) <= n:
        return list(range(len(xs)))
    step = (len(xs) - 1) / (n - 1)
    return sorted({round(i * step) for i in range(n)})


class Chart:
    """One plot: a frame, two axes, marks, overlays and a legend, rendered as <svg>."""

    def __init__(self, title: str, width: int = 640, height: int = 300, bottom: int = 46, left: int = 66):
        self.title, self.width, self.height = title, width, height
        self.left, self.right, self.top, self.bottom = left, 18, 46, bottom
        self.x0, self.x1 = left, width - self.right
        self.y0, self.y1 = self.top, height - bottom  # pixel top and bottom of the plot area
        self.marks: list[str] = []
        self.overlay: list[str] = []
        self.legend: list[tuple[str, str, str]] = []
        self.x = self.y = None
        self.xlabel = self.ylabel = ""
        self.xfmt = self.yfmt = fmt_num

    def xscale(self, lo, hi, log=False, nice=True) -> Scale:
        return Scale(lo, hi, self.x0, self.x1, log=log, nice=nice)

    def yscale(self, lo, hi, log=False, nice=True) -> Scale:
        return Scale(lo, hi, self.y1, self.y0, log=log, nice=nice)

    def axes(self, x, y, xlabel="", ylabel="", xfmt=fmt_num, yfmt=fmt_num) -> None:
        self.x, self.y, self.xlabel, self.ylabel, self.xfmt, self.yfmt = x, y, xlabel, ylabel, xfmt, yfmt

    def add_legend(self, label: str, color: str, kind: str = "box") -> None:
        self.legend.append((label, color, kind))

    def _axes_svg(self) -> list[str]:
        out = [f'<rect x="{self.x0}" y="{self.y0}" width="{self.x1 - self.x0}" height="{self.y1 - self.y0}" '
               f'fill="#fbfbfd" stroke="#ccc"/>']
        for t in self.y.ticks():
            py = self.y(t)
            out.append(f'<line x1="{self.x0}" y1="{_f(py)}" x2="{self.x1}" y2="{_f(py)}" stroke="#e6e6ea"/>')
            out.append(text(self.x0 - 5, py + 3.5, self.yfmt(t), 10, "end", "#444"))
        if isinstance(self.x, Band):
            rotate = rotated(self.x.labels, self.x.step)
            for i, lab in enumerate(self.x.labels):
                cx = self.x.center(i)
                if rotate:
                    out.append(text(cx, self.y1 + 10, short(lab), 9, "end", "#444",
                                    f' transform="rotate(-45 {_f(cx)} {_f(self.y1 + 10)})"'))
                else:
                    out.append(text(cx, self.y1 + 14, short(lab), 10, "middle", "#444"))
        else:
            for t in self.x.ticks():
                px = self.x(t)
                out.append(f'<line x1="{_f(px)}" y1="{self.y0}" x2="{_f(px)}" y2="{self.y1}" stroke="#eeeef2"/>')
                out.append(text(px, self.y1 + 14, self.xfmt(t), 10, "middle", "#444"))
        if self.xlabel:
            out.append(text((self.x0 + self.x1) / 2, self.height - 6, self.xlabel, 11, "middle"))
        if self.ylabel:
            cy = (self.y0 + self.y1) / 2
            out.append(text(14, cy, self.ylabel, 11, "middle", extra=f' transform="rotate(-90 14 {_f(cy)})"'))
        return out

    def _legend_svg(self) -> tuple[list[str], int]:
        """Legend items left to right, wrapped into rows; returns the items and the row count."""
        out, x, yy, rows = [], self.x0, 34, 1
        for label, color, kind in self.legend:
            w = 30 + 6 * len(label)
            if x > self.x0 and x + w > self.width - self.right:
                x, yy, rows = self.x0, yy + 15, rows + 1
            if kind in ("line", "dash"):
                d = ' stroke-dasharray="4 2"' if kind == "dash" else ""
                out.append(f'<line x1="{_f(x)}" y1="{yy}" x2="{_f(x + 14)}" y2="{yy}" stroke="{color}" '
                           f'stroke-width="2"{d}/>')
            elif kind == "dot":
                out.append(f'<circle cx="{_f(x + 7)}" cy="{yy}" r="4" fill="{color}"/>')
            else:
                out.append(f'<rect x="{_f(x)}" y="{yy - 5}" width="12" height="10" fill="{color}"/>')
            out.append(text(x + 18, yy + 4, label, 10, fill="#333"))
            x += w
        return out, rows

    def svg(self) -> str:
        if self.x is None or self.y is None:
            raise PlotSkipped("no axes")
        if not self.marks:
            raise PlotSkipped("no marks to draw")
        legend, rows = self._legend_svg()
        shift = 15 * (rows - 1)  # extra legend rows push the plot body down
        h = self.height + shift
        parts = [f'<svg viewBox="0 0 {self.width} {h}" width="{self.width}" height="{h}" '
                 f'role="img" aria-label="{esc(self.title)}" font-family="system-ui, sans-serif">',
                 f"<title>{esc(self.title)}</title>",
                 text(self.x0, 18, self.title, 13, extra=' font-weight="600"'), *legend,
                 f'<g class="body" transform="translate(0 {shift})">', *self._axes_svg(),
                 f'<g class="marks"{self.x.attrs("x")}{self.y.attrs("y")}>', *self.marks, "</g>",
                 '<g class="overlay">', *self.overlay, "</g>", "</g>", "</svg>"]
        return "\n".join(parts)
