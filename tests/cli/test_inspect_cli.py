"""`shrink inspect MODEL [--json]`: a JSON document with every layer, a readable table, exit 2 on bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from shrink.cli import main
from shrink.cli.inspect import HEAD_ROWS, MAX_ROWS, TAIL_ROWS, render


def run(*args):
    return subprocess.run([sys.executable, "-m", "shrink", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_tiny_gpt_json_is_one_document_with_every_layer():
    r = run("inspect", "tiny-gpt", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))  # no NaN/Infinity
    layers = doc["layers"]
    assert len(layers) == 30 and layers[0]["name"] == "model.embed_tokens" and layers[-1]["name"] == "lm_head"
    assert doc["calibration"]["used"] and 1 <= doc["calibration"]["batches"] <= 8
    assert doc["totals"]["compressible_layers"] == 28
    assert doc["totals"]["layer_params"] + doc["totals"]["other_params"] == doc["totals"]["params"]
    ranked = [l for l in layers if l["rank"] is not None]
    assert len(ranked) == 29 and sorted(l["rank"] for l in ranked) == list(range(1, 30))  # all but the embedding
    assert doc["sensitivity"]["order"][0] == next(l["name"] for l in layers if l["rank"] == 1)
    errs = [l["output_error_int4"] for l in sorted(ranked, key=lambda l: l["rank"])]
    assert errs == sorted(errs, reverse=True) and all(0 < e < 0.1 for e in errs)
    for l in layers:
        q = l["sqnr_db"]
        assert q["int8"] > q["int4-g128"] > q["int3-g128"], l["name"]
        assert set(l["stats"]) == {"mean", "std", "min", "max", "max_over_std", "kurtosis", "frac_over_6std", "sparsity"}


def test_table_has_totals_a_row_per_layer_and_the_ranking(capsys):
    assert main(["inspect", "digits-mlp"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("digits-mlp: 17,226 parameters") and "3 compressible" in out[0]
    header = next(i for i, line in enumerate(out) if line.startswith("name"))
    assert out[header].split() == ["name", "type", "shape", "params", "format", "bytes", "std", "max/std", "kurt",
                                   "SQNR8", "SQNR4", "SQNR3", "err@int4", "rank"]
    rows = [line.split() for line in out[header + 1: header + 4]]
    assert [r[:3] for r in rows] == [["0", "Linear", "128x64"], ["2", "Linear", "64x128"], ["4", "Linear", "10x64"]]
    assert sorted(r[-1] for r in rows) == ["1", "2", "3"] and all(r[-2].endswith("%") for r in rows)
    assert any(line.startswith("most sensitive: ") for line in out)


def test_no_data_ranks_by_weight_sqnr(capsys):
    assert main(["inspect", "digits-cnn", "--no-data", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["calibration"]["used"] is False and doc["sensitivity"]["ranked_by"] == "sqnr_int4"
    assert all(l["output_error_int4"] is None for l in doc["layers"])
    assert [l["shape"] for l in doc["layers"]] == [[16, 1, 3, 3], [32, 16, 3, 3], [10, 512]]


def test_long_tables_are_cut_with_a_note():
    layer = {"name": "", "type": "Linear", "shape": [4, 4], "params": 16, "format": "float32", "bytes": 64,
             "stats": {"std": 1.0, "max_over_std": 2.0, "kurtosis": 0.0}, "sqnr_db": None,
             "output_error_int4": None, "rank": None, "compressible": True, "quantized": False, "note": ""}
    n = MAX_ROWS + 25
    doc = {"model": "m", "source_model": "m", "layers": [{**layer, "name": f"layer{i}"} for i in range(n)],
           "totals": {"params": 16 * n, "size_bytes": 64 * n, "bits_per_weight": 32.0, "bytes_fp32": 64 * n,
                      "bytes_fp16": 32 * n, "layers": n, "compressible_layers": n, "quantized_layers": 0},
           "calibration": {"used": False, "reason": "no calibration data"},
           "sensitivity": {"ranked_by": "sqnr_int4", "order": []}}
    lines = render(doc)
    shown = [line for line in lines if line.startswith("layer")]
    assert len(shown) == HEAD_ROWS + TAIL_ROWS and shown[-1].startswith(f"layer{n - 1} ")
    assert any(f"{n - HEAD_ROWS - TAIL_ROWS} more layers not shown" in line for line in lines)
    assert len([line for line in render(doc, every=True) if line.startswith("layer")]) == n


def test_bad_input_is_one_line_exit_2(tmp_path):
    for arg, needle in (("no-such-model", "no-such-model"), (str(tmp_path / "missing"), "missing"),
                        ("tiny-gtp", "did you mean 'tiny-gpt'")):
        r = run("inspect", arg)
        assert r.returncode == 2, (arg, r.stderr)
        assert needle in r.stderr and "Traceback" not in r.stderr and r.stdout == ""
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
