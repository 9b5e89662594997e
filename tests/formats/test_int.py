"""IntFormat: code ranges, round-half-to-even with clamping, unsigned shift."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shrink.formats import IntFormat

FAST = settings(max_examples=60, deadline=None)


@pytest.mark.parametrize("bits", range(1, 9))
def test_unsigned_range_is_0_to_2b_minus_1(bits):
    f = IntFormat(bits, signed=False)
    assert (f.qmin, f.qmax, f.levels) == (0, 2**bits - 1, 2**bits)
    assert f.name == f"uint{bits}"


@pytest.mark.parametrize("bits", range(2, 9))
def test_signed_restricted_range_is_symmetric(bits):
    f = IntFormat(bits)
    assert (f.qmin, f.qmax) == (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)
    assert f.qmin == -f.qmax
    assert f.levels == 2**bits - 1
    assert f.name == f"int{bits}"


@pytest.mark.parametrize("bits", range(1, 9))
def test_signed_full_range_adds_the_most_negative_code(bits):
    f = IntFormat(bits, full_range=True)
    assert (f.qmin, f.qmax, f.levels) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1, 2**bits)


def test_8_bit_ranges_match_torch_integer_dtypes():
    assert IntFormat(8, full_range=True).qmin == torch.iinfo(torch.int8).min
    assert IntFormat(8, full_range=True).qmax == torch.iinfo(torch.int8).max
    assert IntFormat(8, signed=False).qmin == torch.iinfo(torch.uint8).min
    assert IntFormat(8, signed=False).qmax == torch.iinfo(torch.uint8).max


@pytest.mark.parametrize("bits", [0, 9, -1, 16, 2.0, "4", None])
def test_bits_outside_1_to_8_are_refused_naming_the_field(bits):
    with pytest.raises(ValueError, match="bits"):
        IntFormat(bits)


def test_one_bit_signed_restricted_is_refused():
    with pytest.raises(ValueError, match="1-bit"):
        IntFormat(1, signed=True, full_range=False)
    # the two usable 1-bit variants exist
    assert IntFormat(1, signed=False).levels == 2
    assert IntFormat(1, full_range=True).levels == 2


def test_is_frozen():
    f = IntFormat(4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.bits = 8  # type: ignore[misc]


def test_encode_rounds_half_to_even():
    f = IntFormat(8)
    x = torch.tensor([-3.5, -2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5, 2.4999, 2.5001])
    expected = [round(v) for v in x.tolist()]  # Python's round is half-to-even
    assert f.encode(x).tolist() == expected == [-4, -2, -2, 0, 0, 2, 2, 4, 2, 3]
    assert f.encode(x).dtype == torch.int32


@pytest.mark.parametrize("signed,full_range", [(True, False), (True, True), (False, False)])
def test_encode_clamps_to_the_code_range(signed, full_range):
    f = IntFormat(4, signed=signed, full_range=full_range)
    x = torch.tensor([-1e9, -100.0, f.qmin - 0.6, f.qmax + 0.6, 100.0, 1e9])
    assert f.encode(x).tolist() == [f.qmin, f.qmin, f.qmin, f.qmax, f.qmax, f.qmax]


def test_encode_does_not_modify_its_input():
    x = torch.tensor([0.4, 1.6, -200.0])
    before = x.clone()
    IntFormat(4).encode(x)
    assert torch.equal(x, before)


@FAST
@given(
    bits=st.integers(2, 8),
    kind=st.sampled_from(["restricted", "full", "unsigned"]),
    values=st.lists(st.floats(-300, 300, allow_nan=False, width=32), min_size=1, max_size=64),
)
def test_encode_matches_numpy_rint_and_clip(bits, kind, values):
    f = IntFormat(bits, signed=kind != "unsigned", full_range=kind == "full")
    x = torch.tensor(values, dtype=torch.float32)
    ref = np.clip(np.rint(np.asarray(values, dtype=np.float32)), f.qmin, f.qmax).astype(np.int64)
    got = f.encode(x)
    assert got.tolist() == ref.tolist()
    assert int(got.min()) >= f.qmin and int(got.max()) <= f.qmax
    # inside the grid every value moves by at most half a step
    inside = (x >= f.qmin - 0.5) & (x <= f.qmax + 0.5)
    assert ((got.to(torch.float64) - x.to(torch.float64)).abs()[inside] <= 0.5).all()


@pytest.mark.parametrize(
    "bits,signed,full_range",
    [(b, s, fr) for b in range(1, 9) for s, fr in ((True, False), (True, True), (False, False))
     if not (s and not fr and b == 1)],  # 1-bit signed restricted does not exist
)
def test_unsigned_shift_round_trips_every_code(bits, signed, full_range):
    f = IntFormat(bits, signed=signed, full_range=full_range)
    codes = torch.arange(f.qmin, f.qmax + 1, dtype=torch.int32)
    stored = f.to_unsigned(codes)
    assert stored.dtype == torch.uint8
    assert stored.tolist() == list(range(f.levels))  # 0 .. levels-1, fits in `bits` bits
    assert int(stored.max()) < 2**bits
    assert torch.equal(f.from_unsigned(stored), codes)


def test_decode_is_the_code_as_float():
    f = IntFormat(4)
    codes = torch.arange(-7, 8, dtype=torch.int32)
    out = f.decode(codes, torch.float64)
    assert out.dtype == torch.float64
    assert out.tolist() == list(map(float, range(-7, 8)))
