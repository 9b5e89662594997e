"""Quantizing a pruned CNN keeps the sparsity in storage (issue 6): on digits-cnn, prune 50% then
rtn int8 / int4 installs SparseQuantConv2d (the kept codes + a bitmask), smaller than the dense codes
by the bytes counted by hand, with the outputs and accuracy of the model holding the same codes
dense; the compressed directory reloads bit-exactly; a conv pruned with dense storage and GPTQ's
conv path (Hessians over the patches, masked) take the same route; steps that cannot take a pruned
conv (awq) say so."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import shrink
from shrink.eval.inspect import layer_rows
from shrink.models.compressed import load_compressed, save_compressed
from shrink.models.digits import accuracy, digits_data
from shrink.modules import QuantConv2d, SparseConv2d, SparseQuantConv2d, SparseQuantLinear
from shrink.recipe import compress
from shrink.recipe.hessians import HessianCollector
from shrink.surgery import kind_of, replace_module, select_modules

PRUNE = {"prune": {"method": "magnitude", "sparsity": 0.5}}
CONVS = ("1", "4")   # digits-cnn: Conv2d(1, 16, 3) and Conv2d(16, 32, 3), then Linear(512, 10) as "9"


@pytest.fixture(scope="module")
def digits():
    model = shrink.load("digits-cnn")
    split = digits_data()
    calib = [split.x_train[i:i + 128] for i in range(0, 256, 128)]
    return model, calib, split


@pytest.fixture(scope="module")
def runs(digits):
    model, calib, _ = digits
    recipes = {"int8": [PRUNE, {"rtn": {"bits": 8, "group_size": None}}],
               "int4": [PRUNE, {"rtn": {"bits": 4, "group_size": None}}],
               "dense-int8": [{"rtn": {"bits": 8, "group_size": None}}]}
    return {k: compress(model, r, calibration=calib, measure_speed=False) for k, r in recipes.items()}


def _dense_codes(model: nn.Module) -> nn.Module:
    """The same codes stored dense: every sparse quantized layer as its QuantConv2d / QuantLinear."""
    out = copy.deepcopy(model)   # BatchNorm, and any layer already dense, as they are
    for name, mod in model.named_modules():
        if isinstance(mod, (SparseQuantConv2d, SparseQuantLinear)):
            replace_module(out, name, mod.dense_codes())
    return out.eval()


@pytest.mark.parametrize("bits", [8, 4])
def test_prune_then_rtn_stores_the_convs_kept_codes_and_a_bitmask(runs, bits):
    res = runs[f"int{bits}"]
    convs = {n: m for n, m in res.model.named_modules() if isinstance(m, SparseQuantConv2d)}
    assert sorted(convs) == list(CONVS)
    assert not any(isinstance(m, SparseConv2d) for m in res.model.modules())
    rec = {l.name: l for l in res.steps[1].layers}
    dense = {l.name: l.bytes_stored for l in runs["dense-int8"].steps[0].layers}
    for name, mod in convs.items():
        out_f, in_f = mod.out_features, mod.in_features
        scales = out_f * 2 * 2   # per filter: fp16 scale + zero-point
        assert mod.layout == "bitmask" and mod.nnz == out_f * in_f // 2   # magnitude: exactly 50% a layer
        by_hand = (mod.nnz * bits + 7) // 8 + (out_f * in_f + 7) // 8 + scales
        assert rec[name].bytes_stored == mod.nbytes == by_hand
        assert rec[name].format == f"int{bits}-channel+bitmask" and "pruned weights dequantize to exactly 0" in \
            rec[name].note
        dense_codes = (out_f * in_f * bits + 7) // 8 + scales
        assert mod.nbytes < dense_codes
        if bits == 8:
            assert dense[name] == dense_codes   # the unpruned int8 run stores every code
        d = mod.dense_weight()
        assert bool((d[~mod.mask()] == 0).all()) and int((d == 0).sum()) >= out_f * in_f // 2
    if bits == 8:   # conv2 (32 x 144): 3008 bytes against 4736 for its dense codes
        assert convs["4"].nbytes == 3008


@pytest.mark.parametrize("bits", [8, 4])
def test_outputs_and_accuracy_equal_the_dense_codes_model(runs, digits, bits):
    _, _, split = digits
    res = runs[f"int{bits}"]
    same = _dense_codes(res.model)
    assert not any(isinstance(m, (SparseQuantConv2d, SparseQuantLinear)) for m in same.modules())
    assert sum(isinstance(m, QuantConv2d) for m in same.modules()) == 2
    with torch.no_grad():
        assert torch.equal(res.model(split.x_test), same(split.x_test))
    acc = accuracy(res.model, split.x_test, split.y_test)
    assert acc == accuracy(same, split.x_test, split.y_test)
    assert acc > 0.9   # the pruned and quantized CNN still reads digits


def test_save_and_load_round_trip_bit_exact(runs, digits, tmp_path):
    _, _, split = digits
    res = runs["int4"]
    out = save_compressed(res.model, tmp_path / "cnn", base={"kind": "builtin", "name": "digits-cnn"})
    entry = json.loads((out / "manifest.json").read_text())["modules"]["4"]
    assert entry["type"] == "SparseQuantConv2d" and entry["layout"] == "bitmask" and entry["nnz"] == 2304
    assert entry["kernel_size"] == [3, 3] and entry["spec"]["bits"] == 4
    back = load_compressed(out, build_builtin=shrink.load)
    assert isinstance(back.get_submodule("4"), SparseQuantConv2d)
    a, b = res.model.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(back(split.x_test), res.model(split.x_test))
    # a manifest whose nnz disagrees with the stored pattern is refused, naming the directory
    bad = json.loads((out / "manifest.json").read_text())
    bad["modules"]["4"]["nnz"] = 2000
    (out / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="manifest"):
        load_compressed(out, build_builtin=shrink.load)


def test_dense_storage_prune_and_gptq_take_the_same_route(digits):
    model, calib, split = digits
    res = compress(model, [{"prune": {"method": "magnitude", "sparsity": 0.5, "storage": "dense"}},
                           {"gptq": {"bits": 4, "group_size": None}}], calibration=calib[:1], measure_speed=False)
    conv = res.model.get_submodule("4")
    assert isinstance(conv, SparseQuantConv2d) and conv.nnz == 2304
    rec = {l.name: l for l in res.steps[1].layers}
    assert "masked GPTQ" in rec["4"].note and rec["4"].format == "int4-channel+bitmask"
    assert accuracy(res.model, split.x_test, split.y_test) > 0.9


def test_steps_that_cannot_take_a_pruned_conv_leave_it_and_say_so(digits):
    model, calib, _ = digits
    res = compress(model, [PRUNE, {"awq": {"bits": 4}}], calibration=calib[:1], measure_speed=False)
    assert isinstance(res.model.get_submodule("4"), SparseConv2d)
    reasons = {s["name"]: s["reason"] for s in res.steps[1].skipped}
    assert "sparse_conv2d" in reasons["4"] and "1" in reasons


def test_a_pruned_conv_is_a_target_seen_through_its_patches(digits):
    model, calib, _ = digits
    pruned = compress(model, [PRUNE], measure_speed=False).model
    sp = pruned.get_submodule("4")
    assert isinstance(sp, SparseConv2d) and kind_of(sp) == "sparse_conv2d"
    t = next(t for t in select_modules(pruned).targets if t.name == "4")
    assert t.kind == "sparse_conv2d" and (t.out_features, t.in_features) == (32, 144)
    assert torch.equal(t.weight_view(), sp.dense_weight())
    with pytest.raises(ValueError, match="stored compressed"):
        t.set_weight(torch.zeros(32, 144))
    # its Hessian is taken over the im2col patches, as a dense conv's: the same as the unpruned conv's
    x = torch.randn(8, 16, 8, 8)
    dense_t = next(t for t in select_modules(model).targets if t.name == "4")
    a, b = HessianCollector([t]), HessianCollector([dense_t])
    a("4", x)
    b("4", x)
    assert torch.equal(a.hessians("4")[0], b.hessians("4")[0]) and a.hessians("4")[0].shape == (144, 144)
    # inspect describes it (it has no .weight): the kept values and the pattern
    row = next(r for r in layer_rows(pruned, sqnr=False) if r.name == "4")
    assert row.kind == "sparse_conv2d" and row.format == "float32 bitmask" and row.bytes == sp.nbytes
