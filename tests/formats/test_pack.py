"""Dense LSB-first bit packing of 1..8-bit codes."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shrink.formats import pack_bits, packed_nbytes, unpack_bits


def _reference_pack(codes: list[int], bits: int) -> bytes:
    """Independent reference: one big little-endian integer, code i at bit i*bits."""
    acc = 0
    for i, c in enumerate(codes):
        acc |= c << (i * bits)
    n = (len(codes) * bits + 7) // 8
    return acc.to_bytes(n, "little")


@st.composite
def codes_and_bits(draw):
    bits = draw(st.integers(1, 8))
    codes = draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=0, max_size=300))
    dtype = draw(st.sampled_from([torch.uint8, torch.int32, torch.int64, torch.int16]))
    return bits, codes, dtype


@settings(max_examples=100, deadline=None)
@given(codes_and_bits())
def test_pack_unpack_round_trip_and_reference_bytes(case):
    bits, codes, dtype = case
    t = torch.tensor(codes, dtype=dtype)
    before = t.clone()
    packed = pack_bits(t, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == packed_nbytes(len(codes), bits) == -(-len(codes) * bits // 8)
    assert bytes(packed.tolist()) == _reference_pack(codes, bits)  # layout and zero padding bits
    out = unpack_bits(packed, bits, len(codes))
    assert out.dtype == torch.uint8
    assert out.tolist() == codes
    assert torch.equal(t, before)


@settings(max_examples=50, deadline=None)
@given(bits=st.integers(1, 8), shape=st.lists(st.integers(1, 6), min_size=1, max_size=3), seed=st.integers(0, 2**16))
def test_pack_flattens_any_shape_in_row_major_order(bits, shape, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 1 << bits, tuple(shape), generator=g)
    assert torch.equal(pack_bits(t, bits), pack_bits(t.reshape(-1), bits))
    n = t.numel()
    assert torch.equal(unpack_bits(pack_bits(t, bits), bits, n).to(torch.int64), t.reshape(-1))


@pytest.mark.parametrize(
    "codes,bits,expected",
    [
        ([1, 2, 3], 3, [0b11010001, 0b0]),          # 3-bit codes straddle the byte boundary
        ([0x1, 0x2], 4, [0x21]),                    # low nibble first
        ([0xF, 0x0, 0xA], 4, [0x0F, 0x0A]),
        ([1, 0, 1, 1, 0, 0, 0, 0, 1], 1, [0b00001101, 0b1]),
        ([3, 0, 2, 1], 2, [0b01100011]),
        ([0x1F, 0x01], 5, [0x3F, 0x00]),
        ([7, 200, 255], 8, [7, 200, 255]),
        ([], 5, []),
    ],
)
def test_golden_bytes(codes, bits, expected):
    assert pack_bits(torch.tensor(codes, dtype=torch.int64), bits).tolist() == expected
    assert unpack_bits(torch.tensor(expected, dtype=torch.uint8), bits, len(codes)).tolist() == codes


@pytest.mark.parametrize("count,bits,nbytes", [(0, 4, 0), (1, 1, 1), (8, 1, 1), (9, 1, 2), (3, 3, 2), (128, 4, 64), (5, 7, 5), (10, 8, 10)])
def test_packed_nbytes(count, bits, nbytes):
    assert packed_nbytes(count, bits) == nbytes


@pytest.mark.parametrize("bits", [0, 9, -1, 2.0, "4"])
def test_bad_bit_widths_are_refused(bits):
    with pytest.raises(ValueError, match="bit width"):
        pack_bits(torch.tensor([0]), bits)
    with pytest.raises(ValueError, match="bit width"):
        unpack_bits(torch.zeros(1, dtype=torch.uint8), bits, 1)
    with pytest.raises(ValueError, match="bit width"):
        packed_nbytes(1, bits)


@pytest.mark.parametrize("codes,bits", [([0, 16], 4), ([-1, 0], 4), ([2], 1), ([256], 8), ([8], 3)])
def test_codes_outside_the_bit_range_are_refused(codes, bits):
    with pytest.raises(ValueError, match=rf"\[0, {(1 << bits) - 1}\]"):
        pack_bits(torch.tensor(codes), bits)


@pytest.mark.parametrize(
    "packed",
    [
        torch.zeros(3, dtype=torch.uint8),        # one byte too many
        torch.zeros(1, dtype=torch.uint8),        # one too few
        torch.zeros(2, dtype=torch.int32),        # wrong dtype
        torch.zeros(1, 2, dtype=torch.uint8),     # not 1-D
    ],
)
def test_unpack_checks_length_dtype_and_rank(packed):
    with pytest.raises(ValueError, match="2 bytes"):
        unpack_bits(packed, 3, 5)  # 5 codes x 3 bits = 15 bits = 2 bytes



def test_pack_refuses_non_integer_codes():
    with pytest.raises((TypeError, ValueError)):
        pack_bits(torch.tensor([1.5, 2.7]), 2)
