"""shrink.compress on Conv2d layers: the real digits CNN (trained on scikit-learn's
handwritten digits) quantized data-free and with GPTQ on calibration images, and a
small CNN with grouped, depthwise, dilated, strided and reflect-padded convs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import shrink
from shrink.models.digits import accuracy, digits_data
from shrink.modules import QuantConv2d
from shrink.recipe import compress

ACC_DROP_INT8 = 0.01   # int8 per channel: within one point of float
ACC_DROP_W4 = 0.02     # 4-bit: within two points (450 test images: one image is 0.22 points)


@pytest.fixture(scope="module")
def digits():
    model = shrink.load("digits-cnn")
    split = digits_data()
    calib = [split.x_train[i:i + 128] for i in range(0, 512, 128)]

    def acc(m):
        return {"name": "accuracy", "value": accuracy(m, split.x_test, split.y_test)}

    return model, calib, acc


def convs(model: nn.Module, cls=nn.Conv2d) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) is cls]


def measured_errors(original: nn.Module, compressed: nn.Module, batches) -> dict[str, float]:
    """Per QuantConv2d: 2/n ||conv_q(x) - conv_float(x)||^2 over the inputs x it receives in the
    compressed model (n = output positions = im2col rows): what tr(E H E^T) must equal when H
    is the conv's Hessian over its patches."""
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_pre_hook(lambda _m, a, name=name: seen.setdefault(name, []).append(a[0]))
             for name, m in compressed.named_modules() if isinstance(m, QuantConv2d)]
    try:
        with torch.no_grad():
            for b in batches:
                compressed(b)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    with torch.no_grad():
        for name, xs in seen.items():
            q, f = compressed.get_submodule(name), original.get_submodule(name)
            sq, n = 0.0, 0
            for x in xs:
                d = (q(x).double() - f(x).double())  # the bias cancels
                sq += float((d ** 2).sum())
                n += d.shape[0] * d.shape[2] * d.shape[3]
            out[name] = 2 * sq / n
    return out


# ----------------------------------------------------------------------------- the digits CNN

@pytest.mark.parametrize("recipe, drop, fmt", [
    ("int8", ACC_DROP_INT8, "int8-channel"),
    ("w4-rtn", ACC_DROP_W4, "int4-g128"),                         # 9 and 144 columns: one ragged group of 128
    ([{"rtn": {"bits": 4, "group_size": None}}], ACC_DROP_W4, "int4-channel"),
    ("kmeans16", ACC_DROP_W4, "kmeans16"),
], ids=["int8", "w4-rtn", "int4-channel", "kmeans16"])
def test_data_free_steps_replace_every_conv(digits, recipe, drop, fmt):
    model, _, acc = digits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = compress(model, recipe, evaluate=acc)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # input left alone
    assert convs(model) == ["1", "4"]
    assert convs(res.model) == [] and convs(res.model, QuantConv2d) == ["1", "4"]
    base, comp = res.metrics["baseline"], res.metrics["compressed"]
    assert comp["quality"]["value"] >= base["quality"]["value"] - drop, (base["quality"], comp["quality"])
    layers = {l.name: l for l in res.steps[0].layers}
    assert set(layers) == {"1", "4", "9"} and res.steps[0].skipped == []
    assert layers["1"].shape == (16, 9) and layers["4"].shape == (32, 144)
    assert all(layers[n].format == fmt and layers[n].kernel == "reference" for n in ("1", "4"))
    # bytes and logical parameters: packed convs counted like QuantLinear
    saved = sum(l.bytes_fp32 - l.bytes_stored for l in layers.values())
    assert base["size_bytes"] - comp["size_bytes"] == saved > 0
    assert comp["params"] == base["params"] == sum(p.numel() for p in model.parameters())
    for n in ("1", "4"):
        q = res.model.get_submodule(n)
        assert layers[n].bytes_stored == q.nbytes == q.to_qtensor().nbytes
        if recipe == "int8":  # one byte per weight + one fp16 scale per filter
            assert q.nbytes == q.out_features * q.in_features + 2 * q.out_features


def test_int4_groups_are_ragged_over_the_conv_columns(digits):
    model, _, _ = digits
    res = compress(model, "w4-rtn")
    q = res.model.get_submodule("4")
    assert q.in_features == 144 and tuple(q.scales.shape) == (32, 2)  # groups of 128 and 16 columns
    w = model.get_submodule("4").weight.detach()
    err = (q.dequantized_weight() - w).abs() / w.abs().amax()
    assert float(err.max()) < 0.1


@pytest.mark.parametrize("recipe", [
    "w4-gptq",
    [{"gptq": {"bits": 3, "group_size": None}}],
], ids=["w4-gptq", "int3-channel"])
def test_gptq_calibrates_convs_on_their_patches_and_beats_rtn(digits, recipe):
    model, calib, acc = digits
    res = compress(model, recipe, calibration=calib, evaluate=acc)
    assert convs(res.model) == [] and convs(res.model, QuantConv2d) == ["1", "4"]
    layers = {l.name: l for l in res.steps[0].layers}
    base, comp = res.metrics["baseline"], res.metrics["compressed"]
    assert comp["quality"]["value"] >= base["quality"]["value"] - ACC_DROP_W4
    n_patches = sum(b.shape[0] for b in calib) * 64  # 8x8 outputs per image ("same" padding)
    for name in ("1", "4"):
        l = layers[name]
        # solved on calibration data, not the RTN fallback for layers outside the blocks
        assert "RTN" not in l.note and f"Hessian over {n_patches} im2col patches" in l.note
        assert l.error_rtn is not None and l.error <= l.error_rtn, (name, l.error, l.error_rtn)
    # the recorded (Hessian-weighted) error is the conv's real output error on its inputs
    measured = measured_errors(model, res.model, calib)
    for name in ("1", "4"):
        assert layers[name].error == pytest.approx(measured[name], rel=1e-4)


def test_mixed_precision_allocates_conv_widths(digits):
    model, calib, acc = digits
    res = compress(model, [{"mixed_precision": {"bits_per_weight": 4.5, "group_size": None}}],
                   calibration=calib, evaluate=acc)
    layers = {l.name: l for l in res.steps[0].layers}
    assert set(layers) == {"1", "4", "9"} and convs(res.model, QuantConv2d) == ["1", "4"]
    stored = sum(l.bytes_stored for l in layers.values())
    assert 8 * stored <= 4.5 * sum(l.shape[0] * l.shape[1] for l in layers.values())
    assert all(l.error <= l.error_rtn * (1 + 1e-9) for l in layers.values())
    assert res.metrics["compressed"]["quality"]["value"] >= res.metrics["baseline"]["quality"]["value"] - ACC_DROP_W4


# ----------------------------------------------------------------------------- other conv shapes

def toy_cnn() -> nn.Sequential:
    """Digit images through a grouped dilated conv, a strided depthwise conv and a reflect-padded 1x1."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),                                # 1
        nn.Conv2d(8, 16, 3, padding="same", dilation=2, groups=4), nn.ReLU(),    # 3: grouped
        nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16), nn.ReLU(),         # 5: depthwise, 8x8 -> 4x4
        nn.Conv2d(16, 8, 1, padding=1, padding_mode="reflect"),                  # 7: 4x4 -> 6x6
        nn.Flatten(), nn.Linear(8 * 36, 10),                                     # 9
    ).eval()


@pytest.fixture(scope="module")
def toy():
    split = digits_data()
    return toy_cnn(), [split.x_train[i:i + 64] for i in range(0, 256, 64)]


def test_grouped_convs_get_one_hessian_per_filter_group(toy):
    model, calib = toy
    res = compress(model, "w4-gptq", calibration=calib)
    step = res.steps[0]
    layers = {l.name: l for l in step.layers}
    assert set(layers) == {"1", "3", "5", "9"}
    for name, groups in (("3", 4), ("5", 16)):
        q = res.model.get_submodule(name)
        assert isinstance(q, QuantConv2d) and q.groups == groups
        assert f"groups={groups}: one Hessian per filter group" in layers[name].note
    assert all(layers[n].error <= layers[n].error_rtn for n in ("1", "3", "5"))
    # one Hessian over all input channels would give a different (wrong) figure: this one is the output error
    measured = measured_errors(model, res.model, calib)
    for name in ("1", "3", "5"):
        assert layers[name].error == pytest.approx(measured[name], rel=1e-4), name
    with torch.no_grad():
        x = calib[0]
        ref, got = model(x), res.model(x)
    assert float(((got - ref) ** 2).mean() / (ref ** 2).mean()) < 0.05


def test_unsupported_convs_are_skipped_with_the_reason(toy):
    model, calib = toy
    for recipe in ("int8", "w4-gptq", [{"mixed_precision": {"bits_per_weight": 5.0}}]):
        res = compress(model, recipe, calibration=calib)
        skipped = res.steps[0].skipped
        assert [s["name"] for s in skipped] == ["7"], (recipe, skipped)
        assert "padding_mode='reflect'" in skipped[0]["reason"] and "zero padding only" in skipped[0]["reason"]
        assert type(res.model.get_submodule("7")) is nn.Conv2d
        assert torch.equal(res.model.get_submodule("7").weight, model.get_submodule("7").weight)
    for step in ("awq", "smoothquant"):
        res = compress(model, [{step: {}}], calibration=calib)
        skipped = {s["name"]: s["reason"] for s in res.steps[0].skipped}
        assert set(skipped) == {"1", "3", "5", "7"}
        assert all(f"{step} folds per-input-channel scales" in skipped[n] for n in ("1", "3", "5"))
        assert convs(res.model) == ["1", "3", "5", "7"]              # every conv left float
        assert [l.name for l in res.steps[0].layers] == ["9"]         # the Linear still compressed
