"""FloatFormat: fp32/fp16/bf16/fp8 grids, saturating round-to-nearest-even.

References: torch's own dtype casts (after clamping to the format's largest
finite value), the formats' bit patterns enumerated exhaustively, and exact
float64 arithmetic for midpoints.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shrink.formats import BF16, FLOAT_FORMATS, FP8_E4M3, FP8_E5M2, FP16, FP32, FloatFormat

SMALL = [FP8_E4M3, FP8_E5M2, FP16, BF16]  # every bit pattern can be enumerated
ALL = SMALL + [FP32]
IDS = [f.name for f in ALL]


def _all_finite_values(fmt: FloatFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Every finite value of a <=16-bit format (float64) and its bit pattern."""
    n = 1 << fmt.bits
    pattern_dtype = torch.uint8 if fmt.bits == 8 else torch.int16
    raw = torch.arange(n, dtype=torch.int32)
    if fmt.bits == 16:
        raw = raw - (raw >= 32768).to(torch.int32) * 65536
    patterns = raw.to(pattern_dtype)
    values = patterns.view(fmt.torch_dtype).to(torch.float64)
    keep = torch.isfinite(values)
    return values[keep], patterns[keep]


def _sample(n: int, seed: int) -> torch.Tensor:
    """float32 values spread over many binades, both signs, with zeros."""
    g = torch.Generator().manual_seed(seed)
    mant = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    exp = torch.randint(-30, 20, (n,), generator=g).to(torch.float64)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
    x = (sign * mant * torch.pow(2.0, exp)).to(torch.float32)
    x[:8] = 0.0
    x[8:16] = -0.0
    return x


# ---------------------------------------------------------------- constants


def test_fp8_maxima_are_448_and_57344():
    assert FP8_E4M3.max_value == 448.0
    assert FP8_E5M2.max_value == 57344.0
    assert FP8_E4M3.max_value == torch.finfo(torch.float8_e4m3fn).max
    assert FP8_E5M2.max_value == torch.finfo(torch.float8_e5m2).max


@pytest.mark.parametrize("fmt", ALL, ids=IDS)
def test_constants_agree_with_torch_finfo(fmt):
    fi = torch.finfo(fmt.torch_dtype)
    assert fmt.max_value == fi.max
    assert fmt.min_normal == fi.smallest_normal
    assert fmt.bits == fi.bits == 1 + fmt.exp_bits + fmt.man_bits
    # the smallest subnormal is bit pattern 1
    one = torch.ones(1, dtype=fmt.code_dtype).view(fmt.torch_dtype).to(torch.float64)
    assert fmt.min_subnormal == float(one)
    assert torch.empty((), dtype=fmt.code_dtype).element_size() * 8 == fmt.bits


def test_layouts_and_registry():
    assert [(f.exp_bits, f.man_bits) for f in (FP32, FP16, BF16, FP8_E4M3, FP8_E5M2)] == [
        (8, 23), (5, 10), (8, 7), (4, 3), (5, 2)
    ]
    assert FP16.max_value == 65504.0
    assert set(FLOAT_FORMATS) == {"fp32", "fp16", "bf16", "fp8-e4m3", "fp8-e5m2"}
    assert all(FLOAT_FORMATS[k].name == k for k in FLOAT_FORMATS)


# ------------------------------------------------ agreement with torch casts


@pytest.mark.parametrize("fmt", ALL, ids=IDS)
def test_round_equals_torch_cast_after_clamping(fmt):
    x = _sample(20000, seed=fmt.bits + fmt.man_bits)
    ref = x.clamp(-fmt.max_value, fmt.max_value).to(fmt.torch_dtype)
    got = fmt.round(x)
    assert got.dtype == torch.float64
    assert torch.equal(got, ref.to(torch.float64))
    # same bit patterns too (signed zeros included)
    assert torch.equal(fmt.encode(x), ref.view(fmt.code_dtype))
    assert torch.equal(fmt.decode(fmt.encode(x), torch.float64), ref.to(torch.float64))


def test_fp32_round_equals_float64_to_float32_cast():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(20000, generator=g, dtype=torch.float64) * torch.pow(
        2.0, torch.randint(-140, 120, (20000,), generator=g).to(torch.float64)
    )
    assert torch.equal(FP32.round(x), x.to(torch.float32).to(torch.float64))


# ------------------------------------------------------------- saturation


@pytest.mark.parametrize("fmt", ALL, ids=IDS)
def test_values_beyond_max_saturate_never_inf_or_nan(fmt):
    m = fmt.max_value
    big = torch.tensor([m, m * 1.0001, m * 1.5, m * 4, 1e300, math.inf], dtype=torch.float64)
    x = torch.cat([big, -big])
    r = fmt.round(x)
    assert torch.isfinite(r).all()
    assert r.tolist() == [m] * 6 + [-m] * 6
    decoded = fmt.decode(fmt.encode(x), torch.float64)
    assert torch.isfinite(decoded).all()
    assert decoded.abs().max().item() == m


def test_fp16_saturates_where_a_plain_cast_overflows():
    x = torch.tensor([65519.0, 65520.0, 70000.0])
    assert torch.isinf(x.half()[1:]).all()            # torch's cast: inf
    assert FP16.round(x).tolist() == [65504.0] * 3     # ours: largest finite


# ------------------------------------------------------ ties to even, exhaustive


@pytest.mark.parametrize("fmt", SMALL, ids=[f.name for f in SMALL])
def test_exact_midpoints_round_to_the_even_neighbour(fmt):
    values, patterns = _all_finite_values(fmt)
    pos = values > 0
    v, p = values[pos], patterns[pos].to(torch.int32) & 0xFFFF
    order = torch.argsort(v)
    v, p = v[order], p[order]
    lo, hi = v[:-1], v[1:]
    mid = (lo + hi) / 2  # exact in float64
    even_is_lo = (p[:-1] & 1) == 0
    expected = torch.where(even_is_lo, lo, hi)
    assert torch.equal(fmt.round(mid), expected)
    assert torch.equal(fmt.round(-mid), -expected)
    # a hair either side of the midpoint goes to the nearer neighbour
    eps = (hi - lo) * 1e-3
    assert torch.equal(fmt.round(mid - eps), lo)
    assert torch.equal(fmt.round(mid + eps), hi)


def test_fp8_e4m3_hand_picked_ties():
    # spacing 1/8 in [1, 2): 1.0625 lies between 1.0 (even) and 1.125 (odd)
    x = torch.tensor([1.0625, 1.1875, 1.0625 + 1e-9, 3.25 + 0.125, 416 + 16], dtype=torch.float64)
    assert FP8_E4M3.round(x).tolist() == [1.0, 1.25, 1.125, 3.5, 448.0]


# --------------------------------------------------------------- subnormals


@pytest.mark.parametrize("fmt", ALL, ids=IDS)
def test_subnormals(fmt):
    s = fmt.min_subnormal
    k = torch.arange(1, 2**fmt.man_bits, dtype=torch.float64) if fmt.man_bits <= 10 else torch.tensor([1.0, 2.0, 3.0, 1000.0])
    sub = k * s
    assert torch.equal(fmt.round(sub), sub)                     # every subnormal is on the grid
    assert (sub < fmt.min_normal).all()
    x = torch.tensor([0.49 * s, 0.5 * s, 0.51 * s, 1.5 * s, 2.5 * s, -0.5 * s, -0.75 * s], dtype=torch.float64)
    r = fmt.round(x)
    assert r.tolist() == [0.0, 0.0, s, 2 * s, 2 * s, -0.0, -s]
    assert math.copysign(1.0, r[5].item()) == -1.0              # sign of zero kept
    # the subnormal/normal boundary: midpoint of (min_normal - s, min_normal) -> even = min_normal
    below = fmt.min_normal - s
    assert fmt.round(torch.tensor([below + s / 2], dtype=torch.float64)).item() == fmt.min_normal


@pytest.mark.parametrize("fmt", [FP8_E4M3, FP8_E5M2], ids=["e4m3", "e5m2"])
def test_fp8_subnormals_match_torch(fmt):
    s = fmt.min_subnormal
    x = (torch.linspace(-12, 12, 2401, dtype=torch.float64) * s).to(torch.float32)
    assert torch.equal(fmt.encode(x), x.to(fmt.torch_dtype).view(torch.uint8))


# ------------------------------------------------------ exhaustive round trips


@pytest.mark.parametrize("fmt", SMALL, ids=[f.name for f in SMALL])
def test_every_finite_code_round_trips(fmt):
    values, patterns = _all_finite_values(fmt)
    assert torch.equal(fmt.round(values), values)
    assert torch.equal(fmt.encode(values), patterns)
    assert torch.equal(fmt.decode(patterns, torch.float64), values)


def test_fp8_code_counts():
    v43, _ = _all_finite_values(FP8_E4M3)
    v52, _ = _all_finite_values(FP8_E5M2)
    assert v43.numel() == 254   # 256 minus the two NaN patterns
    assert v52.numel() == 248   # minus +-inf and 3 NaN patterns per sign


# ------------------------------------------------------------ properties


@settings(max_examples=80, deadline=None)
@given(
    fmt=st.sampled_from(ALL),
    a=st.floats(-1e6, 1e6, allow_nan=False),
    b=st.floats(-1e6, 1e6, allow_nan=False),
)
def test_round_is_idempotent_monotone_and_within_half_a_step(fmt, a, b):
    x = torch.tensor([a, b], dtype=torch.float64)
    r = fmt.round(x)
    assert torch.equal(fmt.round(r), r)
    lo, hi = min(a, b), max(a, b)
    assert fmt.round(torch.tensor([lo], dtype=torch.float64)) <= fmt.round(torch.tensor([hi], dtype=torch.float64))
    for xi, ri in zip(x.tolist(), r.tolist()):
        if abs(xi) <= fmt.max_value:
            # exponent of x's binade (subnormal spacing below the normal range)
            e = max(math.frexp(abs(xi))[1] - 1, 1 - fmt.bias) if xi else 1 - fmt.bias
            quantum = 2.0 ** (e - fmt.man_bits)
            assert abs(ri - xi) <= quantum / 2
        else:
            assert ri == math.copysign(fmt.max_value, xi)


def test_nan_propagates_through_round():
    assert math.isnan(FP8_E4M3.round(torch.tensor([math.nan])).item())


def test_round_does_not_modify_its_input():
    x = torch.tensor([1000.0, 1.0625, -3e-3])
    before = x.clone()
    FP8_E4M3.round(x)
    FP8_E4M3.encode(x)
    assert torch.equal(x, before)
