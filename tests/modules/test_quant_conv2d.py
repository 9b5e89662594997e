"""QuantConv2d: forward equals F.conv2d with the dequantized weight, state_dict
round-trips, dtype plumbing, and clear errors.

Real data: the trained digits-cnn (its two 3x3 convs, 1->16 and 16->32 over
8x8 images) and the scikit-learn digits it was trained on.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

import shrink
from shrink.models.digits import accuracy, digits_data
from shrink.modules import QuantConv2d
from shrink.quant import QuantSpec, dequantize, quantize

INT8 = QuantSpec(bits=8)                                                       # symmetric per output channel
INT4_G16 = QuantSpec(bits=4, symmetric=False, granularity="group", group_size=16)
INT4_G32_SYM = QuantSpec(bits=4, granularity="group", group_size=32)         # ragged last group on 144 columns
SPECS = {"int8-channel": INT8, "int4-g16": INT4_G16, "int4-g32-sym": INT4_G32_SYM,
         "int3-tensor": QuantSpec(bits=3, granularity="tensor"), "nf4-g16": QuantSpec(format="nf4", granularity="group", group_size=16)}


@pytest.fixture(scope="module")
def cnn():
    return shrink.load("digits-cnn")


@pytest.fixture(scope="module")
def digits():
    return digits_data()


def _matrix(conv: nn.Conv2d) -> torch.Tensor:
    return conv.weight.detach().reshape(conv.out_channels, -1)


def _conv_inputs(cnn, digits, index: int) -> torch.Tensor:
    """The real inputs of cnn[index] on the test images."""
    with torch.no_grad():
        return cnn[:index](digits.x_test[:64])


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
@pytest.mark.parametrize("index", [1, 4], ids=["conv1", "conv2"])
def test_forward_is_f_conv2d_with_the_dequantized_weight(cnn, digits, spec, index):
    conv = cnn[index]
    qt = quantize(_matrix(conv), spec)
    m = QuantConv2d.from_conv(conv, qt)
    x = _conv_inputs(cnn, digits, index)
    w_hat = dequantize(qt).reshape(conv.weight.shape)
    with torch.no_grad():
        expected = F.conv2d(x, w_hat, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        y = m(x)
        assert torch.equal(y, expected)
        assert torch.equal(m.dequantized_weight(), w_hat)
        # and it is a quantized conv, not a broken one: close to the float layer
        ref = conv(x)
    rel = (y - ref).norm() / ref.norm()
    assert rel < {8: 0.02, 4: 0.2, 3: 0.5}[spec.bits]
    assert m.kernel == "reference" and "F.conv2d" in m.kernel_reason


@pytest.mark.parametrize("geometry", [
    dict(stride=2, padding=1),
    dict(stride=(1, 2), padding=(0, 2), dilation=(2, 1)),
    dict(padding="same", dilation=2),
    dict(padding="valid"),
    dict(groups=2, padding=1),
    dict(groups=4, stride=2),
], ids=["stride2", "asym", "same-dilated", "valid", "groups2", "depthwise-ish"])
@pytest.mark.parametrize("kernel_size", [3, (2, 3)])
def test_geometry_matches_f_conv2d_in_float64(geometry, kernel_size):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, kernel_size, **geometry).double()
    qt = quantize(_matrix(conv), INT4_G16)
    m = QuantConv2d.from_conv(conv, qt)
    x = torch.randn(3, 8, 11, 9, dtype=torch.float64)
    w_hat = dequantize(qt).to(torch.float64).reshape(conv.weight.shape)
    with torch.no_grad():
        run = lambda t: F.conv2d(t, w_hat, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)  # noqa: E731
        assert torch.equal(m(x), run(x))
        assert torch.equal(m(x[0]), run(x[0]))  # unbatched [C, H, W]
    assert (m.stride, m.dilation, m.groups) == (conv.stride, conv.dilation, conv.groups)
    assert m.in_features == 8 // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]


def test_from_conv_with_a_spec_quantizes_the_weight_view(cnn):
    conv = cnn[4]
    a = QuantConv2d.from_conv(conv, spec=INT4_G16)
    b = QuantConv2d.from_conv(conv, quantize(_matrix(conv), INT4_G16))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert torch.equal(a.bias, conv.bias) and a.bias.data_ptr() != conv.bias.data_ptr()
    assert not a.bias.requires_grad


def test_a_4d_qtensor_per_output_channel_is_the_same_weight(cnn):
    conv = cnn[4]
    for spec in (INT8, INT4_G16, QuantSpec(bits=8, granularity="tensor")):
        flat = QuantConv2d.from_conv(conv, quantize(_matrix(conv), spec))
        four = QuantConv2d.from_conv(conv, quantize(conv.weight.detach(), spec))
        assert torch.equal(flat.dequantized_weight(), four.dequantized_weight())
        assert four.to_qtensor().shape == torch.Size((32, 144))
    with pytest.raises(ValueError, match="axis 1.*quantize the matrix"):
        QuantConv2d.from_conv(conv, quantize(conv.weight.detach(), QuantSpec(bits=8, axis=1)))


def test_int8_digits_cnn_keeps_its_accuracy(digits):
    model = shrink.load("digits-cnn")
    base = accuracy(model, digits.x_test, digits.y_test)
    for i in (1, 4):
        model[i] = QuantConv2d.from_conv(model[i], spec=INT8)
    assert abs(accuracy(model, digits.x_test, digits.y_test) - base) <= 0.01
    assert "QuantConv2d(16, 32, kernel_size=(3, 3)" in repr(model)


def test_nbytes_and_repr(cnn):
    conv = cnn[4]
    qt = quantize(_matrix(conv), INT4_G16)
    m = QuantConv2d.from_conv(conv, qt)
    assert m.nbytes == qt.nbytes == 32 * 144 // 2 + 2 * 32 * 9 * 2
    assert m.resident_nbytes == m.nbytes + 32 * 4  # + the fp32 bias
    text = repr(m)
    assert "format=int4 asymmetric per group of 16" in text and "kernel=reference" in text
    cached = QuantConv2d.from_conv(conv, qt, cache_weight=True)
    assert cached.resident_nbytes == m.resident_nbytes + 32 * 144 * 4
    x = torch.randn(2, 16, 8, 8)
    assert torch.equal(cached(x), m(x))


# ------------------------------------------------------------------ state_dict


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_state_dict_safetensors_round_trip_is_bit_exact(cnn, spec, tmp_path):
    conv = cnn[4]
    m = QuantConv2d.from_conv(conv, spec=spec)
    sd = m.state_dict()
    assert set(sd) == {"codes", "scales", "bias"} | ({"zeros"} if spec.has_zero_point else set())
    save_file(sd, tmp_path / "layer.safetensors")
    shell = QuantConv2d(16, 32, 3, spec, padding=1)
    shell.load_state_dict(load_file(tmp_path / "layer.safetensors"))
    for k, v in shell.state_dict().items():
        assert v.dtype == sd[k].dtype and torch.equal(v, sd[k]), k
    x = torch.randn(2, 16, 8, 8)
    assert torch.equal(shell(x), m(x))
    cached = QuantConv2d(16, 32, 3, spec, padding=1, cache_weight=True)
    cached.load_state_dict(sd)  # the cache is rebuilt from the loaded codes
    assert torch.equal(cached(x), m(x))


def test_loading_buffers_of_another_dtype_is_refused(cnn):
    m = QuantConv2d.from_conv(cnn[4], spec=INT4_G16)
    other = QuantConv2d(16, 32, 3, INT4_G16.with_(scale_dtype=torch.float32), padding=1)
    with pytest.raises(RuntimeError, match="scales is stored as torch.float16.*QuantConv2d keeps torch.float32"):
        other.load_state_dict(m.state_dict())
    with pytest.raises(RuntimeError, match="size mismatch"):
        QuantConv2d(16, 32, 5, INT4_G16, padding=1).load_state_dict(m.state_dict())


def test_dtype_casts_keep_the_stored_numerics(cnn):
    spec = INT4_G16.with_(scale_dtype=torch.float32)
    m = QuantConv2d.from_conv(cnn[4], spec=spec)
    before = {k: v.clone() for k, v in m.state_dict().items() if k != "bias"}
    x = torch.randn(2, 16, 8, 8, dtype=torch.float64)
    m.double()
    assert all(torch.equal(m.state_dict()[k], v) and m.state_dict()[k].dtype == v.dtype for k, v in before.items())
    assert m.bias.dtype == torch.float64
    y = m(x)
    assert y.dtype == torch.float64
    expected = F.conv2d(x, m.dequantized_weight().double(), m.bias, padding=1)
    assert torch.equal(y, expected)
    m.half()
    assert m.codes.dtype == torch.uint8 and m.scales.dtype == torch.float32 and m.zeros.dtype == torch.float32
    assert m(x.float()).dtype == torch.float32  # weight follows the input's dtype


def test_inputs_are_never_modified(cnn):
    conv = cnn[4]
    qt = quantize(_matrix(conv), INT4_G16)
    before = (qt.data.clone(), qt.scale.clone(), qt.zero_point.clone(), conv.weight.detach().clone())
    m = QuantConv2d.from_conv(conv, qt)
    m.load_state_dict(QuantConv2d.from_conv(conv, spec=INT4_G16.with_(group_size=16), observer="mse").state_dict())
    assert all(torch.equal(a, b) for a, b in zip(before, (qt.data, qt.scale, qt.zero_point, conv.weight)))


# ------------------------------------------------------------------ errors


def test_bad_construction_is_refused(cnn):
    conv = cnn[4]
    qt = quantize(_matrix(conv), INT8)
    with pytest.raises(ValueError, match="padding_mode 'reflect' is not supported"):
        QuantConv2d.from_conv(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), spec=INT8)
    with pytest.raises(ValueError, match="exactly one of qtensor= .* or spec="):
        QuantConv2d.from_conv(conv)
    with pytest.raises(ValueError, match="exactly one"):
        QuantConv2d.from_conv(conv, qt, spec=INT8)
    with pytest.raises(TypeError, match="expects an nn.Conv2d"):
        QuantConv2d.from_conv(nn.Linear(4, 4), spec=INT8)
    with pytest.raises(TypeError, match="expects a QTensor"):
        QuantConv2d.from_qtensor(_matrix(conv), in_channels=16, kernel_size=3)
    with pytest.raises(ValueError, match=r"QTensor of shape \(32, 144\) does not match.*\[32, 400\]"):
        QuantConv2d.from_qtensor(qt, in_channels=16, kernel_size=5)
    with pytest.raises(ValueError, match=r"bias must be a float tensor of shape \(32,\)"):
        QuantConv2d.from_qtensor(qt, torch.zeros(16), in_channels=16, kernel_size=3)
    with pytest.raises(ValueError, match="divisible by groups=3"):
        QuantConv2d(16, 32, 3, INT8, groups=3)
    with pytest.raises(ValueError, match="in_channels must be a positive integer"):
        QuantConv2d(0, 32, 3, INT8)
    with pytest.raises(ValueError, match="stride must be an integer >= 1"):
        QuantConv2d(16, 32, 3, INT8, stride=0)
    with pytest.raises(ValueError, match="padding='same' needs stride 1"):
        QuantConv2d(16, 32, 3, INT8, stride=2, padding="same")
    with pytest.raises(TypeError, match="spec must be a QuantSpec"):
        QuantConv2d(16, 32, 3, "int8")


def test_bad_inputs_are_refused(cnn):
    m = QuantConv2d.from_conv(cnn[4], spec=INT8)
    with pytest.raises(ValueError, match=r"shape \(2, 8, 8, 8\) does not match in_channels=16"):
        m(torch.randn(2, 8, 8, 8))
    with pytest.raises(ValueError, match="does not match in_channels"):
        m(torch.randn(2, 16 * 64))
    with pytest.raises(TypeError, match="floating-point"):
        m(torch.ones(2, 16, 8, 8, dtype=torch.int64))
