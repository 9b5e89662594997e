"""Small text helpers shared by the report's sections: number formats that never
fail on missing data, YAML-ish recipe text, HTML tables and figures."""
from __future__ import annotations

import json
import re

from .svg import PlotSkipped, esc, finite

DASH = "\u2014"


def num(v, spec: str = ".4g", suffix: str = "") -> str:
    return f"{v:{spec}}{suffix}" if finite(v) else DASH


def mb(v) -> str:
    if not finite(v):
        return DASH
    m = v / 1e6
    return f"{m:,.0f} MB" if abs(m) >= 100 else f"{m:.2f} MB" if abs(m) >= 1 else f"{m:.4f} MB"


def count(v) -> str:
    return f"{int(v):,}" if finite(v) else DASH


def joules(v) -> str:
    if not finite(v):
        return DASH
    for unit, f in (("J", 1.0), ("mJ", 1e-3), ("\u00b5J", 1e-6), ("nJ", 1e-9)):
        if abs(v) >= f:
            return f"{v / f:.4g} {unit}"
    return f"{v / 1e-12:.4g} pJ"


def times(v) -> str:
    return (f"{v:.2f}\u00d7" if abs(v) >= 0.1 else f"{v:.2g}\u00d7") if finite(v) else "n/a"


def _scalar(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return f"{v:g}" if isinstance(v, float) else str(v)
    s = str(v)
    return s if re.fullmatch(r"[\w.+/%-]+", s) else json.dumps(s)


def yamlish(v) -> str:
    """Flow-style YAML: `{bits: 4, group_size: 128}`."""
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_scalar(k)}: {yamlish(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(yamlish(x) for x in v) + "]"
    return _scalar(v)


def recipe_text(recipe) -> str:
    """A recipe as the YAML a user would write: one `- step: {options}` line per step."""
    if isinstance(recipe, str):
        return recipe
    if not isinstance(recipe, list) or not recipe:
        return "(no recipe recorded)"
    lines = []
    for step in recipe:
        if isinstance(step, dict) and len(step) == 1:
            (k, v), = step.items()
            lines.append(f"- {_scalar(k)}: {yamlish(v)}")
        else:
            lines.append(f"- {yamlish(step)}")
    return "\n".join(lines)


def recipe_line(recipe) -> str:
    """A recipe on one line: `gptq: {bits: 4}; prune: {sparsity: 0.5}`."""
    return "; ".join(s.removeprefix("- ") for s in recipe_text(recipe).split("\n"))


def step_name(step) -> str:
    return str(next(iter(step))) if isinstance(step, dict) and step else "step"


def table(headers: list[str], rows: list[list[str]], cls: str = "", raw: bool = False) -> str:
    """An HTML table; cells are escaped unless raw (then the caller escaped them)."""
    cell = (lambda s: s) if raw else esc
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


_DATA_ERRORS = (PlotSkipped, TypeError, ValueError, KeyError, AttributeError, IndexError, ZeroDivisionError,
                OverflowError)


def figure(kind: str, fn, *args, **kw) -> str:
    """A plot in a <figure>, or one line saying why it was not drawn (bad data never breaks the page)."""
    try:
        p = fn(*args, **kw)
    except _DATA_ERRORS as e:
        why = str(e) if isinstance(e, PlotSkipped) else f"the data could not be read ({type(e).__name__}: {e})"
        return f'<p class="skipped" data-skipped-plot="{esc(kind)}">{esc(kind)} plot not drawn: {esc(why)}.</p>'
    return (f'<figure class="plot" data-plot="{esc(p.kind)}">{p.svg}'
            f"<figcaption>{esc(p.caption)}</figcaption></figure>")
