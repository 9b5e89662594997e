"""CodebookFormat and the NF4 table."""
from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shrink.formats import NF4, CodebookFormat, nf4_values

# QLoRA / bitsandbytes NF4 constants (bitsandbytes functional.py, `create_normal_map`).
BNB_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]


def _nearest_lower_on_tie(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Brute-force reference: argmin |x - table|, the lower index on an exact tie."""
    d = (x.to(torch.float64)[:, None] - table[None, :]).abs()
    return torch.argmin(d, dim=1).to(torch.int32)  # argmin returns the first minimum


# ------------------------------------------------------------------- NF4


def test_nf4_table_equals_the_qlora_bitsandbytes_constants():
    ref = torch.tensor(BNB_NF4, dtype=torch.float64)
    assert nf4_values().shape == (16,)
    assert torch.allclose(nf4_values(), ref, rtol=0, atol=1e-6)
    assert torch.allclose(NF4.values, ref, rtol=0, atol=1e-6)
    assert torch.allclose(NF4.stored_values(), ref, rtol=0, atol=1e-6)


def test_nf4_table_shape_facts():
    v = NF4.values
    assert v[0].item() == -1.0 and v[-1].item() == 1.0 and v[7].item() == 0.0
    assert (v[1:] > v[:-1]).all()
    assert int((v > 0).sum()) == 8 and int((v < 0).sum()) == 7  # asymmetric: one extra positive level
    assert NF4.bits == 4 and NF4.name == "nf4"
    assert NF4.builtin and NF4.table_nbytes == 0               # a well-known table is not stored


def test_nf4_levels_are_equal_probability_normal_quantiles():
    # QLoRA: the positive levels are normal quantiles at evenly spaced probabilities
    # from 0.5 to delta = 1 - (1/32 + 1/30)/2, normalised by the largest.
    delta = 1 - (1 / 32 + 1 / 30) / 2
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    p = torch.linspace(delta, 0.5, 9, dtype=torch.float64)[:-1]
    pos = normal.icdf(p)
    pos = torch.sort(pos / pos.max()).values
    assert torch.allclose(NF4.values[8:], pos, atol=1e-12)


def test_nf4_encode_matches_brute_force_nearest():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.rand(5000, generator=g) * 2.4 - 1.2, torch.tensor([-1.0, 0.0, 1.0, -5.0, 5.0])])
    codes = NF4.encode(x)
    assert codes.dtype == torch.int32
    assert torch.equal(codes, _nearest_lower_on_tie(x, NF4.stored_values()))
    assert torch.equal(NF4.decode(torch.arange(16)), NF4.stored_values().to(torch.float32))


def test_nf4_exact_midpoints_go_to_the_lower_value():
    t = NF4.stored_values()
    mids = (t[1:] + t[:-1]) / 2  # exact in float64
    assert NF4.encode(mids).tolist() == list(range(15))
    # just above each midpoint goes up
    assert NF4.encode(mids + 1e-9).tolist() == list(range(1, 16))


def test_nf4_round_trip_of_its_own_values():
    codes = NF4.encode(NF4.stored_values())
    assert codes.tolist() == list(range(16))
    assert torch.equal(NF4.decode(codes, torch.float64), NF4.stored_values())


# ------------------------------------------------------------- codebooks


def test_codebook_sorts_its_values_and_keeps_float64():
    cb = CodebookFormat(torch.tensor([0.5, -1.0, 0.25]))
    assert cb.values.tolist() == [-1.0, 0.25, 0.5]
    assert cb.values.dtype == torch.float64


@pytest.mark.parametrize("n,bits", [(1, 1), (2, 1), (3, 2), (4, 2), (5, 3), (16, 4), (17, 5), (255, 8), (256, 8)])
def test_codebook_bits_is_ceil_log2_of_its_size(n, bits):
    assert CodebookFormat(torch.linspace(-1, 1, n)).bits == bits


@pytest.mark.parametrize("dtype,size", [(torch.float32, 4), (torch.float16, 2), (torch.bfloat16, 2)])
def test_codebook_table_counts_toward_stored_bytes(dtype, size):
    cb = CodebookFormat(torch.linspace(-1, 1, 8), table_dtype=dtype)
    assert cb.table_nbytes == 8 * size
    assert CodebookFormat(torch.linspace(-1, 1, 8), table_dtype=dtype, builtin=True).table_nbytes == 0


def test_codebook_decodes_the_table_as_stored():
    values = torch.tensor([-0.1234567, 0.0, 0.3333333333], dtype=torch.float64)
    cb = CodebookFormat(values, table_dtype=torch.float16)
    stored = values.to(torch.float16).to(torch.float64)
    assert torch.equal(cb.stored_values(), stored)
    assert torch.equal(cb.decode(torch.tensor([0, 1, 2]), torch.float64), stored)


@pytest.mark.parametrize(
    "values,match",
    [
        (torch.tensor([]), "non-empty"),
        (torch.zeros(2, 2), "1-D"),
        (torch.linspace(0, 1, 257), "256"),
        (torch.tensor([0.0, float("nan")]), "finite"),
        (torch.tensor([0.0, float("inf")]), "finite"),
    ],
)
def test_codebook_validation(values, match):
    with pytest.raises(ValueError, match=match):
        CodebookFormat(values)


def test_codebook_rejects_non_tensors():
    with pytest.raises(ValueError):
        CodebookFormat([0.0, 1.0])  # type: ignore[arg-type]


def test_codebook_equality_and_hash():
    a = CodebookFormat(torch.tensor([0.0, 1.0]))
    b = CodebookFormat(torch.tensor([1.0, 0.0]))
    c = CodebookFormat(torch.tensor([0.0, 2.0]))
    assert a == b and hash(a) == hash(b)
    assert a != c
    assert a != CodebookFormat(torch.tensor([0.0, 1.0]), table_dtype=torch.float16)
    assert a != "codebook"


def test_codebook_input_is_not_modified():
    v = torch.tensor([0.5, -1.0, 0.25])
    before = v.clone()
    cb = CodebookFormat(v)
    x = torch.tensor([0.3, -2.0])
    xb = x.clone()
    cb.encode(x)
    assert torch.equal(v, before) and torch.equal(x, xb)


@settings(max_examples=60, deadline=None)
@given(
    table=st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=1, max_size=40, unique=True),
    xs=st.lists(st.floats(-20, 20, allow_nan=False, width=32), min_size=1, max_size=50),
)
def test_codebook_encode_is_nearest_with_ties_low(table, xs):
    cb = CodebookFormat(torch.tensor(table, dtype=torch.float32))
    x = torch.tensor(xs, dtype=torch.float32)
    codes = cb.encode(x)
    assert int(codes.min()) >= 0 and int(codes.max()) < len(table)
    # exact arithmetic (Fractions): the chosen value is a nearest one, and the lower on a tie
    table = [Fraction(v) for v in cb.stored_values().tolist()]
    for xi, ci in zip(x.tolist(), codes.tolist()):
        d = [abs(Fraction(xi) - t) for t in table]
        best = min(d)
        assert d[ci] == best
        assert ci == d.index(best)
