"""The command line: exit statuses, --json purity, and the demo's real figures."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from shrink import __version__


def shrink(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "shrink", *args], capture_output=True, text=True, timeout=timeout)


def test_version_and_help():
    r = shrink("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"shrink {__version__}"
    r = shrink("demo", "--help")
    assert r.returncode == 0 and "-o" in r.stdout


def test_unknown_command_is_a_user_error():
    r = shrink("frobnicate")
    assert r.returncode == 2
    assert "invalid choice" in r.stderr
    r = shrink()
    assert r.returncode == 2


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    r = shrink("demo", "-o", str(out), "--json", "--quick")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout), out  # stdout is exactly one JSON document


def test_demo_writes_the_same_json_it_prints(demo):
    doc, out = demo
    assert json.loads((out / "demo.json").read_text()) == doc
    assert not list(out.glob(".*.tmp"))  # atomic write left no temporary behind


def test_demo_plans_come_first(demo):
    doc, _ = demo
    assert [p["model"]["name"] for p in doc["plans"]] == ["minilm", "llama-2-7b"]
    minilm = doc["plans"][0]
    assert minilm["model"]["params"] == 22_713_216  # the packaged config.json's exact count
    assert minilm["recommendation"]["format"] == "int8"


def test_demo_figures_are_consistent(demo):
    doc, _ = demo
    by = {r["format"]: r for r in doc["results"]}
    params = by["fp16"]["summary"]["params"]
    assert doc["matrices"] == 37 and params == 10_764_288  # MiniLM: 6 x (4 x 384^2 + 2 x 384 x 1536) + pooler 384^2
    # fp16/bf16 store exactly 2 bytes a weight
    assert by["fp16"]["summary"]["bytes_stored"] == 2 * params
    # int8 per channel: 1 byte a weight + one fp16 scale per output row
    rows = sum(l["shape"][0] for l in by["int8 per-channel"]["layers"])
    assert by["int8 per-channel"]["summary"]["bytes_stored"] == params + 2 * rows
    # int4-g128 asymmetric: half a byte + (scale, zero) fp16 per 128 weights (384/1536 are multiples of 128)
    assert by["int4-g128 minmax"]["summary"]["bytes_stored"] == params // 2 + 4 * (params // 128)
    # quality ordering that must hold on real weights
    s = {k: v["summary"]["sqnr_db_mean"] for k, v in by.items()}
    assert s["fp16"] > s["int8 per-channel"] > s["int4-g128 minmax"] > s["int3-g128 mse"]
    assert s["int4-g128 mse"] >= s["int4-g128 minmax"]
    assert s["int8 per-channel"] > 35.0
    for r in doc["results"]:
        for layer in r["layers"]:
            assert layer["bytes_stored"] > 0 and layer["rel_rmse"] < 0.5


def test_demo_runs_the_journey(demo):
    """compress runs and a search, each with result.json, model/ and report.html whose
    figures agree with the saved model."""
    import shrink
    from shrink.recipe.job import evaluate_job
    from shrink.recipe.records import model_nbytes

    doc, out = demo
    assert [(r["model"], r["recipe"]) for r in doc["runs"]] == [("minilm", "int8"), ("tiny-gpt", "w4-gptq")]
    for r in doc["runs"]:
        d = out / f"{r['model']}-{r['recipe']}"
        result = json.loads((d / "result.json").read_text())
        assert result["compressed"]["size_bytes"] == r["compressed"]["size_bytes"]
        assert model_nbytes(shrink.load(d)) == result["compressed"]["size_bytes"]
        # quality recomputed from the saved files, on the same held-out data
        again = evaluate_job(str(d))
        assert again["quality"]["value"] == pytest.approx(result["compressed"]["quality"]["value"], rel=1e-6)
        stored = sum(f.stat().st_size for f in (d / "model").glob("*.safetensors"))
        assert stored >= result["compressed"]["size_bytes"]  # the files hold at least the counted bytes
        assert (d / "report.html").stat().st_size > 10_000 and r["report"] == str(d / "report.html")
        assert r["ratios"]["R"] > 1.5 and r["ratios"]["A"] > 0.99
    # the GPTQ model exported to GGUF with its codes carried, proven in llama.cpp
    (e,) = doc["exports"]
    if "skipped" not in e:
        assert e["passed"] and e["carried"] == 28 and e["vs_shrink_model"]["top1_agreement"] >= 0.95
        assert (out / "tiny-gpt-w4-gptq" / "model.gguf").stat().st_size == e["bytes"]
        result = json.loads((out / "tiny-gpt-w4-gptq" / "result.json").read_text())
        assert result["exports"][0]["verified"] is True
        assert 'id="exports"' in (out / "tiny-gpt-w4-gptq" / "report.html").read_text()
    s = doc["search"]
    assert s["chosen"] is not None and s["chosen"]["quality"]["value"] >= 0.99 * s["baseline"]["quality"]["value"]
    assert (out / f"search-{s['model']}" / "report.html").is_file()
    assert s["front"] and s["chosen"]["size_bytes"] < s["baseline"]["size_bytes"]
