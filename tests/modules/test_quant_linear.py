"""QuantLinear: kernel paths against the dequantize reference, fallbacks, state_dict round-trips.

Tolerances come from bf16 (unit roundoff u = 2^-9). The kernels take bf16
activations, hold scales (and folded zero-points) in bf16 and return bf16, so:

* against an exact emulation of what the kernel is given (x and the kernel's own
  bf16 scales/zeros, products summed in float64), the only error is rounding in
  the kernel: bound 2u * (|x| @ |w|^T) elementwise (output rounding plus one
  more rounding of intermediate bf16 values); observed <= 0.6u.
* against shrink's reference, F.linear(bf16(x), dequantize(qt)) in fp32, add the
  rounding of each scale to bf16 (<= u |w_hat|) and of each folded zero
  (8 - zp) * scale (<= u |zero|): bound 3u * (|x| @ |w_hat|^T) + u * (|x| @ |zero|^T).
  Observed here (MiniLM and random, batch 1/4/[2,7], every kernel spec below):
  max |dy| / max |y| <= 5.1e-3 (about 2.6u), elementwise |dy| / (|x| @ |w_hat|^T)
  <= 2.0e-3 (about 1.04u).
"""
from __future__ import annotations

import threading

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from shrink.modules import QuantLinear, select_kernel
from shrink.quant import QuantSpec, dequantize, quantize

U = 2.0 ** -9  # bf16 unit roundoff
INT4_G128 = QuantSpec.from_name("int4-g128")              # asymmetric, fp16 scale and zero per group
INT4_G32_SYM = QuantSpec(bits=4, granularity="group", group_size=32)
INT4_CHANNEL = QuantSpec(bits=4)                             # symmetric per channel: scale repeated per kernel group
INT4_FULL_G64 = QuantSpec(bits=4, full_range=True, granularity="group", group_size=64)
INT8 = QuantSpec(bits=8)                                     # symmetric per channel, codes -127..127
INT8_TENSOR = QuantSpec(bits=8, granularity="tensor")
KERNEL_SPECS = {
    "int4-g128": (INT4_G128, "int4pack_cpu"),
    "int4-g32-sym": (INT4_G32_SYM, "int4pack_cpu"),
    "int4-channel": (INT4_CHANNEL, "int4pack_cpu"),
    "int4-full-g64": (INT4_FULL_G64, "int4pack_cpu"),
    "int8": (INT8, "int8pack_cpu"),
    "int8-tensor": (INT8_TENSOR, "int8pack_cpu"),
}
SHAPES = ((1,), (4,), (2, 7))


def _rand(*shape, seed=0, std=0.02):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * std


def _kernel_weight_emulated(m: QuantLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """(w, zero) in float64 exactly as the kernel is told to compute them."""
    q = m.to_qtensor().int_codes().double()
    ks = m._kernel_scales.double()
    if m.kernel == "int4pack_cpu":
        g = m._kernel_group
        if m.spec.symmetric:
            q = q + 8
        scale, zero = (ks[..., i].t().repeat_interleave(g, dim=1) for i in (0, 1))
        return (q - 8) * scale + zero, zero
    return q * ks[:, None], torch.zeros_like(q)


def _check_against_references(m: QuantLinear, bias: torch.Tensor | None, seed: int) -> float:
    """Kernel output vs the exact emulation and vs shrink's reference; returns max |dy| / max |y|."""
    w_hat = dequantize(m.to_qtensor()).double()
    w_emu, _ = _kernel_weight_emulated(m)
    zero = torch.zeros_like(w_hat)
    if m.spec.has_zero_point:  # (8 - zp) * scale per element, as folded into the kernel
        lay = m.to_qtensor().layout
        zp = lay.params_as_blocks(m.zeros, "zp").double().expand(lay.rows, lay.groups, lay.group_size)
        sc = lay.params_as_blocks(m.scales, "s").double().expand(lay.rows, lay.groups, lay.group_size)
        zero = lay.from_blocks((8 - zp) * sc)
    b = 0 if bias is None else bias.double()
    worst = 0.0
    for i, lead in enumerate(SHAPES):
        x = torch.randn(*lead, m.in_features, generator=torch.Generator().manual_seed(seed + i))
        with torch.no_grad():
            y = m(x)
        assert y.shape == (*lead, m.out_features) and y.dtype == x.dtype
        xb = x.bfloat16().double()
        y = y.double()
        emu = xb @ w_emu.t() + b
        assert ((y - emu).abs() <= 2 * U * (xb.abs() @ w_emu.abs().t()) + 1e-12).all()
        ref = xb @ w_hat.t() + b
        bound = 3 * U * (xb.abs() @ w_hat.abs().t()) + U * (xb.abs() @ zero.abs().t()) + 1e-12
        assert ((y - ref).abs() <= bound).all()
        worst = max(worst, float((y - ref).abs().max() / ref.abs().max()))
    return worst


# ------------------------------------------------------------------ kernel paths


@pytest.mark.parametrize("name", list(KERNEL_SPECS))
def test_kernel_matches_reference_on_random_weights(name):
    spec, kernel = KERNEL_SPECS[name]
    w, b = _rand(96, 512, seed=1), _rand(96, seed=2)
    m = QuantLinear.from_qtensor(quantize(w, spec), b)
    assert (m.kernel, m.kernel_reason) == (kernel, None)
    assert _check_against_references(m, b, seed=10) < 8e-3


@pytest.mark.parametrize("name", ["int4-g128", "int4-g32-sym", "int4-channel", "int8"])
def test_kernel_matches_reference_on_minilm(name, minilm_weights):
    spec, kernel = KERNEL_SPECS[name]
    w = minilm_weights["encoder.layer.0.intermediate.dense.weight"]  # [1536, 384]
    m = QuantLinear.from_qtensor(quantize(w, spec))
    assert m.kernel == kernel
    assert _check_against_references(m, None, seed=20) < 8e-3


def test_reference_path_is_exactly_dequantize_then_linear(minilm_weights):
    w = minilm_weights["encoder.layer.0.attention.self.query.weight"]  # [384, 384]
    qt, b = quantize(w, INT4_G128), _rand(384, seed=3)
    m = QuantLinear.from_qtensor(qt, b, kernel="reference")
    cached = QuantLinear.from_qtensor(qt, b, kernel="reference", cache_weight=True)
    assert (m.kernel, m.kernel_reason) == ("reference", "kernel='reference' was requested")
    for lead in SHAPES:
        x = torch.randn(*lead, 384)
        want = F.linear(x, dequantize(qt), b)
        assert torch.equal(m(x), want) and torch.equal(cached(x), want)
    assert m._cached_weight is None and cached._cached_weight is not None


# ------------------------------------------------------------------ fallbacks


@pytest.mark.parametrize("spec, shape, reason", [
    (QuantSpec(bits=4, symmetric=False, granularity="group", group_size=16), (64, 256), "group_size 16"),
    (INT4_G128, (64, 200), "not a multiple of group_size 128"),
    (QuantSpec.from_name("int3-g128"), (64, 256), "int3"),
    (QuantSpec(bits=8, symmetric=False), (64, 256), "asymmetric int8"),
    (QuantSpec(bits=8, granularity="group", group_size=128), (64, 256), "int8 per group"),
    (INT8, (64, 100), "in_features 100 is not a multiple of 16"),
    (INT4_G128, (40, 256), "out_features 40 is not a multiple of 16"),
    (QuantSpec(bits=4, granularity="group", group_size=32, axis=1), (64, 256), "axis=1"),
    (QuantSpec(format="nf4", granularity="group", group_size=64), (64, 256), "format 'nf4'"),
    (QuantSpec(format="fp8-e4m3"), (64, 256), "format 'fp8-e4m3'"),
])
def test_fallback_records_reason_and_matches_dequantize(spec, shape, reason):
    w, b = _rand(*shape, seed=4), _rand(shape[0], seed=5)
    qt = quantize(w, spec)
    m = QuantLinear.from_qtensor(qt, b)
    assert m.kernel == "reference" and reason in m.kernel_reason
    assert select_kernel(spec, *shape) == ("reference", m.kernel_reason)
    assert reason in repr(m)
    x = torch.randn(3, shape[1])
    assert torch.equal(m(x), F.linear(x, dequantize(qt), b))


def test_asking_for_a_kernel_that_cannot_run_raises():
    qt = quantize(_rand(64, 256), QuantSpec.from_name("int3-g128"))
    with pytest.raises(ValueError, match="'int4pack_cpu' cannot run.*int3"):
        QuantLinear.from_qtensor(qt, kernel="int4pack_cpu")
    with pytest.raises(ValueError, match="kernel must be"):
        QuantLinear.from_qtensor(qt, kernel="cuda")


# ------------------------------------------------------------------ state_dict


@pytest.mark.parametrize("spec", [INT4_G128, INT4_G32_SYM, INT8, INT8_TENSOR,
                                  QuantSpec.from_name("int3-g16"), QuantSpec(format="nf4", granularity="group", group_size=64)],
                         ids=["int4-g128", "int4-g32-sym", "int8", "int8-tensor", "int3-g16", "nf4-g64"])
def test_state_dict_safetensors_round_trip_is_bit_exact(spec, tmp_path):
    w, b = _rand(128, 256, seed=6), _rand(128, seed=7)
    m = QuantLinear.from_qtensor(quantize(w, spec), b)
    sd = m.state_dict()
    assert set(sd) == {"codes", "scales", "bias"} | ({"zeros"} if spec.has_zero_point else set())
    save_file(sd, tmp_path / "layer.safetensors")
    loaded = QuantLinear(256, 128, spec, bias=True)
    loaded.load_state_dict(load_file(tmp_path / "layer.safetensors"))
    assert loaded.kernel == m.kernel
    x = torch.randn(2, 7, 256)
    assert torch.equal(loaded(x), m(x))
    assert torch.equal(loaded.dequantized_weight(), m.dequantized_weight())


def test_loading_scales_of_another_dtype_is_refused():
    m = QuantLinear.from_qtensor(quantize(_rand(64, 256), INT4_G128))
    other = QuantLinear(256, 64, INT4_G128.with_(scale_dtype=torch.float32), bias=False)
    with pytest.raises(RuntimeError, match="scales is stored as torch.float16.*keeps torch.float32"):
        other.load_state_dict(m.state_dict())


def test_inputs_are_never_modified():
    qt = quantize(_rand(64, 256), INT4_G128)
    before = (qt.data.clone(), qt.scale.clone(), qt.zero_point.clone())
    m = QuantLinear.from_qtensor(qt)
    m.load_state_dict(QuantLinear.from_qtensor(quantize(_rand(64, 256, seed=9), INT4_G128)).state_dict())
    assert all(torch.equal(a, b) for a, b in zip(before, (qt.data, qt.scale, qt.zero_point)))


# ------------------------------------------------------------------ from_linear and the weight views


def test_from_linear_keeps_bias_and_matches_from_qtensor():
    torch.manual_seed(0)
    lin = nn.Linear(384, 256)
    m = QuantLinear.from_linear(lin, INT4_G128)
    assert m.kernel == "int4pack_cpu" and torch.equal(m.bias, lin.bias) and not m.bias.requires_grad
    same = QuantLinear.from_qtensor(quantize(lin.weight.detach(), INT4_G128), lin.bias.detach())
    x = torch.randn(4, 384)
    with torch.no_grad():
        assert torch.equal(m(x), same(x))
        want = lin(x)
        assert float((m(x) - want).norm() / want.norm()) < 0.1  # int4 quantization error, not a kernel bug
    pct = QuantLinear.from_linear(lin, INT4_G128, observer="percentile")
    assert torch.equal(pct.codes, quantize(lin.weight.detach(), INT4_G128, observer="percentile").data)


def test_weight_views_and_sizes():
    qt = quantize(_rand(128, 256), INT4_G128)
    m = QuantLinear.from_qtensor(qt, _rand(128))
    assert torch.equal(m.dequantized_weight(), dequantize(qt))
    assert m.nbytes == qt.nbytes == 128 * 256 // 2 + 2 * 128 * 2 * 2
    # the kernel's own copy of the codes (and bf16 scales/zeros) is resident too
    assert m.resident_nbytes == m.nbytes + 128 * 256 // 2 + 2 * 128 * 2 * 2 + 128 * 4
    text = repr(m)
    assert "in_features=256, out_features=128, bias=True" in text and "kernel=int4pack_cpu" in text
    assert "int4 asymmetric per group of 128" in text


# ------------------------------------------------------------------ robustness


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="2-D"):
        QuantLinear.from_qtensor(quantize(_rand(4, 8, 32), INT8))
    with pytest.raises(TypeError, match="expects a QTensor"):
        QuantLinear.from_qtensor(_rand(16, 32))
    with pytest.raises(ValueError, match=r"bias must be a float tensor of shape \(16,\)"):
        QuantLinear.from_qtensor(quantize(_rand(16, 32), INT8), _rand(15))
    with pytest.raises(TypeError, match="nn.Linear"):
        QuantLinear.from_linear(nn.Conv1d(4, 4, 1), INT8)
    with pytest.raises(ValueError, match="in_features must be a positive integer"):
        QuantLinear(0, 16, INT8)
    m = QuantLinear.from_qtensor(quantize(_rand(64, 256), INT4_G128))
    with pytest.raises(ValueError, match=r"shape \(2, 255\) does not match in_features=256"):
        m(torch.randn(2, 255))
    with pytest.raises(TypeError, match="floating-point"):
        m(torch.ones(2, 256, dtype=torch.long))


def test_dtype_casts_keep_the_quantization_parameters():
    qt = quantize(_rand(64, 256), INT4_G128)
    m = QuantLinear.from_qtensor(qt, _rand(64)).to(torch.bfloat16)
    assert m.scales.dtype == m.zeros.dtype == torch.float16 and m._kernel_scales.dtype == torch.bfloat16
    assert m.bias.dtype == torch.bfloat16 and torch.equal(m.scales, qt.scale)
    y = m(torch.randn(3, 256, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and y.shape == (3, 64)


def test_input_that_needs_a_gradient_takes_the_reference_path():
    qt = quantize(_rand(64, 256), INT4_G128)
    m = QuantLinear.from_qtensor(qt)
    x = torch.randn(3, 256, requires_grad=True)
    m(x).sum().backward()  # the kernels have no backward
    torch.testing.assert_close(x.grad, dequantize(qt).sum(0).expand(3, 256))


def test_forward_is_thread_safe_and_leaves_state_untouched():
    m = QuantLinear.from_qtensor(quantize(_rand(128, 256), INT4_G128), _rand(128))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(4, 256)
    want = m(x)
    results, errors = [], []

    def work():
        try:
            for _ in range(20):
                results.append(torch.equal(m(x), want))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 80 and all(results)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


# ------------------------------------------------------------------ the lean forward's branches


@pytest.mark.parametrize("name", ["int4-g128", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_input_dtype_and_layout_matches_the_reference_path(name, dtype):
    """bf16 in (no casts, bias added in place), fp32 in (cast and bias add fused by promotion),
    fp16 in (cast both ways), 3-D and permuted inputs: all against the dequantize path."""
    spec, _ = KERNEL_SPECS[name]
    qt, b = quantize(_rand(96, 256, seed=4), spec), _rand(96, seed=5)
    fast = QuantLinear.from_qtensor(qt, b)
    ref = QuantLinear.from_qtensor(qt, b, kernel="reference")
    if dtype == torch.bfloat16:
        fast, ref = fast.to(dtype), ref.to(dtype)
    inputs = [torch.randn(1, 256), torch.randn(2, 3, 256), torch.randn(256, 5).t(), torch.randn(2, 256, 4).transpose(1, 2)]
    for x in inputs:
        x = x.to(dtype)
        with torch.inference_mode():
            y, want = fast(x), ref(x.bfloat16().to(dtype))
        assert y.dtype == dtype and y.shape == want.shape
        scale = float(want.float().abs().max())
        # bf16 kernel vs reference (see the module docstring): a few bf16 ulps of max |y|
        assert float((y.float() - want.float()).abs().max()) <= 12 * U * scale + 1e-6


def test_fp32_bias_is_added_after_the_bf16_rounding_as_before():
    """torch.add(bias, y_bf16) must equal the former y.to(fp32) + bias exactly."""
    qt, b = quantize(_rand(64, 256, seed=6), INT4_G128), _rand(64, seed=7)
    m = QuantLinear.from_qtensor(qt, b)
    x = torch.randn(3, 256)
    with torch.no_grad():
        raw = torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), m._kernel_weight, m._kernel_group,
                                                          m._kernel_scales)
        assert torch.equal(m(x), raw.float() + b)


def test_fast_path_follows_the_module_through_casts_and_loads():
    qt = quantize(_rand(64, 256, seed=8), INT4_G128)
    m = QuantLinear.from_qtensor(qt, _rand(64)).to(torch.bfloat16)
    assert m._fast[0] is m._kernel_weight and m._fast[1] is m._kernel_scales
    other = QuantLinear.from_qtensor(quantize(_rand(64, 256, seed=9), INT4_G128), _rand(64))
    m = m.float()
    m.load_state_dict(other.state_dict())
    assert m._fast[0] is m._kernel_weight
    x = torch.randn(2, 256)
    with torch.no_grad():
        torch.testing.assert_close(m(x), other(x), rtol=0, atol=0)
    m.to("meta")
    assert m._fast is None  # a module off the CPU takes the reference path
