"""The report layer: result.json -> one self-contained HTML page with inline SVG plots."""
from __future__ import annotations

import json
import math
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import pytest
from report_fixtures import EVIL, KINDS, make_full_result

from shrink.report import render_html, write_report
from shrink.report.deploy import closest
from shrink.report.plots_plan import usable_memory

VOID = {"meta", "br", "hr", "img", "input", "link", "col", "area", "base", "wbr", "source"}


class Page(HTMLParser):
    """Collects figures, skipped-plot notes, src/href values, and checks tags balance."""

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.kinds, self.skipped, self.refs, self.scripts = [], [], [], [], [], 0
        self.text = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "figure" and "plot" in (a.get("class") or ""):
            self.kinds.append(a.get("data-plot"))
        if tag == "p" and "data-skipped-plot" in a:
            self.skipped.append(a["data-skipped-plot"])
        if tag == "script":
            self.scripts += 1
        self.refs += [v for k, v in attrs if k in ("src", "href", "xlink:href", "action") and v]
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.refs += [v for k, v in attrs if k in ("src", "href", "xlink:href") and v]

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def parse(html: str) -> Page:
    p = Page()
    p.feed(html)
    p.close()
    assert not p.errors and not p.stack, (p.errors, p.stack)
    return p


def svgs(html: str, kind: str) -> list[ET.Element]:
    """Every <svg> of the figures of one kind, parsed as XML (so each must be well-formed)."""
    out = []
    for m in re.finditer(r'<figure class="plot" data-plot="([^"]+)">(<svg.*?</svg>)', html, re.S):
        if m.group(1) == kind:
            out.append(ET.fromstring(m.group(2)))
    return out


class Axis:
    """The transform a marks group declares, inverted: pixels back to data."""

    def __init__(self, g: ET.Element, axis: str):
        self.log = g.get(f"data-{axis}-scale") == "log"
        self.lo, self.hi = map(float, g.get(f"data-{axis}-domain").split())
        self.r0, self.r1 = map(float, g.get(f"data-{axis}-range").split())

    def invert(self, px: float) -> float:
        f = (lambda v: math.log10(v)) if self.log else (lambda v: v)
        v = f(self.lo) + (px - self.r0) / (self.r1 - self.r0) * (f(self.hi) - f(self.lo))
        return 10 ** v if self.log else v


def marks(svg: ET.Element, kind: str | None = None) -> list[ET.Element]:
    g = svg.find(".//g[@class='marks']")
    return [e for e in g.iter() if e.get("data-mark") and (kind is None or e.get("data-mark") == kind)]


def test_every_section_renders_every_plot_kind(full_result):
    html = render_html(full_result)
    page = parse(html)
    assert set(page.kinds) == KINDS
    assert page.skipped == []
    # two steps x (error, sqnr), two histograms, one of each other kind
    assert len(page.kinds) == 4 + 2 + 6
    text = " ".join(page.text)
    for phrase in ("Baseline and compressed", "The four ratios", "quality kept", "Energy estimate",
                   "Skipped (1)", "head", "Deployment plan", "Recommendation", "Roofline", "Search",
                   "Chosen", "w4-gptq", "gptq: {bits: 4, group_size: 32}"):
        assert phrase in text, phrase
    for kind in KINDS:
        for svg in svgs(html, kind):
            assert marks(svg), kind
            assert svg.find("title") is not None and svg.find("title").text


def test_error_bar_heights_are_proportional_to_the_values(full_result):
    html = render_html(full_result)
    svg = svgs(html, "layer-error")[0]
    g = svg.find(".//g[@class='marks']")
    y = Axis(g, "y")
    assert not y.log and y.lo == 0
    bars = marks(svg, "bar")
    layers = full_result["steps"][0]["layers"]
    assert [b.get("data-series") for b in bars] == ["error", "error_rtn"] * len(layers)
    want = [v for l in layers for v in (l["error"], l["error_rtn"])]
    assert [float(b.get("data-value")) for b in bars] == want
    scale = (y.r0 - y.r1) / (y.hi - y.lo)  # pixels per unit
    for b, v in zip(bars, want):
        assert float(b.get("height")) == pytest.approx(v * scale, abs=0.02)
        assert float(b.get("y")) + float(b.get("height")) == pytest.approx(y.r0, abs=0.02)  # sits on zero
    # the second step has no RTN comparison: one bar per layer
    svg2 = svgs(html, "layer-error")[1]
    assert [b.get("data-series") for b in marks(svg2, "bar")] == ["error", "error"]


def test_pareto_points_map_back_to_size_and_quality(full_result):
    svg = svgs(render_html(full_result), "pareto")[0]
    g = svg.find(".//g[@class='marks']")
    x, y = Axis(g, "x"), Axis(g, "y")
    pts = marks(svg, "point")
    cands = {c["name"]: c for c in full_result["candidates"] if c["quality"]}
    assert sorted(p.get("data-name") for p in pts) == sorted(cands)
    for p in pts:
        c = cands[p.get("data-name")]
        assert x.invert(float(p.get("cx"))) == pytest.approx(c["size_bytes"], rel=1e-3)
        assert y.invert(float(p.get("cy"))) == pytest.approx(c["quality"]["value"], abs=1e-3)
        assert p.get("data-on-front") == str(c["on_front"]).lower()
    chosen = marks(svg, "chosen")
    assert len(chosen) == 1 and chosen[0].get("data-name") == "w4-gptq"
    assert x.invert(float(chosen[0].get("cx"))) == pytest.approx(8000, rel=1e-3)
    front = marks(svg, "front")[0].get("points").split()
    assert len(front) == 3  # the three candidates on the front, joined by size
    lines = marks(svg, "constraint")
    values = sorted(float(l.get("data-value")) for l in lines)
    assert values == pytest.approx(sorted([12000, 0.97 * (1 - 0.03)]))


def test_other_plots_put_marks_where_the_data_says(full_result):
    html = render_html(full_result)
    # roofline: each ridge sits at peak / bandwidth, the roofs merged where peaks are equal
    svg = svgs(html, "roofline")[0]
    g = svg.find(".//g[@class='marks']")
    x, y = Axis(g, "x"), Axis(g, "y")
    assert x.log and y.log
    roofs = sorted(r.get("data-roof") for r in marks(svg, "roof"))
    assert roofs == ["fp16/bf16", "int8"]
    for r in marks(svg, "ridge"):
        peak = 1.652e14 if r.get("data-roof") == "fp16/bf16" else 6.606e14
        assert x.invert(float(r.get("cx"))) == pytest.approx(peak / 1.008e12, rel=1e-3)
        assert y.invert(float(r.get("cy"))) == pytest.approx(peak, rel=1e-3)
    assert [p.get("data-label") for p in marks(svg, "point")] == ["decode batch 1", "prefill 512"]
    # memory fit: stacks add up to the totals, the usable line at 21.60 GiB, colours by fit
    svg = svgs(html, "memory-fit")[0]
    g = svg.find(".//g[@class='marks']")
    y = Axis(g, "y")
    tops = {}
    for b in marks(svg, "bar"):
        tops[b.get("data-format")] = min(tops.get(b.get("data-format"), 1e9), float(b.get("y")))
    for f in full_result["plan"]["formats"]:
        assert y.invert(tops[f["name"]]) == pytest.approx(f["total_bytes"], rel=1e-3)
    fp32 = [b for b in marks(svg, "bar") if b.get("data-format") == "fp32"]
    assert {b.get("data-fits") for b in fp32} == {"false"} and fp32[0].get("fill") == "#c0392b"
    limit = marks(svg, "limit")[0]
    assert y.invert(float(limit.get("y1"))) == pytest.approx(21.60 * 2 ** 30, rel=1e-3)
    # sensitivity: the chosen width is flagged, log axis
    svg = svgs(html, "sensitivity")[0]
    chosen = [(b.get("data-layer"), b.get("data-bits")) for b in marks(svg, "bar") if b.get("data-chosen") == "true"]
    assert chosen == [("fc1", "4"), ("fc3", "8")]
    # histogram: one bar per bin, 16 grid ticks, +-threshold
    first, second = svgs(html, "weight-hist")
    assert len(marks(first, "bar")) == 32 and len(marks(first, "grid")) == 16 and marks(first, "hist-after")
    assert sorted(float(t.get("data-value")) for t in marks(second, "threshold")) == [-0.05, 0.05]
    # staircase: every (w, w_hat) drawn, identity present; svd: kept ranks marked
    st = svgs(html, "staircase")[0]
    assert len(marks(st, "point")) == 64 and marks(st, "identity")
    assert [k.get("data-rank") for k in marks(svgs(html, "svd-energy")[0], "kept")] == ["8", "16"]


def test_strings_are_escaped(full_result):
    html = render_html(full_result)
    assert EVIL not in html
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in html
    assert "toy &lt;model&gt; &amp; co" in html and "it fits &lt;easily&gt;" in html
    assert parse(html).scripts == 1  # only the page's own check


def test_page_is_self_contained(full_result):
    html = render_html(full_result)
    page = parse(html)
    assert not [r for r in page.refs if re.match(r"\s*(https?:)?//", r)]
    assert not re.search(r"(src|href)\s*=\s*[\"']?\s*https?:", html, re.I)
    assert "url(" not in html and "@import" not in html and "<link" not in html
    assert "default-src 'none'" in html  # the page may not fetch anything
    assert len(html) < 200_000


def test_no_candidate_met_the_constraints_names_the_closest():
    r = make_full_result()  # chosen is None there
    html = render_html(r)
    assert "no candidate met the constraints" in html
    assert re.search(r"Closest: <b>int8</b>.*best quality among the candidates within the size limit", html)
    cons = {"max_size_bytes": 1000, "higher_is_better": True}
    assert closest(r["candidates"], cons)[0]["name"] == "w2-rtn"  # none within size: the smallest
    cons = {"max_size_bytes": None, "higher_is_better": False}  # e.g. perplexity: lowest wins
    assert closest(r["candidates"], cons)[0]["name"] == "w2-rtn"
    assert closest([], {}) is None


def test_long_layer_lists_are_capped_with_a_note():
    layers = [{"name": f"blocks.{i}.mlp.fc", "error": float(i + 1), "sqnr_db": 10.0} for i in range(100)]
    html = render_html({"steps": [{"index": 1, "step": {"rtn": {}}, "layers": layers, "skipped": []}]})
    svg = svgs(html, "layer-error")[0]
    bars = marks(svg, "bar")
    assert len(bars) == 48 and min(float(b.get("data-value")) for b in bars) == 53.0  # the largest kept
    assert "Showing 48 of 100 layers" in html
    assert "Per-layer records (100)" in html  # the table keeps every layer


def test_a_plan_without_a_device_draws_bars_without_a_limit():
    plan = make_full_result()["plan"] | {"device": None}
    plan["formats"] = [f | {"fits": None} for f in plan["formats"]]
    svg = svgs(render_html({"plan": plan}), "memory-fit")[0]
    assert marks(svg, "bar") and not marks(svg, "limit")
    assert usable_memory({"usable_bytes": 5e9}) == (5e9, "usable memory")
    assert usable_memory({"device": {"memory_bytes": 8e9}}) == (8e9, "device memory")


def _degenerate_cases():
    nan, inf = float("nan"), float("inf")
    full = make_full_result()
    yield "empty", {}
    yield "no steps", {"model": "m", "steps": []}
    yield "wrong types", {"model": 3, "recipe": "w4-rtn", "steps": "x", "baseline": [], "figures": [],
                          "plan": 5, "roofline": "r", "candidates": "c", "ratios": None}
    yield "empty layers", {"steps": [{"index": 1, "step": {}, "layers": [], "skipped": [{"name": None}]}]}
    yield "missing errors", {"steps": [{"layers": [{"name": "a", "error": None, "error_rtn": nan,
                                                    "sqnr_db": inf}, "junk"]}]}
    yield "one layer", {"steps": [{"layers": [{"name": "a", "error": 0.0, "sqnr_db": -3.0}]}]}
    yield "huge spread", {"steps": [{"layers": [{"name": "a", "error": 1e-9}, {"name": "b", "error": 10.0}]}]}
    yield "broken figures", {"figures": {
        "weights": [{"layer": "a", "hist": {"edges": [0, 1], "counts": [1, 2]}},
                    {"layer": "b", "hist": {"edges": [0, 1], "counts": [0]}},
                    {"layer": "c", "hist": {"edges": [0, nan], "counts": [1]}, "grid": [nan], "thresholds": [None]},
                    {"layer": "d", "hist": {"edges": [0.5, 0.5], "counts": [3]}}, "junk"],
        "staircase": {"w": [0.1], "w_hat": [0.1]},
        "sensitivity": [{"layer": "a", "errors": {"2": 0.0, "4": -1.0, "x": 3}, "bits": 2}, {"errors": None}],
        "svd": [{"layer": "a", "energy": [], "rank": 3}, {"layer": "b", "energy": [nan, 0.5], "rank": 99}]}}
    yield "one-point figures", {"figures": {
        "staircase": {"w": [0.1, 0.1], "w_hat": [0.1, 0.1]},
        "sensitivity": [{"layer": "a", "errors": {"4": 0.5}, "bits": 4}],
        "svd": [{"layer": "a", "energy": [1.0], "rank": 1}]}}
    yield "bad plan", {"plan": {"formats": [{"name": "x", "total_bytes": nan}, {"total_bytes": 0}, "y"],
                                "device": {"name": "d"}}}
    yield "bad roofline", {"roofline": {"bandwidth_bytes_per_s": 0, "peak_flops": {"fp16": 1e12}}}
    yield "roofline bad points", {"roofline": {"bandwidth_bytes_per_s": 1e9, "peak_flops": {"fp16": -1, "int8": 1e12},
                                               "points": [{"label": "z", "intensity": 0, "flops_per_s": -5},
                                                          {"label": "n", "intensity": nan, "flops_per_s": 1}]}}
    yield "search empty", {"constraints": None, "candidates": [], "chosen": None}
    yield "search one point", {"constraints": {"max_size_bytes": 0, "min_quality": nan},
                               "candidates": [{"name": "a", "size_bytes": 10, "quality": {"value": 1.0}}],
                               "chosen": {"name": "a"}}
    yield "search no quality", {"candidates": full["candidates"][-1:], "chosen": None,
                                "constraints": full["constraints"]}
    yield "nan metrics", {"baseline": {"size_bytes": nan, "quality": {"value": None}, "energy": {"joules": inf}},
                          "compressed": {"size_bytes": 0}, "ratios": {"R": nan, "A": None}}


@pytest.mark.parametrize("name, result", list(_degenerate_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_degenerate_inputs_do_not_crash(name, result):
    html = render_html(result)
    page = parse(html)
    for kind in set(page.kinds):
        for svg in svgs(html, kind):
            assert marks(svg), kind  # a figure on the page always has marks; otherwise a note says why
            for e in svg.iter():
                for k, v in e.attrib.items():
                    assert "nan" not in v.lower() or k.startswith("data-") or k == "aria-label", (kind, k, v)


def test_render_html_wants_a_dict():
    with pytest.raises(ValueError, match="dict"):
        render_html([1, 2])  # type: ignore[arg-type]


def test_write_report_writes_beside_result_json_or_to_out(tmp_path, full_result):
    d = tmp_path / "run"
    d.mkdir()
    (d / "result.json").write_text(json.dumps(full_result))
    out = write_report(d)
    assert out == d / "report.html" and out.read_text() == render_html(full_result)
    assert write_report(d / "result.json", tmp_path / "x" / "r.html") == tmp_path / "x" / "r.html"
    assert (tmp_path / "x" / "r.html").read_text().startswith("<!DOCTYPE html>")
    assert sorted(p.name for p in d.iterdir()) == ["report.html", "result.json"]  # no temporary left behind


def test_write_report_errors_name_the_file_and_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.*shrink compress"):
        write_report(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"result\.json.*run `shrink compress"):
        write_report(tmp_path)
    (tmp_path / "result.json").write_text('{"model": "m", "steps": [')
    with pytest.raises(ValueError, match=r"result\.json: not valid JSON.*shrink compress"):
        write_report(tmp_path)
    (tmp_path / "result.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"result\.json: expected a JSON object"):
        write_report(tmp_path)
    (tmp_path / "result.json").write_text("{}")
    with pytest.raises(ValueError, match="overwrite"):
        write_report(tmp_path, tmp_path / "result.json")
    assert not (tmp_path / "report.html").exists()


def test_the_search_records_own_front_floor_and_closest_are_used():
    r = make_full_result()
    for c in r["candidates"]:
        c["on_front_size_quality"] = c["name"] in ("int8", "w2-rtn")  # the 2-D front, latency left out
    r["constraints"]["quality_floor"] = 0.9
    r["closest"] = r["candidates"][2]
    r["note"] = "no candidate met the constraints; closest: w4-rtn (its accuracy is 0.93)"
    html = render_html(r)
    svg = svgs(html, "pareto")[0]
    assert len(marks(svg, "front")[0].get("points").split()) == 2
    assert [float(l.get("data-value")) for l in marks(svg, "constraint") if l.get("y1") == l.get("y2")] == [0.9]
    assert re.search(r"Closest: <b>w4-rtn</b>", html) and "its accuracy is 0.93" in html


def test_a_device_far_larger_than_the_model_is_noted_not_drawn_to_scale():
    plan = make_full_result()["plan"]
    plan["formats"] = [f | {"weight_bytes": 1000, "kv_cache_bytes": 200, "total_bytes": 1500} for f in plan["formats"]]
    html = render_html({"plan": plan})
    svg = svgs(html, "memory-fit")[0]
    assert not marks(svg, "limit") and "far above every bar" in html
    y = Axis(svg.find(".//g[@class='marks']"), "y")
    assert y.hi < 10_000  # the bars fill the chart
