"""`shrink plan` on the command line (API.md "Command line" and "plan --json").

Every invocation is a real `python -m shrink plan ...` subprocess. They are independent, so
the module starts them all at once (a thread pool) and the tests read the results.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from shrink.plan import from_hf_config
from shrink.plan.formats import DEFAULT_FORMATS

GOOD_CONFIG = {"model_type": "llama", "vocab_size": 1000, "hidden_size": 256, "num_hidden_layers": 4,
               "num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 704,
               "max_position_embeddings": 2048}
BAD_CONFIG = {k: v for k, v in GOOD_CONFIG.items() if k != "num_hidden_layers"}


def _commands(tmp) -> dict[str, list[str]]:
    good, bad = tmp / "good", tmp / "bad"
    good.mkdir()
    bad.mkdir()
    (good / "config.json").write_text(json.dumps(GOOD_CONFIG))
    (bad / "config.json").write_text(json.dumps(BAD_CONFIG))
    return {
        # successes
        "json13": ["llama-2-13b", "--device", "rtx-4090", "--context", "8192", "--json"],
        "explain": ["llama-2-13b", "--device", "rtx-4090", "--context", "8192", "--explain"],
        "params7b": ["--params", "7B", "--device", "rtx-4090", "--json"],
        "custom": ["llama-2-7b", "--memory", "8GB", "--bandwidth", "100GB/s", "--json"],
        "restrict": ["llama-2-7b", "--device", "rtx-4090", "--format", "int4-g128", "--format", "fp16",
                     "--json"],
        "no_device": ["llama-2-7b", "--format", "int4-g128", "--format", "INT8", "--kv-format", "int8",
                      "--json"],
        "config": [str(good / "config.json"), "--device", "t4", "--context", "1024", "--json"],
        "human_no_device": ["gpt2"],
        # user errors: exit 2, one line on stderr naming the thing
        "e_preset": ["llama-2-13c"],
        "e_device": ["llama-2-13b", "--device", "rtx-4091"],
        "e_params0": ["--params", "0"],
        "e_params_abc": ["--params", "abc", "--json"],
        "e_context": ["llama-2-7b", "--context", "-5"],
        "e_max_drop": ["llama-2-7b", "--device", "rtx-4090", "--max-drop", "200"],
        "e_missing": [str(tmp / "missing" / "config.json")],
        "e_no_layers": [str(bad / "config.json"), "--json"],
        "e_both": ["llama-2-7b", "--params", "7B"],
        "e_kv_format": ["llama-2-7b", "--kv-format", "int5", "--json"],
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plan_cli")
    cmds = _commands(tmp)

    def run(args):
        return subprocess.run([sys.executable, "-m", "shrink", "plan", *args], capture_output=True,
                              text=True, encoding="utf-8", timeout=300)

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(zip(cmds, pool.map(run, cmds.values())))
    results["_tmp"] = tmp
    return results


def _ok_json(runs, key) -> dict:
    r = runs[key]
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    return json.loads(r.stdout)  # the whole of stdout is exactly one JSON document


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_schema(doc: dict) -> None:
    """API.md "plan --json", key by key and type by type."""
    assert {"model", "device", "context", "batch", "formats", "recommendation", "derivations"} <= set(doc)
    m = doc["model"]
    assert isinstance(m["name"], str) and m["name"] and _is_int(m["params"]) and m["params"] > 0
    dev = doc["device"]
    if dev is not None:
        assert isinstance(dev["name"], str)
        assert dev["memory_bytes"] is None or _is_int(dev["memory_bytes"])
        assert dev["bandwidth_bytes_per_s"] is None or isinstance(dev["bandwidth_bytes_per_s"], float)
        assert isinstance(dev["peak_flops"], dict)
        assert all(isinstance(k, str) and isinstance(v, float) for k, v in dev["peak_flops"].items())
    assert _is_int(doc["context"]) and _is_int(doc["batch"])
    assert isinstance(doc["formats"], list) and doc["formats"]
    for f in doc["formats"]:
        assert isinstance(f["name"], str)
        assert isinstance(f["bits_per_weight"], float)
        for k in ("weight_bytes", "kv_cache_bytes", "total_bytes"):
            assert _is_int(f[k]), k
        assert f["fits"] is None or isinstance(f["fits"], bool)
        assert f["decode_tokens_per_s_bound"] is None or isinstance(f["decode_tokens_per_s_bound"], float)
        assert isinstance(f["compression_vs_fp16"], float)
        assert f["bits_per_weight"] == pytest.approx(8 * f["weight_bytes"] / m["params"], rel=1e-12)
        assert f["total_bytes"] >= f["weight_bytes"] + f["kv_cache_bytes"]
        if dev is None:
            assert f["fits"] is None and f["decode_tokens_per_s_bound"] is None
            assert f.get("roofline") is None   # no bound without a device
    rec = doc["recommendation"]
    if rec is not None:
        assert isinstance(rec["format"], str) and isinstance(rec["recipe"], str)
        assert rec["format"] in {f["name"] for f in doc["formats"]}
        assert isinstance(rec["why"], list) and rec["why"] and all(isinstance(w, str) for w in rec["why"])
        assert any(re.search(r"\d", w) for w in rec["why"])
    if dev is None:
        assert rec is None
    assert isinstance(doc["derivations"], dict) and doc["derivations"]
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in doc["derivations"].items())


@pytest.mark.parametrize("key", ["json13", "params7b", "custom", "restrict", "no_device", "config"])
def test_json_is_one_document_with_the_documented_schema(runs, key):
    _check_schema(_ok_json(runs, key))


def test_json_llama_2_13b_on_rtx_4090(runs):
    doc = _ok_json(runs, "json13")
    assert doc["model"] == {"name": "llama-2-13b", "params": 13_015_864_320}
    assert doc["device"]["name"] == "rtx-4090" and doc["device"]["memory_bytes"] == 24 * 2**30
    assert doc["device"]["bandwidth_bytes_per_s"] == 1008e9
    assert doc["device"]["peak_flops"]["fp16"] == pytest.approx(165.2e12)
    assert (doc["context"], doc["batch"]) == (8192, 1)
    assert [f["name"] for f in doc["formats"]] == list(DEFAULT_FORMATS)
    by = {f["name"]: f for f in doc["formats"]}
    assert {f["kv_cache_bytes"] for f in doc["formats"]} == {6_710_886_400}
    assert by["fp16"]["weight_bytes"] == 2 * 13_015_864_320 and by["fp16"]["compression_vs_fp16"] == 1.0
    assert by["int4-g128"]["weight_bytes"] == 6_915_287_040
    assert (by["fp16"]["fits"], by["int8"]["fits"], by["int4-g128"]["fits"]) == (False, True, True)
    assert doc["recommendation"]["format"] == "int8"
    assert "kv_cache_bytes" in doc["derivations"]


def test_params_only_with_a_device(runs):
    doc = _ok_json(runs, "params7b")
    assert doc["model"]["params"] == 7_000_000_000
    by = {f["name"]: f for f in doc["formats"]}
    assert by["fp16"]["weight_bytes"] == 14 * 10**9 and by["fp16"]["kv_cache_bytes"] == 0
    assert by["fp16"]["decode_tokens_per_s_bound"] == pytest.approx(1008e9 / 14e9)
    assert doc["recommendation"]["format"] == "int8"


def test_custom_device_from_memory_and_bandwidth(runs):
    doc = _ok_json(runs, "custom")
    d = doc["device"]
    assert "custom" in d["name"]
    assert d["memory_bytes"] == 8 * 10**9 and d["bandwidth_bytes_per_s"] == 100e9 and d["peak_flops"] == {}
    for f in doc["formats"]:
        assert f["decode_tokens_per_s_bound"] == pytest.approx(100e9 / (f["weight_bytes"] + f["kv_cache_bytes"]))
        assert f["fits"] == (f["total_bytes"] <= int(8e9 * 0.9))
    assert doc["recommendation"]["format"] == "int4-g128"   # int8 (9.05 GB) does not fit 7.2 GB


def test_format_flags_restrict_the_listing(runs):
    doc = _ok_json(runs, "restrict")
    assert [f["name"] for f in doc["formats"]] == ["int4-g128", "fp16"]
    doc = _ok_json(runs, "no_device")
    assert [f["name"] for f in doc["formats"]] == ["int4-g128", "int8"]   # fp16 not listed ...
    params = doc["model"]["params"]
    for f in doc["formats"]:                                             # ... but still the yardstick
        assert f["compression_vs_fp16"] == pytest.approx(2 * params / f["weight_bytes"], rel=1e-12)
        assert f["kv_cache_bytes"] == 2 * 32 * 32 * 128 * 4096 * 1     # int8 KV: 1 byte per element
    assert doc["device"] is None and doc["recommendation"] is None


def test_config_json_path(runs):
    doc = _ok_json(runs, "config")
    assert doc["model"]["name"] == "good"                 # named after its directory
    assert doc["model"]["params"] == from_hf_config(GOOD_CONFIG).params()
    assert {f["kv_cache_bytes"] for f in doc["formats"]} == {2 * 4 * 2 * 32 * 1024 * 2}  # GQA: 2 KV heads


def test_human_output_with_explain(runs):
    r = runs["explain"]
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    out = r.stdout
    doc = _ok_json(runs, "json13")  # the same plan: the table must show its figures
    lines = out.splitlines()
    for f in doc["formats"]:
        row = [ln for ln in lines if re.match(rf"\s*{re.escape(f['name'])}\s", ln)
               and f"{f['weight_bytes'] / 1e9:,.2f}" in ln and f"{f['total_bytes'] / 1e9:,.2f}" in ln]
        assert row, f"no table row for {f['name']}"
    assert "Recommendation:" in out and "int8" in out.split("Recommendation:")[1].splitlines()[0]
    flat = " ".join(out.split())        # undo the terminal's line wrapping
    kv = flat.split("kv_cache_bytes:", 1)[1].split("activation_bytes:", 1)[0]
    for piece in ("40 layers", "40 KV heads", "128 head dim", "8,192", "6,710,886,400"):
        assert piece in kv, piece
    for fmt in DEFAULT_FORMATS:         # every format has its weight arithmetic
        assert re.search(rf"\b{re.escape(fmt)}\b weight_bytes: .*? = [\d,]+ B", flat)


def test_human_output_without_a_device(runs):
    r = runs["human_no_device"]
    assert r.returncode == 0, r.stderr
    assert "no --device" in r.stdout and "Recommendation:" not in r.stdout
    assert "How each figure is derived" not in r.stdout      # only with --explain


@pytest.mark.parametrize("key, names", [
    ("e_preset", ["llama-2-13c", "llama-2-13b"]),
    ("e_device", ["rtx-4091", "rtx-4090"]),
    ("e_params0", ["--params"]),
    ("e_params_abc", ["--params", "abc"]),
    ("e_context", ["--context", "-5"]),
    ("e_max_drop", ["--max-drop", "200"]),
    ("e_missing", ["missing"]),
    ("e_no_layers", ["num_hidden_layers", "config.json"]),
    ("e_both", ["--params"]),
    ("e_kv_format", ["--kv-format", "int5"]),
])
def test_user_errors_exit_2_with_one_line(runs, key, names):
    r = runs[key]
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for name in names:
        assert name in lines[0], (name, lines[0])
    assert r.stdout == ""   # nothing half-printed, even with --json
