"""The report's exports section: one row per recorded export, robust to partial records."""
from __future__ import annotations

from shrink.report import render_html
from shrink.report.deploy import exports_section


def _record(**kw):
    rec = {"format": "gguf:Q4_0", "path": "/x/m.gguf", "bytes": 1_470_000, "verified": True,
           "runtime": "llama.cpp (llama-cpp-python)",
           "agreement": {"vs_shrink_model": {"rel_rmse": 0.0237, "top1_agreement": 0.949}},
           "latency": {"decode_tokens_per_s": 1284.0}}
    rec.update(kw)
    return rec


def test_rows_show_format_runtime_agreement_and_speed():
    html = exports_section([_record(), _record(format="safetensors:packed", path="/x/p", runtime="shrink.load",
                                               agreement={}, latency=None)])
    assert html.count("<tr>") == 3            # header + 2 rows
    assert "gguf:Q4_0" in html and "2.37e-02" in html and "94.9%" in html and "1,284 tok/s" in html
    assert "safetensors:packed" in html and "shrink.load" in html


def test_degenerate_records_do_not_break_the_page():
    for exports in (None, [], "x", [None], [{}], [_record(bytes="?", agreement="bad", latency=[1])],
                    [_record(path="<script>alert(1)</script>")]):
        html = render_html({"model": "m", "exports": exports})
        assert "<script>alert(1)</script>" not in html
    assert exports_section([{}]).count("<tr>") == 2
    assert exports_section(None) == ""
