"""A run's result.json rendered to one self-contained HTML page: inline CSS,
inline SVG plots, a small inline script that checks every plot drew; nothing
fetched from anywhere (a Content-Security-Policy forbids it)."""
from __future__ import annotations

import json
from pathlib import Path

from shrink.fsutil import write_bytes_atomic

from .deploy import exports_section, plan_section, roofline_section, search_section
from .early_exit import early_exit_details
from .lowrank import lowrank_details
from .pruning import pruning_details
from .training import training_details
from .plots import layer_errors, layer_sqnr, sensitivity, staircase, svd_energy, weight_hist
from .svg import esc, finite
from .text import DASH, count, figure, joules, mb, num, recipe_text, step_name, table, times, yamlish

MAX_HISTOGRAMS = 12

RATIOS = (
    ("R", "size", "original bytes / compressed bytes: how many times smaller the stored model is"),
    ("A", "quality kept", "compressed / original quality (original / compressed for a lower-is-better metric "
                          "such as perplexity); 1.00 means nothing lost"),
    ("L", "latency", "original / compressed batch-1 latency: above 1 the compressed model is faster"),
    ("E", "energy (estimate)", "original / compressed energy of one batch-1 forward pass, from DRAM bytes and "
                               "MACs by precision"),
)

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;color:#1d1f24;max-width:1160px;margin:0 auto;
padding:18px 24px 60px;background:#fff}
h1{font-size:22px;margin:.2em 0}h2{font-size:18px;border-bottom:1px solid #dde;padding-bottom:4px;margin-top:32px}
h3{font-size:15px;margin-top:22px}pre{background:#f5f6f8;padding:8px 10px;border-radius:4px;overflow-x:auto}
table{border-collapse:collapse;margin:8px 0}th,td{border:1px solid #dfe1e6;padding:3px 8px;text-align:left;
vertical-align:top}th{background:#f3f4f7}table.num td{font-variant-numeric:tabular-nums}
figure.plot{margin:14px 0;overflow-x:auto}figure.plot svg{max-width:100%;height:auto;display:block}
figcaption{color:#555;font-size:12.5px;max-width:900px;margin-top:2px}.skipped{color:#8a5a00;font-style:italic}
.verdict{padding:6px 10px;border-radius:4px}.verdict.ok{background:#e8f6ee}.verdict.bad{background:#fbeaea}
.muted{color:#666}.warnings li{color:#8a5a00}details{margin:8px 0}dt{font-weight:600;margin-top:4px}dd{margin-left:16px}
"""

CHECK_SCRIPT = """
window.addEventListener('load', function () {
  var figs = document.querySelectorAll('figure.plot'), drawn = 0, kinds = [];
  for (var i = 0; i < figs.length; i++) {
    var f = figs[i], svg = f.querySelector('svg'), ok = false;
    if (svg) {
      var marks = svg.querySelectorAll('[data-mark]'), g = svg.querySelector('g.marks');
      if (marks.length && g) { var b = g.getBBox(); ok = b.width > 0 && b.height > 0; }
    }
    f.setAttribute('data-drawn', ok ? 'yes' : 'no');
    if (ok) { drawn++; if (kinds.indexOf(f.dataset.plot) < 0) kinds.push(f.dataset.plot); }
  }
  document.body.dataset.plotsTotal = String(figs.length);
  document.body.dataset.plotsDrawn = String(drawn);
  document.body.dataset.plotKinds = kinds.join(' ');
});
"""

CSP = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:"


def _metric(d) -> dict:
    return d if isinstance(d, dict) else {}


def header(result: dict) -> str:
    facts = []
    if finite(result.get("seconds")):
        facts.append(f"run took {result['seconds']:.1f} s")
    if result.get("seed") is not None:
        facts.append(f"seed {esc(result['seed'])}")
    if isinstance(result.get("device"), str):
        facts.append(f"device {esc(result['device'])}")
    warn = [w for w in result.get("warnings") or [] if w] if isinstance(result.get("warnings"), list) else []
    warnings = "".join(f"<li>{esc(w)}</li>" for w in warn)
    return (f"<header><h1>shrink report: {esc(result.get('model', 'unnamed model'))}</h1>"
            + (f'<p class="muted">{"; ".join(facts)}</p>' if facts else "")
            + (f'<ul class="warnings">{warnings}</ul>' if warnings else "")
            + f"<h3>Recipe</h3><pre>{esc(recipe_text(result.get('recipe')))}</pre></header>")


def _change(a, b) -> str:
    return f"{b / a:.3g}\u00d7" if finite(a) and finite(b) and a != 0 else DASH


def summary(result: dict) -> str:
    b, c = _metric(result.get("baseline")), _metric(result.get("compressed"))
    if not b and not c:
        return ""
    rows = [["size", mb(b.get("size_bytes")), mb(c.get("size_bytes")), _change(b.get("size_bytes"), c.get("size_bytes"))],
            ["parameters", count(b.get("params")), count(c.get("params")), _change(b.get("params"), c.get("params"))]]
    qb, qc = _metric(b.get("quality")), _metric(c.get("quality"))
    if qb or qc:
        name = qb.get("name") or qc.get("name") or "quality"
        hib = qb.get("higher_is_better", qc.get("higher_is_better", True)) is not False
        rows.append([f"{name} ({'higher' if hib else 'lower'} is better)", num(qb.get("value")), num(qc.get("value")),
                     _change(qb.get("value"), qc.get("value"))])
    rows.append(["latency, batch 1 (ms)", num(b.get("latency_ms"), ".4g"), num(c.get("latency_ms"), ".4g"),
                 _change(b.get("latency_ms"), c.get("latency_ms"))])
    lb, lc = _metric(_metric(b.get("latency")).get("batched")), _metric(_metric(c.get("latency")).get("batched"))
    if lb or lc:
        n = lb.get("batch_size") or lc.get("batch_size") or "N"
        rows.append([f"latency, batch {n} (ms)", num(lb.get("median_ms")), num(lc.get("median_ms")),
                     _change(lb.get("median_ms"), lc.get("median_ms"))])
    eb, ec = _metric(b.get("energy")), _metric(c.get("energy"))
    if eb or ec:
        rows.append(["energy per forward (estimate)", joules(eb.get("joules")), joules(ec.get("joules")),
                     _change(eb.get("joules"), ec.get("joules"))])
    out = ['<section id="summary"><h2>Baseline and compressed</h2>',
           table(["", "baseline", "compressed", "compressed / baseline"], rows, "num summary")]
    lat = _metric(c.get("latency")) or _metric(b.get("latency"))
    if lat:
        out.append(f'<p class="muted">Latency: median of {esc(_metric(lat.get("batch1")).get("runs", "?"))} runs after '
                   f'{esc(_metric(lat.get("batch1")).get("warmup", "?"))} warm-up, {esc(lat.get("threads", "?"))} '
                   f'threads on {esc(lat.get("device", "?"))}.</p>')
    ratios = _metric(result.get("ratios"))
    if ratios:
        rrows = [[f"<b>{k}</b> {esc(name)}", esc(times(ratios.get(k)) if k != "A" else
                 (f"{100 * ratios[k]:.1f}%" if finite(ratios.get(k)) else "n/a")), esc(why)]
                 for k, name, why in RATIOS]
        out += ["<h3>The four ratios</h3>", table(["ratio", "value", "what it means"], rrows, "num ratios", raw=True)]
    if eb or ec:
        out.append("<h3>Energy estimate</h3><ul>")
        for label, e in (("baseline", eb), ("compressed", ec)):
            if e.get("derivation"):
                out.append(f"<li>{label}: {esc(e['derivation'])}</li>")
        out.append("</ul>")
        src = _metric(ec.get("constants") or eb.get("constants")).get("source")
        if src:
            out.append(f'<p class="muted">Constants: {esc(src)}.</p>')
    out.append("</section>")
    return "\n".join(out)


def _layer_rows(layers: list) -> list[list[str]]:
    rows = []
    for l in layers:
        if not isinstance(l, dict):
            continue
        shape = "\u00d7".join(str(s) for s in l.get("shape") or []) or DASH
        rows.append([str(l.get("name", "?")), shape, str(l.get("format") or DASH),
                     count(l.get("bytes_fp32")), count(l.get("bytes_stored")), num(l.get("error")),
                     num(l.get("error_rtn")), num(l.get("sqnr_db"), ".2f"), num(l.get("seconds"), ".3f"),
                     str(l.get("kernel") or DASH), str(l.get("note") or "")])
    return rows


def steps_section(steps) -> str:
    if not isinstance(steps, list) or not steps:
        return ""
    out = ['<section id="steps"><h2>Steps</h2>']
    for n, s in enumerate(steps, 1):
        if not isinstance(s, dict):
            continue
        idx, step = s.get("index", n), s.get("step") or {}
        layers = s.get("layers") if isinstance(s.get("layers"), list) else []
        name = step_name(step)
        opts = yamlish(step.get(name)) if isinstance(step, dict) and step else ""
        out.append(f'<div class="step" data-step="{esc(idx)}"><h3>Step {esc(idx)}: {esc(name)}</h3>'
                   f"<p><code>{esc(name)}: {esc(opts)}</code> \u2014 {len(layers)} layers"
                   + (f" in {s['seconds']:.2f} s" if finite(s.get("seconds")) else "") + "</p>")
        if layers:
            out.append(figure("layer-error", layer_errors, layers, idx, pruning=name == "prune"))
            out.append(figure("layer-sqnr", layer_sqnr, layers, idx))
            out.append(f"<details><summary>Per-layer records ({len(layers)})</summary>"
                       + table(["layer", "shape", "format", "bytes fp32", "bytes stored", "error",
                                "magnitude error" if name == "prune" else "RTN error",
                                "SQNR dB", "seconds", "kernel", "note"], _layer_rows(layers), "num layers")
                       + "</details>")
        out.append(pruning_details(s.get("details")))
        out.append(lowrank_details(s.get("details")))
        out.append(training_details(s.get("details")))
        out.append(early_exit_details(s.get("details")))
        skipped = [k for k in s.get("skipped") or [] if isinstance(k, dict)]
        if skipped:
            items = "".join(f"<li><code>{esc(k.get('name', '?'))}</code>: {esc(k.get('reason', ''))}</li>"
                            for k in skipped)
            out.append(f'<p>Skipped ({len(skipped)}):</p><ul class="skipped-modules">{items}</ul>')
        out.append("</div>")
    out.append("</section>")
    return "\n".join(out)


def figures_section(figs) -> str:
    if not isinstance(figs, dict):
        return ""
    out = []
    weights = [w for w in figs.get("weights") or [] if isinstance(w, dict)]
    if weights:
        out.append("<h3>Weight histograms</h3>")
        for w in weights[:MAX_HISTOGRAMS]:
            out.append(figure("weight-hist", weight_hist, w))
        if len(weights) > MAX_HISTOGRAMS:
            out.append(f'<p class="muted">{len(weights) - MAX_HISTOGRAMS} more histograms in result.json are not '
                       "drawn.</p>")
    if isinstance(figs.get("staircase"), dict):
        out += ["<h3>Quantization staircase</h3>", figure("staircase", staircase, figs["staircase"])]
    if isinstance(figs.get("sensitivity"), list):
        out += ["<h3>Layer sensitivity</h3>", figure("sensitivity", sensitivity, figs["sensitivity"])]
    if isinstance(figs.get("svd"), list):
        out += ["<h3>Low-rank energy</h3>", figure("svd-energy", svd_energy, figs["svd"])]
    return ('<section id="figures"><h2>Weights and decisions</h2>' + "\n".join(out) + "</section>") if out else ""


def render_html(result: dict) -> str:
    """The whole report page for one result.json document."""
    if not isinstance(result, dict):
        raise ValueError(f"a result must be a dict (the contents of result.json), not {type(result).__name__}")
    # a search's verdict and front come first: they are what the search was run for
    body = [header(result), search_section(result), summary(result), steps_section(result.get("steps")),
            figures_section(result.get("figures")), plan_section(result.get("plan")),
            roofline_section(result.get("roofline")), exports_section(result.get("exports"))]
    title = f"shrink report: {result.get('model', 'unnamed model')}"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(b for b in body if b)
            + f'\n<footer class="muted"><p>Written by shrink report from result.json.</p></footer>'
            f"\n<script>{CHECK_SCRIPT}</script>\n</body></html>\n")


def _load(path: Path) -> dict:
    where = path.parent if path.name == "result.json" else path
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no result.json to report on; run `shrink compress MODEL --recipe RECIPE "
                                f"-o {where}` (or `shrink search`) first")
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); it may be truncated or edited by hand: "
                         "run `shrink compress` again to rewrite it") from None
    if not isinstance(result, dict):
        raise ValueError(f"{path}: expected a JSON object (a run's result), found {type(result).__name__}; "
                         "run `shrink compress` again to rewrite it")
    return result


def write_report(result_dir_or_json_path: str | Path, out: str | Path | None = None) -> Path:
    """Read DIR/result.json (or the given .json file) and write its report atomically,
    by default beside it as report.html. Returns the path written."""
    p = Path(result_dir_or_json_path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such directory or file; give the DIR written by `shrink compress` "
                                "(it holds result.json)")
    src = p / "result.json" if p.is_dir() else p
    dest = Path(out) if out is not None else src.parent / "report.html"
    if dest.exists() and dest.is_dir():
        dest = dest / "report.html"
    if dest.resolve() == src.resolve():
        raise ValueError(f"{dest}: the report would overwrite its own result.json; give another -o FILE")
    write_bytes_atomic(dest, render_html(_load(src)).encode("utf-8"))
    return dest
