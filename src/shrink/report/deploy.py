"""The report's sections on deployment and search: the plan (memory fit per
format), the roofline, and a search's candidates, front and verdict."""
from __future__ import annotations

from .plots_plan import memory_fit, pareto, roofline
from .svg import esc, finite, fmt_bytes
from .text import DASH, count, figure, num, recipe_line, table


def plan_section(plan) -> str:
    if not isinstance(plan, dict):
        return ""
    model, dev = plan.get("model") or {}, plan.get("device")
    facts = [f"model {esc(model.get('name', '?'))} ({count(model.get('params'))} parameters)"]
    if isinstance(dev, dict):
        facts.append(f"device {esc(dev.get('name', '?'))}: {esc(fmt_bytes(dev['memory_bytes']))} memory"
                     if finite(dev.get("memory_bytes")) else f"device {esc(dev.get('name', '?'))}")
        if finite(dev.get("bandwidth_bytes_per_s")):
            facts.append(f"{dev['bandwidth_bytes_per_s'] / 1e9:,.0f} GB/s")
    else:
        facts.append("no device given (fit not judged)")
    for key in ("context", "batch", "kv_format"):
        if plan.get(key) is not None:
            facts.append(f"{key.replace('_', ' ')} {esc(plan[key])}")
    rows = []
    for f in plan.get("formats") or []:
        if not isinstance(f, dict):
            continue
        fits = {True: "yes", False: "no"}.get(f.get("fits"), DASH)
        rows.append([f.get("name", "?"), num(f.get("bits_per_weight"), ".3g"),
                     fmt_bytes(f["weight_bytes"]) if finite(f.get("weight_bytes")) else DASH,
                     fmt_bytes(f["kv_cache_bytes"]) if finite(f.get("kv_cache_bytes")) else DASH,
                     fmt_bytes(f["total_bytes"]) if finite(f.get("total_bytes")) else DASH, fits,
                     num(f.get("decode_tokens_per_s_bound"), ",.1f"), num(f.get("compression_vs_fp16"), ".2f", "\u00d7")])
    out = ['<section id="plan"><h2>Deployment plan</h2>', f"<p>{'; '.join(facts)}.</p>",
           figure("memory-fit", memory_fit, plan)]
    if rows:
        out.append(table(["format", "bits/weight", "weights", "KV cache", "total", "fits",
                          "decode bound (tokens/s)", "vs fp16"], rows, "num"))
    rec = plan.get("recommendation")
    if isinstance(rec, dict):
        why = "".join(f"<li>{esc(w)}</li>" for w in rec.get("why") or [])
        out.append(f"<p><b>Recommendation:</b> {esc(rec.get('format', '?'))} (recipe "
                   f"<code>{esc(rec.get('recipe', '?'))}</code>)</p><ul>{why}</ul>")
    der = plan.get("derivations")
    if isinstance(der, dict) and der:
        items = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in der.items())
        out.append(f"<details><summary>How each number was derived ({len(der)})</summary><dl>{items}</dl></details>")
    out.append("</section>")
    return "\n".join(out)


def roofline_section(d) -> str:
    if not isinstance(d, dict):
        return ""
    return ('<section id="roofline"><h2>Roofline</h2>'
            f"{figure('roofline', roofline, d)}</section>")


def _quality(c) -> float | None:
    q = c.get("quality") if isinstance(c, dict) else None
    return q.get("value") if isinstance(q, dict) and finite(q.get("value")) else None


def closest(candidates: list[dict], cons: dict) -> tuple[dict, str] | None:
    """When nothing met the constraints: the candidate with the best quality among those
    within the size limit, else the smallest one."""
    cands = [c for c in candidates if isinstance(c, dict)]
    ms = cons.get("max_size_bytes") if finite(cons.get("max_size_bytes")) else None
    within = [c for c in cands if finite(c.get("size_bytes")) and (ms is None or c["size_bytes"] <= ms)
              and _quality(c) is not None]
    if within:
        hib = cons.get("higher_is_better", True) is not False
        best = (max if hib else min)(within, key=_quality)
        return best, "the best quality among the candidates within the size limit"
    sized = [c for c in cands if finite(c.get("size_bytes"))]
    if sized:
        return min(sized, key=lambda c: c["size_bytes"]), "the smallest candidate (none is within the size limit)"
    return None


def _describe(c: dict, qname: str) -> str:
    q = _quality(c)
    return (f"<b>{esc(c.get('name', '?'))}</b> ({esc(fmt_bytes(c['size_bytes'])) if finite(c.get('size_bytes')) else DASH}"
            + (f", {esc(qname)} {q:.4g}" if q is not None else "") + ")")


def search_section(result: dict) -> str:
    if not any(k in result for k in ("constraints", "candidates", "chosen")):
        return ""
    cons = result.get("constraints") if isinstance(result.get("constraints"), dict) else {}
    cands = [c for c in result.get("candidates") or [] if isinstance(c, dict)]
    chosen = result.get("chosen") if isinstance(result.get("chosen"), dict) else None
    qname = cons.get("quality_name") or "quality"
    hib = cons.get("higher_is_better", True) is not False
    lines = []
    if finite(cons.get("max_size_bytes")):
        lines.append(f"size at most {fmt_bytes(cons['max_size_bytes'])}")
    if finite(cons.get("max_drop")):
        lines.append(f"{qname} drops at most {cons['max_drop']:g}% from the baseline")
    if finite(cons.get("min_quality")):
        lines.append(f"{qname} at {'least' if hib else 'most'} {cons['min_quality']:g}")
    if cons.get("device"):
        lines.append(f"fits on {cons['device']}")
    out = ['<section id="search"><h2>Search</h2>',
           "<p>Constraints: " + (esc("; ".join(lines)) if lines else "none") + f" ({esc(qname)}, "
           f"{'higher' if hib else 'lower'} is better).</p>"]
    if chosen:
        out.append(f'<p class="verdict ok" data-verdict="chosen">Chosen: {_describe(chosen, qname)}, recipe '
                   f"<code>{esc(recipe_line(chosen.get('recipe')))}</code>.</p>")
    else:
        rec = result.get("closest")  # the search's own pick, when it recorded one
        near = (rec, "as the search judged it") if isinstance(rec, dict) else closest(cands, cons)
        tail = f" Closest: {_describe(near[0], qname)}, {esc(near[1])}." if near else ""
        out.append(f'<p class="verdict bad" data-verdict="none">Result: no candidate met the constraints.{tail}</p>')
        if isinstance(result.get("note"), str):
            out.append(f'<p class="muted">{esc(result["note"])}</p>')
    bq = ((result.get("baseline") or {}).get("quality") or {}).get("value")
    out.append(figure("pareto", pareto, cands, chosen, cons, bq if finite(bq) else None))
    rows = []
    for c in cands:
        mark = "\u2605 " if chosen is not None and c.get("name") == chosen.get("name") else ""
        q = _quality(c)
        rows.append([mark + str(c.get("name", "?")), recipe_line(c.get("recipe")),
                     fmt_bytes(c["size_bytes"]) if finite(c.get("size_bytes")) else DASH,
                     num(q) if q is not None else DASH, num(c.get("latency_ms"), ".3g"),
                     "yes" if c.get("on_front") else "no", "no" if c.get("feasible") is False else "yes",
                     str(c.get("stage") or DASH), str(c.get("error") or "")])
    if rows:
        out.append(table(["candidate", "recipe", "size", qname, "latency (ms)", "on front", "feasible", "stage",
                          "error"], rows, "num candidates"))
    info = result.get("search") if isinstance(result.get("search"), dict) else {}
    facts = [f"{k}: {info[k]}" for k in ("space", "candidates", "full", "workers", "proxy", "rule") if info.get(k)]
    if finite(info.get("seconds")):
        facts.append(f"took {info['seconds']:.1f} s")
    if facts:
        out.append(f'<p class="muted">Search: {esc("; ".join(str(f) for f in facts))}.</p>')
    out.append("</section>")
    return "\n".join(out)


def exports_section(exports) -> str:
    """`shrink export` runs recorded in result.json: format, bytes, runtime, agreement, speed."""
    if not isinstance(exports, list) or not exports:
        return ""
    rows = []
    for e in exports:
        if not isinstance(e, dict):
            continue
        agree = e.get("agreement") or {}
        vs_model = agree.get("vs_shrink_model") if isinstance(agree, dict) else None
        vs_model = vs_model if isinstance(vs_model, dict) else {}
        lat = e.get("latency") if isinstance(e.get("latency"), dict) else {}
        speed = (f"{num(lat.get('decode_tokens_per_s'), ',.0f')} tok/s decode" if finite(lat.get("decode_tokens_per_s"))
                 else f"{num(lat.get('median_ms'), '.3g')} ms" if finite(lat.get("median_ms")) else DASH)
        verified = {True: "passed", False: "not verified"}.get(e.get("verified"), DASH)
        rows.append([str(e.get("format", "?")), str(e.get("path", "?")),
                     fmt_bytes(e["bytes"]) if finite(e.get("bytes")) else DASH, str(e.get("runtime") or DASH),
                     verified, num(vs_model.get("rel_rmse"), ".2e"),
                     num(100 * vs_model["top1_agreement"], ".1f", "%") if finite(vs_model.get("top1_agreement")) else DASH,
                     speed])
    if not rows:
        return ""
    return ('<section id="exports"><h2>Exports, proven in their runtimes</h2>'
            "<p>Each file was loaded in its runtime and run on held-out inputs beside shrink's model "
            "(error and top-1 agreement of the outputs against shrink's compressed model).</p>"
            + table(["format", "path", "size", "runtime", "verification", "rel. RMS error", "top-1", "speed"],
                    rows, "num") + "</section>")
