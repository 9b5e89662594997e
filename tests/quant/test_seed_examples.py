"""The seeds' worked quantization examples, reproduced with shrink's primitives.

Seeds live in /work/shared/seeds/:
  000  "Workbook — Model Compression" (chapters 1-3, 8)
  001  "ML Systems & Deployment — Model Compression" (chapters 1-2, PTQ, QAT, challenge)
  002  "CS 229s — Sparsity & Quantization" (number formats, linear quantization)
  003  "Lesson 39 — Model Compression" (INT8 round trip exercises)
  004  "The 350GB Problem" (quantization mathematics, BERT layer, pitfalls)

Where a seed rounds intermediate numbers, the assertion uses the precision the
seed prints; where the exact value is computable, it is checked exactly too.
"""
from __future__ import annotations

import math

import pytest
import torch

from shrink.formats import BF16, FP8_E4M3, FP8_E5M2, FP16, IntFormat
from shrink.quant import QuantSpec, dequantize, fake_quantize, quantize

F32 = torch.float32
INT8_ASYM_T = QuantSpec(bits=8, symmetric=False, granularity="tensor")
INT8_SYM_T = QuantSpec(bits=8, symmetric=True, granularity="tensor")


@pytest.fixture(scope="module")
def w4096() -> torch.Tensor:
    g = torch.Generator().manual_seed(4096)
    return torch.randn(4096, 4096, generator=g) * 0.02


# =================================================================== seed 000


def test_seed000_ex1_1_asymmetric_error_for_x_0_3():
    """seed 000, Exercise 1.1: range [-1, 1], INT8, x = 0.3 -> q = 166, x_hat = 0.3019, error 0.0019.

    The seed's zero point is the float minimum (-1.0), i.e. an integer-grid
    zero point of 1/scale = 127.5: passed explicitly."""
    scale = torch.tensor(2.0 / 255, dtype=torch.float64)
    qt = quantize(torch.tensor([0.3]), INT8_ASYM_T, scale=scale, zero_point=torch.tensor(127.5))
    assert scale.item() == pytest.approx(0.007843, abs=5e-7)
    assert qt.int_codes().tolist() == [166]
    x_hat = dequantize(qt).item()
    assert x_hat == pytest.approx(0.3019, abs=1e-4)
    assert x_hat == pytest.approx(0.3 + 0.25 * 2 / 255, abs=1e-6)  # 166 - 165.75 = 0.25 steps
    err = abs(0.3 - x_hat)
    assert err == pytest.approx(0.0019, abs=1e-4)
    assert err < scale.item() / 2                                   # "less than half the scale"
    # with shrink's own (integer) zero point the bound still holds
    qm = quantize(torch.tensor([-1.0, 1.0, 0.3]), INT8_ASYM_T)
    assert abs(dequantize(qm)[2].item() - 0.3) <= qm.scale.item() / 2


def test_seed000_ex1_2_symmetric_error_absmax_2():
    """seed 000, Exercise 1.2: absmax 2.0, INT8 [-127, 127], x = 0.5 -> scale 0.015748, q = 32, x_hat 0.50394, error 0.00394."""
    qt = quantize(torch.tensor([2.0, 0.5, -1.0]), INT8_SYM_T.with_(scale_dtype=F32))
    assert qt.scale.item() == pytest.approx(2 / 127, rel=1e-7)
    assert qt.scale.item() == pytest.approx(0.015748, abs=5e-7)
    assert qt.int_codes().tolist()[:2] == [127, 32]
    x_hat = dequantize(qt)[1].item()
    assert x_hat == pytest.approx(0.50394, abs=5e-6)
    assert abs(x_hat - 0.5) == pytest.approx(0.00394, abs=5e-6)
    assert dequantize(qt)[0].item() == pytest.approx(2.0, rel=1e-6)  # zero and absmax exact


def test_seed000_ex1_3_asymmetric_wastes_less_range():
    """seed 000, Exercise 1.3: range [-0.8, 1.2]: asymmetric scale 2.0/255 = 0.00784 < symmetric 1.2/127 = 0.00945, so less error."""
    x = torch.linspace(-0.8, 1.2, 10001)
    qa = quantize(x, INT8_ASYM_T.with_(scale_dtype=F32))
    qs = quantize(x, INT8_SYM_T.with_(scale_dtype=F32))
    assert qa.scale.item() == pytest.approx(0.00784, abs=5e-6)
    assert qs.scale.item() == pytest.approx(0.00945, abs=5e-6)
    mse_a = (dequantize(qa) - x).pow(2).mean().item()
    mse_s = (dequantize(qs) - x).pow(2).mean().item()
    assert mse_a < mse_s
    assert mse_a / mse_s == pytest.approx((0.00784 / 0.00945) ** 2, rel=0.05)  # uniform error: scale^2/12


@pytest.mark.parametrize("bits,scale,max_err", [(8, 0.007874, 0.003937), (4, 0.143, 0.071)])
def test_seed000_ex1_4_max_error_is_half_the_scale(bits, scale, max_err):
    """seed 000, Exercise 1.4: symmetric INT8 absmax 1.0: scale 1/127 = 0.007874, max error 0.003937 (INT4: 1/7 = 0.143, 0.071)."""
    x = torch.linspace(-1, 1, 200001)
    qt = quantize(x, QuantSpec(bits=bits, granularity="tensor", scale_dtype=F32))
    s = qt.scale.item()
    assert s == pytest.approx(scale, abs=5e-4 if bits == 4 else 5e-7)
    worst = (dequantize(qt).double() - x.double()).abs().max().item()
    assert worst <= s / 2 * (1 + 1e-5)
    assert worst >= s / 2 * 0.99          # a dense sweep gets (almost) to the midpoint
    assert worst == pytest.approx(max_err, abs=5e-4 if bits == 4 else 5e-7)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_seed000_ex1_5_quantize_dequantize_with_clamp(bits):
    """seed 000, Exercise 1.5: quantize(x, bits, minVal, maxVal) with q clamped to [0, 2^bits - 1].

    Reference: the seed's function ported to Python (float64). Values are chosen
    away from rounding ties (JavaScript rounds ties up, shrink to even)."""
    lo, hi = -0.5, 1.5
    levels = 2**bits - 1
    scale = (hi - lo) / levels

    def seed_quantize(x):
        q = math.floor((x - lo) / scale + 0.5)
        q = max(0, min(levels, q))
        return q * scale + lo

    xs = [-3.0, -0.6, lo, -0.123, 0.0, 0.31, 0.777, 1.2345, hi, 1.7, 40.0]
    for x in xs:  # precondition: no ties among the values inside the range
        if lo <= x <= hi:
            assert abs(((x - lo) / scale) % 1 - 0.5) > 1e-3
    t = torch.tensor(xs)
    spec = QuantSpec(bits=bits, symmetric=False, granularity="tensor")
    zp = torch.tensor(-lo / scale, dtype=torch.float64)
    y = fake_quantize(t, spec, scale=torch.tensor(scale, dtype=torch.float64), zero_point=zp)
    assert y.tolist() == pytest.approx([seed_quantize(x) for x in xs], abs=1e-6)
    assert y[0].item() == pytest.approx(lo, abs=1e-6) and y[-1].item() == pytest.approx(hi, abs=1e-6)  # clamped
    codes = quantize(t, spec, scale=torch.tensor(scale), zero_point=zp).int_codes()
    assert codes[0].item() == 0 and codes[-1].item() == levels


def test_seed000_ex1_6_dequantize_is_q_minus_zero_point_times_scale():
    """seed 000, Exercise 1.6: the fix is x_hat = (q - zeroPoint) * scale, not q * scale + zeroPoint."""
    qt = quantize(torch.tensor([0.5, -0.2, 1.0]), INT8_ASYM_T, scale=torch.tensor(0.01), zero_point=torch.tensor(100.0))
    q = qt.int_codes()
    assert q.tolist() == [150, 80, 200]
    x_hat = dequantize(qt)
    assert torch.allclose(x_hat, (q - 100).float() * 0.01, atol=1e-7)
    assert x_hat.tolist() == pytest.approx([0.5, -0.2, 1.0], abs=1e-6)
    buggy = q.float() * 0.01 + 100
    assert (buggy - x_hat).abs().min().item() > 99


def test_seed000_ex2_1_per_channel_overhead(w4096):
    """seed 000, Exercise 2.1: [4096, 4096], one FP16 scale and zero-point per channel: 8,192 values = 0.049% of 16,777,216."""
    qt = quantize(w4096, QuantSpec(bits=8, symmetric=False, granularity="channel", axis=0))
    extra_values = qt.scale.numel() + qt.zero_point.numel()
    assert extra_values == 8192
    assert w4096.numel() == 16_777_216
    assert round(100 * extra_values / w4096.numel(), 3) == 0.049
    assert qt.nbytes == 16_777_216 + 8192 * 2


def test_seed000_ex2_2_per_channel_beats_per_tensor():
    """seed 000, Exercise 2.2: channels with ranges 0.02 and 4.0. Per-tensor scale 4.0/255 = 0.0157 leaves
    channel A about one level; per-channel gives A 0.02/255 = 0.000078 and all 256 levels."""
    w = torch.stack([torch.linspace(-0.01, 0.01, 1024), torch.linspace(-2.0, 2.0, 1024)])
    spec = QuantSpec(bits=8, symmetric=False, granularity="tensor")
    pt = quantize(w, spec)
    pc = quantize(w, spec.with_(granularity="channel"))
    assert pt.scale.item() == pytest.approx(0.0157, abs=1e-4)
    assert pc.scale[0].item() == pytest.approx(0.000078, abs=5e-7)
    assert pc.scale[1].item() == pytest.approx(0.0157, abs=1e-4)
    assert pt.int_codes()[0].unique().numel() <= 3                  # "~1 quantization level"
    assert pc.int_codes()[0].unique().numel() >= 255                # (nearly) all 256 levels:
    # the fp16 scale is rounded up, so the top code may go unused
    err_t = (dequantize(pt) - w).abs()
    err_c = (dequantize(pc) - w).abs()
    assert err_c[0].max() * 100 < err_t[0].max()                    # dramatically better on A
    assert torch.equal(pt.int_codes()[1], pc.int_codes()[1])        # B unchanged


def test_seed000_ex2_3_group_quantization_overhead(w4096):
    """seed 000, Exercise 2.3: [4096, 4096] INT4, group 128: 32 groups/row, 131,072 groups,
    8,388,608 code bytes + 524,288 scale/zero-point bytes; overhead 5.9%."""
    qt = quantize(w4096, QuantSpec.from_name("int4-g128"))
    assert qt.scale.shape == qt.zero_point.shape == (4096, 32)
    assert qt.scale.numel() == 131_072
    assert qt.data.numel() == 8_388_608
    assert qt.nbytes == 8_388_608 + 524_288
    overhead = (qt.nbytes - qt.data.numel()) / qt.nbytes
    assert round(100 * overhead, 1) == 5.9


def test_seed000_ex2_5_per_channel_scale_and_constant_channels():
    """seed 000, Exercise 2.5: perChannelScale = (max - min) / 255 per output channel (for channels
    that straddle zero), as torch's PerChannelMinMaxObserver; a constant channel must not give scale 0."""
    from torch.ao.quantization.observer import PerChannelMinMaxObserver

    g = torch.Generator().manual_seed(25)
    w = torch.randn(6, 50, generator=g) * torch.linspace(0.01, 2, 6)[:, None]
    qt = quantize(w, QuantSpec(bits=8, symmetric=False, scale_dtype=F32))
    expected = (w.amax(1) - w.amin(1)) / 255
    assert torch.allclose(qt.scale, expected, rtol=1e-6, atol=0)
    obs = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.quint8, qscheme=torch.per_channel_affine)
    obs(w)
    t_scale, t_zp = obs.calculate_qparams()
    assert torch.equal(qt.scale, t_scale)
    assert torch.equal(qt.zero_point.to(torch.int64), t_zp.to(torch.int64))
    const = torch.stack([torch.full((10,), 0.42), torch.zeros(10)])
    qc = quantize(const, QuantSpec(bits=8, symmetric=False))
    assert (qc.scale > 0).all() and torch.isfinite(qc.scale).all()
    assert (dequantize(qc)[0] - 0.42).abs().max().item() <= qc.scale[0].item() / 2
    assert (dequantize(qc)[1] == 0).all()


def test_seed000_ex3_1_and_3_5_ste_gradient():
    """seed 000, Exercises 3.1 and 3.5: dL/dy = 0.05 passes through unchanged in range (0.05 x 1);
    out of range it is blocked (0.05 x 0 = 0, not the buggy grad + mask)."""
    x = torch.tensor([0.3, 1.6, -1.2]).requires_grad_()
    spec = QuantSpec(bits=8, symmetric=False, granularity="tensor")
    y = fake_quantize(x, spec, scale=torch.tensor(0.01), zero_point=torch.tensor(100.0))
    y.backward(torch.full((3,), 0.05))
    assert torch.equal(x.grad, torch.tensor([0.05, 0.0, 0.0]))


def test_seed000_ex3_4_fake_quantize_clamped_case():
    """seed 000, Exercise 3.4: x = 1.6, scale 0.01, zp 100: q = round(260) -> clamp 255 -> (255 - 100) x 0.01 = 1.55."""
    spec = QuantSpec(bits=8, symmetric=False, granularity="tensor")
    kw = dict(scale=torch.tensor(0.01), zero_point=torch.tensor(100.0))
    y = fake_quantize(torch.tensor([1.6, 0.3]), spec, **kw)
    assert y.tolist() == pytest.approx([1.55, 0.3], abs=1e-6)
    assert quantize(torch.tensor([1.6]), spec, **kw).int_codes().item() == 255
    ref = torch.fake_quantize_per_tensor_affine(torch.tensor([1.6, 0.3]), 0.01, 100, 0, 255)
    assert torch.equal(y, ref)


def test_seed000_ex8_4_fp8_formats_and_size():
    """seed 000, Exercise 8.4: FP8 is 1 byte per parameter (2x smaller than FP16);
    E4M3 max ~448, E5M2 max ~57,344."""
    assert FP8_E4M3.max_value == 448 and FP8_E5M2.max_value == 57344
    assert FP8_E4M3.bits == FP8_E5M2.bits == 8
    w = torch.randn(256, 256)
    q8 = quantize(w, QuantSpec(format="fp8-e4m3", granularity="tensor"))
    q16 = quantize(w, QuantSpec.from_name("fp16"))
    assert q8.nbytes == w.numel() + 2 and q16.nbytes == 2 * w.numel()
    assert q16.nbytes / q8.nbytes == pytest.approx(2.0, rel=1e-4)


# =================================================================== seed 001


def test_seed001_ch1_worked_example_minmax_int8():
    """seed 001, Chapter 1 worked example: [0.5, 1.2, -0.3, 0.8] to INT8 0..255: scale 1.5/255 = 0.005882,
    zero_point 51, q = [136, 255, 0, 187], errors ~0; and the torch one-liner with the same scale/zp."""
    x = torch.tensor([0.5, 1.2, -0.3, 0.8])
    qt = quantize(x, INT8_ASYM_T.with_(scale_dtype=F32))
    assert qt.scale.item() == pytest.approx(0.005882, abs=5e-7)
    assert qt.zero_point.item() == 51
    assert qt.int_codes().tolist() == [136, 255, 0, 187]
    assert (dequantize(qt) - x).abs().max().item() < 1e-6
    # default fp16 parameters: same codes
    assert quantize(x, INT8_ASYM_T).int_codes().tolist() == [136, 255, 0, 187]
    # torch.quantize_per_tensor(x_t, scale=0.005882, zero_point=51, dtype=torch.quint8)
    qe = quantize(x, INT8_ASYM_T, scale=torch.tensor(0.005882), zero_point=torch.tensor(51.0))
    ref = torch.quantize_per_tensor(x, scale=0.005882, zero_point=51, dtype=torch.quint8)
    assert torch.equal(qe.int_codes(), ref.int_repr().to(torch.int32))
    assert torch.equal(dequantize(qe), ref.dequantize())


def test_seed001_ch1_question_scale_for_range_minus2_to_2():
    """seed 001, Chapter 1 question: values in [-2.0, 2.0] to INT8 (0-255): scale = 4.0/255 = 0.01569."""
    qt = quantize(torch.tensor([-2.0, 0.7, 2.0]), INT8_ASYM_T.with_(scale_dtype=F32))
    assert qt.scale.item() == pytest.approx(0.01569, abs=5e-6)


def test_seed001_ch2_per_tensor_vs_per_channel_code():
    """seed 001, Chapter 2 code: per-tensor scale 2.0/127 = 0.01575 quantizes channel 0 to [1, -1, 1, 0];
    per-channel scale 0.02/127 = 0.000157 gives [64, -127, 95, -32].

    0.01 / (0.02/127) = 63.5 is a tie: with float32 scales shrink rounds it to even (64,
    as the seed's comment and torch.quantize_per_channel); the seed's own numpy code
    (float32 division) would print 63."""
    w = torch.tensor([[0.01, -0.02, 0.015, -0.005], [1.5, -2.0, 0.8, -1.2]])
    pt = quantize(w, INT8_SYM_T.with_(scale_dtype=F32))
    assert pt.scale.item() == pytest.approx(0.01575, abs=5e-6)
    assert pt.int_codes()[0].tolist() == [1, -1, 1, 0]
    pc = quantize(w, QuantSpec(bits=8, granularity="channel", scale_dtype=F32))
    assert pc.scale[0].item() == pytest.approx(0.000157, abs=5e-7)
    assert pc.int_codes()[0].tolist() == [64, -127, 95, -32]
    ref = torch.quantize_per_channel(w, pc.scale, torch.zeros(2, dtype=torch.int64), 0, torch.qint8)
    assert torch.equal(pc.int_codes(), ref.int_repr().to(torch.int32))


def test_seed001_ch2_per_group_worked_example():
    """seed 001, Chapter 2 per-group example: row [0.1, 0.2, 0.15, 0.12, 2.0, -1.8, 1.5, -2.1], G=4, 4-bit:
    group scales 0.2/7 = 0.0286 and 2.1/7 = 0.300; group 1 codes 3, 7, 5, 4; without groups (scale 0.300)
    group 1 collapses to 0 or 1.

    0.1 / (0.2/7) = 3.5 exactly; the seed's 3 comes from the rounded-up scale 0.0286,
    which is what shrink's fp16 scale (rounded up) gives too."""
    row = torch.tensor([[0.1, 0.2, 0.15, 0.12, 2.0, -1.8, 1.5, -2.1]])
    qg = quantize(row, QuantSpec(bits=4, granularity="group", group_size=4))
    assert qg.scale[0].tolist() == pytest.approx([0.0286, 0.300], abs=5e-4)
    assert qg.int_codes()[0, :4].tolist() == [3, 7, 5, 4]
    qt = quantize(row, QuantSpec(bits=4, granularity="tensor"))
    assert qt.scale.item() == pytest.approx(0.300, abs=5e-4)
    assert set(qt.int_codes()[0, :4].tolist()) <= {0, 1}
    err_g = (dequantize(qg) - row)[0, :4].abs().max()
    err_t = (dequantize(qt) - row)[0, :4].abs().max()
    assert err_g * 5 < err_t


def test_seed001_ch2_group128_metadata_is_an_eighth_of_a_bit():
    """seed 001, Chapter 2: FP16 scales per group of 128 add ~0.125 bits per weight."""
    w = torch.randn(64, 1024)
    qt = quantize(w, QuantSpec(bits=4, granularity="group", group_size=128))
    assert qt.bits_per_weight - 4 == 0.125


def test_seed001_gptq_worked_example_rounding_steps():
    """seed 001, PTQ chapter, GPTQ on a 3x3 matrix: 4-bit levels -8..7, scale 0.1.
    Column 0 [0.7, 0.2, -0.6] -> [7, 2, -6] (exact); column 1 [-0.3, 0.8, 0.1] -> [-3, 7 (clamped from 8), 1],
    error 0.1 in row 1; adjusted column 2 [0.5, -0.4 + 0.1 x 0.3, 0.9] = [0.5, -0.37, 0.9] -> [5, -4, 7 (clamped from 9)].
    (The Hessian update itself belongs to the GPTQ tests.)"""
    spec = QuantSpec(bits=4, full_range=True, granularity="tensor")
    s = torch.tensor(0.1)
    c0 = quantize(torch.tensor([0.7, 0.2, -0.6]), spec, scale=s)
    assert c0.int_codes().tolist() == [7, 2, -6]
    assert dequantize(c0).tolist() == pytest.approx([0.7, 0.2, -0.6], abs=1e-6)
    c1 = quantize(torch.tensor([-0.3, 0.8, 0.1]), spec, scale=s)
    assert c1.int_codes().tolist() == [-3, 7, 1]
    assert dequantize(c1).tolist() == pytest.approx([-0.3, 0.7, 0.1], abs=1e-6)
    err = 0.8 - dequantize(c1)[1].item()
    assert err == pytest.approx(0.1, abs=1e-6)
    adjusted = torch.tensor([0.5, -0.4 + err * 0.3, 0.9])
    assert adjusted[1].item() == pytest.approx(-0.37, abs=1e-6)
    assert quantize(adjusted, spec, scale=s).int_codes().tolist() == [5, -4, 7]


def test_seed001_qat_ste_worked_example():
    """seed 001, QAT chapter: w = 0.37, s = 0.1: FakeQuant(0.37) = round(3.7) x 0.1 = 0.4; the loss
    gradient -0.05 is passed straight through to w.

    (The seed's update line "0.37 + 0.005 x (-0.05) = 0.36975" has a sign slip;
    w - lr x g = 0.37025. Not asserted: it is SGD, not a primitive.)"""
    w = torch.tensor([0.37]).requires_grad_()
    y = fake_quantize(w, QuantSpec(bits=8, granularity="tensor"), scale=torch.tensor(0.1))
    assert y.item() == pytest.approx(0.4, abs=1e-6)
    y.backward(torch.tensor([-0.05]))
    assert torch.equal(w.grad, torch.tensor([-0.05]))


def test_seed001_challenge_mse_optimal_scale_is_about_0_7_to_0_9_of_absmax():
    """seed 001, Derivation Challenge: grid-searching the scale for minimum MSE gives "typically
    0.7-0.9x the max/Q scale" (clips outliers). Gaussian rows, INT4 (Q = 7), per channel."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(64, 1024, generator=g)
    spec = QuantSpec(bits=4)
    a = quantize(w, spec)
    b = quantize(w, spec, observer="mse")
    ratio = b.scale.float() / a.scale.float()
    assert (ratio <= 1).all()
    assert 0.7 <= ratio.median().item() <= 0.9
    assert (dequantize(b) - w).pow(2).sum() < (dequantize(a) - w).pow(2).sum()


# =================================================================== seed 002


def test_seed002_int8_worked_example_signed_zero_point():
    """seed 002, "Deriving S and Z": r in [-1.0, 2.0], INT8 [-128, 127]: S = 3/255 = 0.01176, Z = -43;
    r = 0.5 -> q = 0, r_hat = 0.506, error 0.006.

    shrink's asymmetric codes are unsigned (0..255): Z = -43 is zero-point 85 and
    q = 0 is code 128 (a shift by 128)."""
    x = torch.tensor([-1.0, 2.0, 0.5])
    qt = quantize(x, INT8_ASYM_T.with_(scale_dtype=F32))
    assert qt.scale.item() == pytest.approx(0.01176, abs=5e-6)
    assert qt.zero_point.item() - 128 == -43
    assert qt.int_codes()[2].item() - 128 == 0
    r_hat = dequantize(qt)[2].item()
    assert r_hat == pytest.approx(0.506, abs=5e-4)
    assert abs(r_hat - 0.5) == pytest.approx(0.006, abs=5e-4)
    # with the seed's rounded numbers, against torch's signed qint8
    qs = quantize(x, INT8_ASYM_T, scale=torch.tensor(0.01176), zero_point=torch.tensor(85.0))
    ref = torch.quantize_per_tensor(x, 0.01176, -43, torch.qint8)
    assert torch.equal(qs.int_codes() - 128, ref.int_repr().to(torch.int32))
    assert dequantize(qs)[2].item() == pytest.approx(0.01176 * 43, abs=1e-6)


def test_seed002_symmetric_scale():
    """seed 002, "Symmetric vs Asymmetric": S = max(|r_min|, |r_max|) / q_max with Z = 0."""
    qt = quantize(torch.tensor([-1.0, 2.0, 0.5]), INT8_SYM_T.with_(scale_dtype=F32))
    assert qt.scale.item() == pytest.approx(2.0 / 127, rel=1e-7)
    assert qt.zero_point is None


def test_seed002_number_format_table():
    """seed 002, "How Numbers Are Represented": FP16 1+5+10 bits, +-65504; BF16 1+8+7, +-3.4e38;
    INT8 -128..127; INT4 -8..7."""
    assert (FP16.bits, FP16.exp_bits, FP16.man_bits, FP16.max_value) == (16, 5, 10, 65504.0)
    assert (BF16.bits, BF16.exp_bits, BF16.man_bits) == (16, 8, 7)
    assert BF16.max_value == pytest.approx(3.4e38, rel=0.01)
    assert (IntFormat(8, full_range=True).qmin, IntFormat(8, full_range=True).qmax) == (-128, 127)
    assert (IntFormat(4, full_range=True).qmin, IntFormat(4, full_range=True).qmax) == (-8, 7)


def test_seed002_bit_width_lab():
    """seed 002, Chapter 4 "Bit-Width Lab": fewer bits, coarser staircase: at 2 bits only 4 distinct
    values remain, at 1 bit 2; error grows as bits drop; 8 bits is nearly perfect."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(4096, generator=g) * 0.05
    errs = {}
    for bits in (8, 4, 2, 1):
        qt = quantize(w, QuantSpec(bits=bits, symmetric=False, granularity="tensor"))
        assert dequantize(qt).unique().numel() <= 2**bits
        errs[bits] = (dequantize(qt) - w).pow(2).mean().item()
    assert dequantize(quantize(w, QuantSpec(bits=2, symmetric=False, granularity="tensor"))).unique().numel() == 4
    assert errs[8] < errs[4] < errs[2] < errs[1]
    assert errs[8] < 1e-4 * w.pow(2).mean().item()


# =================================================================== seed 003


def test_seed003_worked_example_int8_round_trip():
    """seed 003, "Worked Example: Quantize to INT8 and Back": weights [0.12, -0.83, 0.55, -0.20, 0.91,
    -0.47, 0.05, 0.73], scale = max|w| / 127, q = round(w / scale), recovered = q x scale."""
    weights = [0.12, -0.83, 0.55, -0.20, 0.91, -0.47, 0.05, 0.73]
    scale = max(abs(w) for w in weights) / 127
    expected = [round(w / scale) for w in weights]  # no ties in this list
    assert expected == [17, -116, 77, -28, 127, -66, 7, 102]
    qt = quantize(torch.tensor(weights), INT8_SYM_T.with_(scale_dtype=F32))
    assert qt.scale.item() == pytest.approx(scale, rel=1e-7)
    assert qt.int_codes().tolist() == expected
    deq = dequantize(qt).tolist()
    assert deq == pytest.approx([q * scale for q in expected], abs=1e-6)
    assert max(abs(w - d) for w, d in zip(weights, deq)) <= scale / 2


def test_seed003_your_turn_1():
    """seed 003, "Your Turn #1": [0.40, -0.10, 0.80, -0.60, 0.20] with scale 0.8/127; mean |error| <= scale/2.

    The expected output is cut off in the seed. 0.40 / (0.8/127) = 63.5 is a tie
    (Python's float64 gives 63.4999 -> 63; torch and shrink with a float32 scale give 64);
    the other codes are -16, 127, -95, 32."""
    w = torch.tensor([0.40, -0.10, 0.80, -0.60, 0.20])
    qt = quantize(w, INT8_SYM_T.with_(scale_dtype=F32))
    s = qt.scale.item()
    assert s == pytest.approx(0.8 / 127, rel=1e-7)
    codes = qt.int_codes().tolist()
    assert codes[0] in (63, 64) and codes[1:] == [-16, 127, -95, 32]
    ref = torch.quantize_per_tensor(w, s, 0, torch.qint8).int_repr().tolist()
    assert codes == ref
    mean_err = (dequantize(qt) - w).abs().mean().item()
    assert mean_err <= s / 2


def test_seed003_mini_challenge_prune_then_quantize():
    """seed 003, "Mini-Challenge: Prune Then Quantize": prune |w| < 0.1 from [0.7, -0.02, 0.5, 0.08, -0.9,
    0.03, 0.6, -0.4]: 5 survive (37.5% sparsity); survivors to INT8 with scale 0.9/127 -> [99, 71, -127, 85, -56]."""
    w = torch.tensor([0.7, -0.02, 0.5, 0.08, -0.9, 0.03, 0.6, -0.4])
    survivors = w[w.abs() >= 0.1]
    assert survivors.numel() == 5 and 100 * (1 - 5 / 8) == 37.5
    qt = quantize(survivors, INT8_SYM_T.with_(scale_dtype=F32))
    assert qt.scale.item() == pytest.approx(0.9 / 127, rel=1e-7)
    assert qt.int_codes().tolist() == [99, 71, -127, 85, -56]


# =================================================================== seed 004


def test_seed004_numerical_example_x_0_374():
    """seed 004, "Method 1: Quantization (Detailed Mathematics)": x = 0.374, range [-1, 1], s = 2/255 = 0.00784,
    zero-point 127 -> q = 175, recovered 0.376, error ~0.002."""
    s = 2.0 / 255
    assert s == pytest.approx(0.00784, abs=5e-6)
    qt = quantize(torch.tensor([0.374]), INT8_ASYM_T, scale=torch.tensor(s), zero_point=torch.tensor(127.0))
    assert qt.int_codes().tolist() == [175]
    x_hat = dequantize(qt).item()
    assert x_hat == pytest.approx(0.376, abs=5e-4)
    assert abs(x_hat - 0.374) == pytest.approx(0.002, abs=1e-3)
    # the min/max observer finds the same zero-point and code
    qm = quantize(torch.tensor([-1.0, 1.0, 0.374]), INT8_ASYM_T)
    assert qm.zero_point.item() == 127 and qm.int_codes()[2].item() == 175


def test_seed004_walkthrough_min_minus_1_2_max_0_8():
    """seed 004, "Quantization Mechanism" walkthrough: min -1.2, max 0.8, s = 2.0/255 = 0.00784; x = 0.374:
    1.574 / 0.00784 = 200.76 -> q = 201; recovered 0.376, error 0.002 <= s/2 = 0.00392."""
    x = torch.tensor([-1.2, 0.8, 0.374])
    qt = quantize(x, INT8_ASYM_T.with_(scale_dtype=F32))
    s = qt.scale.item()
    assert s == pytest.approx(0.00784, abs=5e-6)
    assert qt.zero_point.item() == 153          # -(-1.2)/s: the seed's shift by x_min
    assert qt.int_codes()[2].item() == 201
    x_hat = dequantize(qt)[2].item()
    assert x_hat == pytest.approx(0.376, abs=5e-4)
    assert abs(x_hat - 0.374) == pytest.approx(0.002, abs=5e-4)
    assert s / 2 == pytest.approx(0.00392, abs=5e-6)
    assert (dequantize(qt) - x).abs().max().item() <= s / 2


def test_seed004_bert_layer_example():
    """seed 004, "Worked Example: BERT Layer Quantization": a 768x768 layer in [-0.487, 0.512]: scale
    (0.512 + 0.487)/255 = 0.00392, codes in [0, 255], 590K x 1 byte (4x smaller than FP32's 2.36 MB).

    The seed's sample table (0.374 -> 201 -> 0.376, -0.251 -> 67, 0.089 -> 150,
    -0.412 -> 25, 0.501 -> 255 -> 0.512) is not reproducible: no single affine map
    gives those codes (and 0.501 -> 0.512 exceeds the s/2 bound). The recovered
    values are checked against the bound instead. The seed's "zero-point 127
    (symmetric)" is nominal: min/max gives 124 for this range."""
    g = torch.Generator().manual_seed(768)
    w = (torch.randn(768, 768, generator=g) * 0.124 + 0.003).clamp(-0.487, 0.512)
    samples = torch.tensor([0.374, -0.251, 0.089, -0.412, 0.501])
    w.view(-1)[:5] = samples
    w[767, 766], w[767, 767] = -0.487, 0.512
    qt = quantize(w, INT8_ASYM_T.with_(scale_dtype=F32))
    s = qt.scale.item()
    assert s == pytest.approx(0.00392, abs=5e-6)
    assert qt.zero_point.item() == 124
    codes = qt.int_codes()
    assert int(codes.min()) == 0 and int(codes.max()) == 255
    rec = dequantize(qt).reshape(-1)[:5]
    assert ((rec - samples).abs() <= s / 2 * (1 + 1e-6)).all()
    assert w.numel() == 589_824 and w.numel() * 4 / 1e6 == pytest.approx(2.36, abs=0.01)
    assert qt.nbytes == 589_824 + 8                      # codes + one fp32 scale and zero-point
    assert w.numel() * 4 / qt.nbytes == pytest.approx(4.0, rel=1e-4)


def test_seed004_precision_table():
    """seed 004, "Precision Comparison": FP16 +-6.5e4; INT8 -128..127 (256 values); INT4 -8..7 (16 values)."""
    assert FP16.max_value == pytest.approx(6.5e4, rel=0.01)
    i8, i4 = IntFormat(8, full_range=True), IntFormat(4, full_range=True)
    assert (i8.qmin, i8.qmax, i8.levels) == (-128, 127, 256)
    assert (i4.qmin, i4.qmax, i4.levels) == (-8, 7, 16)


def test_seed004_loss_scaling_prevents_fp16_underflow():
    """seed 004, "Mixed Precision Training": loss scaling by 2^14 prevents gradient underflow in FP16."""
    grads = torch.tensor([1e-8, 3e-9, -2e-8], dtype=torch.float64)
    assert (FP16.round(grads) == 0).all()                          # underflow without scaling
    scaled = FP16.round(grads * 2**14)
    assert (scaled != 0).all()
    assert torch.allclose(scaled / 2**14, grads, rtol=2**-10)      # unscaled, ~fp16 precision
    assert torch.equal(scaled, (grads * 2**14).to(torch.float32).to(torch.float16).to(torch.float64))


def test_seed004_pitfall_1_percentile_not_max():
    """seed 004, "Pitfall 1: Calibration": use a percentile (99%) rather than the max for ranges with outliers."""
    g = torch.Generator().manual_seed(41)
    x = torch.randn(8192, generator=g)
    x[:4] = torch.tensor([60.0, -45.0, 80.0, -70.0])   # a few outliers
    spec = INT8_ASYM_T
    q_max = quantize(x, spec)
    q_pct = quantize(x, spec, observer="percentile", percentile=99.0)
    assert q_pct.scale.item() * 10 < q_max.scale.item()
    bulk = slice(4, None)
    e_max = (dequantize(q_max) - x)[bulk].pow(2).mean()
    e_pct = (dequantize(q_pct) - x)[bulk].pow(2).mean()
    assert e_pct * 4 < e_max


def test_seed004_pitfall_2_int4_outliers_per_channel_solution():
    """seed 004, "Pitfall 2: INT4 Overflow": INT4 range [-8, 7]; outlier weights force clipping/coarse steps;
    the solution is per-channel quantization."""
    g = torch.Generator().manual_seed(42)
    w = torch.randn(16, 256, generator=g) * 0.02
    w[3, 10] = 1.5  # one outlier weight
    pt = quantize(w, QuantSpec(bits=4, full_range=True, granularity="tensor"))
    pc = quantize(w, QuantSpec(bits=4, full_range=True, granularity="channel"))
    assert int(pt.int_codes().min()) >= -8 and int(pt.int_codes().max()) <= 7
    others = torch.ones(16, dtype=torch.bool)
    others[3] = False
    e_t = (dequantize(pt) - w)[others].pow(2).mean()
    e_c = (dequantize(pc) - w)[others].pow(2).mean()
    assert e_c * 10 < e_t
