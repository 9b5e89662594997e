"""`inspect`: layer rows, weight statistics and per-layer sensitivity (eval/inspect.py, recipe/inspect.py)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from shrink.eval.inspect import SQNR_FORMATS, layer_rows, rtn_weight, spec_label, weight_stats
from shrink.quant import QuantSpec
from shrink.recipe.inspect import inspect_model, inspect_module, output_errors
from shrink.recipe.records import model_nbytes, model_params


@pytest.fixture(scope="module")
def mlp():
    from shrink.recipe.job import prepare

    model, batches, _, _, _ = prepare("digits-mlp")
    return model, batches


@pytest.fixture(scope="module")
def cnn():
    from shrink.recipe.job import prepare

    model, batches, _, _, _ = prepare("digits-cnn")
    return model, batches


def row(rows, name):
    return next(r for r in (rows if isinstance(rows, list) else rows["layers"])
                if (r.name if hasattr(r, "name") else r["name"]) == name)


# ----------------------------------------------------------------------------- statistics

def test_stats_of_a_real_layer_match_a_float64_numpy_reference(mlp):
    model, _ = mlp
    r = row(layer_rows(model), "2")
    w = model[2].weight.detach().double().numpy().ravel()
    mean, std = w.mean(), w.std()
    z = (w - mean) / std
    assert r.stats.mean == pytest.approx(mean, rel=1e-12)
    assert r.stats.std == pytest.approx(std, rel=1e-12)
    assert (r.stats.min, r.stats.max) == (w.min(), w.max())
    assert r.stats.max_over_std == pytest.approx(np.abs(w).max() / std, rel=1e-12)
    assert r.stats.kurtosis == pytest.approx((z ** 4).mean() - 3.0, rel=1e-10)
    assert r.stats.frac_over_6std == (np.abs(w) > 6 * std).mean()
    assert r.stats.sparsity == (w == 0).mean() == 0.0
    assert r.shape == (64, 128) and r.params == 64 * 128 + 64 and r.type == "Linear" and r.format == "float32"
    try:
        from scipy.stats import kurtosis
    except ImportError:
        return
    assert r.stats.kurtosis == pytest.approx(kurtosis(w, fisher=True, bias=True), rel=1e-10)


def test_stats_of_hand_made_tensors_have_known_values():
    # 0, 0, 1, -1 repeated: mean 0, variance 1/2, m4 1/2 -> excess kurtosis 2 - 3 = -1; half zeros
    s = weight_stats(torch.tensor([0.0, 0.0, 1.0, -1.0]).repeat(250))
    assert s.mean == 0.0 and s.std == pytest.approx(math.sqrt(0.5), rel=1e-15)
    assert s.kurtosis == pytest.approx(-1.0, rel=1e-12)
    assert s.sparsity == 0.5 and s.frac_over_6std == 0.0
    assert s.max_over_std == pytest.approx(math.sqrt(2.0), rel=1e-15)
    # 9999 alternating +-1 (sum 1) and one 100: exactly one entry beyond 6 std
    x = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(9999)] + [100.0])
    s = weight_stats(x)
    mean = 101.0 / 10000
    var = (9999 + 100.0 ** 2) / 10000 - mean ** 2
    assert s.mean == pytest.approx(mean, rel=1e-12) and s.std == pytest.approx(math.sqrt(var), rel=1e-12)
    assert s.frac_over_6std == 1e-4 and s.sparsity == 0.0
    assert s.max_over_std == pytest.approx(100.0 / math.sqrt(var), rel=1e-12)
    assert s.kurtosis > 100  # one huge outlier: very heavy-tailed
    # float16 input is measured in float64, not in its own precision
    assert weight_stats(x.half()).std == pytest.approx(math.sqrt(var), rel=1e-12)
    # a constant tensor has no spread: the ratios are undefined
    c = weight_stats(torch.zeros(3, 4))
    assert c.std == 0.0 and c.sparsity == 1.0 and math.isnan(c.kurtosis) and math.isnan(c.max_over_std)


# ----------------------------------------------------------------------------- sums

def test_rows_add_up_to_the_model_params_and_bytes(mlp, cnn):
    model, _ = mlp
    rows = layer_rows(model, sqnr=False)
    assert [r.name for r in rows] == ["0", "2", "4"]
    assert sum(r.params for r in rows) == model_params(model) == sum(p.numel() for p in model.parameters())
    assert sum(r.bytes for r in rows) == model_nbytes(model) == 4 * model_params(model)
    # the CNN's BatchNorm parameters and running statistics are outside the layer rows
    model, _ = cnn
    doc = inspect_module(model)
    bn = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    bn_bytes = sum(t.numel() * t.element_size() for m in bn for t in [*m.parameters(), *m.buffers()]
                   if t.is_floating_point())
    t = doc["totals"]
    assert t["layer_bytes"] + bn_bytes == t["size_bytes"] == model_nbytes(model)
    assert t["layer_params"] + sum(p.numel() for m in bn for p in m.parameters()) == t["params"]
    assert row(doc, "4")["shape"] == [32, 16, 3, 3] and row(doc, "4")["params"] == 32 * 16 * 9 + 32


def test_a_tied_head_is_counted_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 16)
            self.head = nn.Linear(16, 50, bias=False)
            self.head.weight = self.emb.weight

    model = Tied()
    rows = layer_rows(model)
    assert [(r.name, r.shared_with) for r in rows] == [("emb", None), ("head", "emb")]
    assert rows[1].params == 0 and rows[1].bytes == 0 and "shared with emb" in rows[1].note
    assert sum(r.params for r in rows) == model_params(model) == 800
    assert sum(r.bytes for r in rows) == model_nbytes(model)


# ----------------------------------------------------------------------------- sensitivity

def test_sqnr_falls_with_the_bit_width_for_every_layer(mlp, cnn):
    for model, _ in (mlp, cnn):
        for r in layer_rows(model):
            q = r.sqnr_db
            assert list(q) == list(SQNR_FORMATS)
            assert q["int8"] > q["int4-g128"] > q["int3-g128"] > 0, (r.name, q)
            # and each is what quantize/dequantize give
            w = r.weight.double()
            w_hat = rtn_weight(r.weight, "int4-g128").double()
            assert q["int4-g128"] == pytest.approx(10 * math.log10((w ** 2).sum() / ((w - w_hat) ** 2).sum()), rel=1e-9)


def _inputs(module: nn.Module, model: nn.Module, batches) -> list[torch.Tensor]:
    seen = []
    h = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().double()))
    try:
        with torch.no_grad():
            for b in batches:
                model(b)
    finally:
        h.remove()
    return seen


def test_output_error_equals_the_direct_dw_x_computation(mlp, cnn):
    model, batches = mlp
    errors = output_errors(model, batches)
    assert set(errors) == {"0", "2", "4"}
    layer = model[2]
    w = layer.weight.detach().double()
    dw = w - rtn_weight(layer.weight, "int4-g128").double()
    x = torch.cat(_inputs(layer, model, batches))        # [tokens, 128]
    direct = float((x @ dw.T).pow(2).sum() / (x @ w.T).pow(2).sum())
    assert errors["2"] == pytest.approx(direct, rel=1e-6)
    assert 0 < direct < 0.1
    # a conv: the same on its patches, computed here with F.conv2d itself
    model, batches = cnn
    errors = output_errors(model, batches)
    conv = model[4]
    w = conv.weight.detach().double()
    dw = w - rtn_weight(conv.weight.detach().reshape(32, -1), "int4-g128").double().reshape(w.shape)
    xs = _inputs(conv, model, batches)
    num = sum(float(F.conv2d(x, dw, padding=1).pow(2).sum()) for x in xs)
    den = sum(float(F.conv2d(x, w, padding=1).pow(2).sum()) for x in xs)
    assert errors["4"] == pytest.approx(num / den, rel=1e-6)


class Twins(nn.Module):
    """Two identical Linear layers on one input, except that `spiky` has an outlier input column."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.clean = nn.Linear(256, 64)
        self.spiky = nn.Linear(256, 64)
        with torch.no_grad():
            self.clean.weight.copy_(torch.randn(64, 256, generator=g) * 0.05)
            self.spiky.weight.copy_(self.clean.weight)
            self.spiky.weight[:, 7] *= 40.0
            self.spiky.bias.copy_(self.clean.bias)

    def forward(self, x):
        return self.clean(x) + self.spiky(x)


def test_an_outlier_column_ranks_its_layer_above_its_clean_twin():
    model = Twins()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(32, 256, generator=g) for _ in range(12)]
    with_data = inspect_module(model, batches)
    assert with_data["calibration"]["used"] and with_data["calibration"]["batches"] == 8  # capped
    assert with_data["sensitivity"] == {"ranked_by": "output_error_int4", "order": ["spiky", "clean"]}
    assert row(with_data, "spiky")["rank"] == 1 and row(with_data, "clean")["rank"] == 2
    assert row(with_data, "spiky")["output_error_int4"] > 2 * row(with_data, "clean")["output_error_int4"]
    assert row(with_data, "spiky")["stats"]["max_over_std"] > 2 * row(with_data, "clean")["stats"]["max_over_std"]
    data_free = inspect_module(model)
    assert data_free["sensitivity"] == {"ranked_by": "sqnr_int4", "order": ["spiky", "clean"]}
    assert data_free["calibration"]["used"] is False and row(data_free, "spiky")["output_error_int4"] is None


# ----------------------------------------------------------------------------- whole models

def test_digits_mlp_document(mlp):
    doc = inspect_model("digits-mlp")
    assert doc["calibration"]["used"] and doc["calibration"]["batches"] == 4
    assert doc["totals"]["compressible_layers"] == 3 and doc["totals"]["bytes_fp16"] == 2 * doc["totals"]["params"]
    assert sorted(r["rank"] for r in doc["layers"]) == [1, 2, 3]
    assert [r["bits_per_weight"] for r in doc["layers"]] == [32.0] * 3
    json.dumps(doc, allow_nan=False)  # nothing NaN or infinite in a plain float model
    off = inspect_model("digits-mlp", data=False)
    assert not off["calibration"]["used"] and all(r["output_error_int4"] is None for r in off["layers"])


def test_a_compressed_dir_reports_its_format_and_stored_bytes(tmp_path, capsys):
    from shrink.cli import main

    out = tmp_path / "run"
    assert main(["compress", "digits-mlp", "--recipe", "w4-rtn", "-o", str(out)]) == 0
    capsys.readouterr()
    result = json.loads((out / "result.json").read_text())
    for ref in (out, out / "model"):
        doc = inspect_model(str(ref))
        assert doc["source_model"] == "digits-mlp"
        layers = doc["layers"]
        assert [(r["type"], r["format"], r["quantized"]) for r in layers] == [("QuantLinear", "int4-g128", True)] * 3
        assert doc["totals"]["size_bytes"] == result["compressed"]["size_bytes"]
        assert doc["totals"]["layer_bytes"] == doc["totals"]["size_bytes"]
        assert doc["totals"]["params"] == result["compressed"]["params"]
        step = {l["name"]: l for l in result["steps"][0]["layers"]}
        for r in layers:
            bias = r["shape"][0] * 4
            assert r["bytes"] == step[r["name"]]["bytes_stored"] + bias
            assert r["sqnr_db"] is None and r["rank"] is None
            assert r["bits_per_weight"] < 6
        assert doc["calibration"] == {**doc["calibration"], "used": False, "reason": "every layer is already quantized"}


def test_spec_labels_use_the_api_format_names():
    assert spec_label(QuantSpec.from_name("int4-g128")) == "int4-g128"
    assert spec_label(QuantSpec.from_name("int8")) == "int8"
    assert spec_label(QuantSpec.from_name("nf4-g64")) == "nf4-g64"
    assert spec_label(QuantSpec(bits=4, symmetric=True, granularity="group", group_size=32)) == "int4-g32 symmetric"
    assert spec_label(QuantSpec(bits=8, granularity="tensor")) == "int8 per tensor"
