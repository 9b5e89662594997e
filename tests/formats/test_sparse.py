"""Sparse weight storage: bit-exact round trips, exact byte counts, layout choice,
clear errors, and a decoder that refuses corrupted buffers instead of crashing."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from shrink.formats.sparse import (
    BitmaskWeight, CSRWeight, NMWeight, best_layout, col_index_dtype, decode_sparse, encode_sparse,
    row_ptr_dtype, sparse_nbytes,
)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SHAPES = ((1, 1), (3, 5), (7, 16), (16, 64), (33, 24))
SPARSITIES = (0.0, 0.3, 0.5, 0.9, 1.0)
_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _weight(shape, dtype, seed=0) -> torch.Tensor:
    """Random values with the awkward ones mixed in: -0.0, NaN, inf, subnormal-ish."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g).to(dtype)
    flat = w.view(-1)
    specials = torch.tensor([-0.0, float("nan"), float("-inf"), 1e-40], dtype=dtype)
    k = min(flat.numel(), specials.numel())
    flat[:k] = specials[:k]
    return w


def _mask(shape, sparsity, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) >= sparsity


def _nm_mask(shape, n, m, seed=2) -> torch.Tensor:
    """Each group of m keeps a random number 0..n of random columns."""
    g = torch.Generator().manual_seed(seed)
    out_f, in_f = shape
    scores = torch.rand(out_f, in_f // m, m, generator=g)
    keep = torch.randint(0, n + 1, (out_f, in_f // m, 1), generator=g)
    rank = scores.argsort(-1).argsort(-1)
    return (rank < keep).view(shape)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_INT_VIEW[t.dtype])


def _expected(w, mask):
    return torch.where(mask, w, torch.zeros((), dtype=w.dtype))


def _stored_bytes(stored) -> int:
    return sum(t.nbytes for t in stored.tensors().values())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["bitmask", "csr"])
def test_round_trip_is_bit_exact_and_bytes_are_exact(layout, dtype):
    for shape in SHAPES:
        for sparsity in SPARSITIES:
            w, mask = _weight(shape, dtype), _mask(shape, sparsity)
            w_before, mask_before = w.clone(), mask.clone()
            stored = encode_sparse(w, mask, layout)
            out = decode_sparse(stored)
            assert out.dtype == dtype and out.shape == shape
            assert torch.equal(_bits(out), _bits(_expected(w, mask))), (shape, sparsity)
            assert torch.equal(stored.mask(), mask)
            nnz = int(mask.sum())
            assert stored.nnz == nnz
            assert stored.nbytes == _stored_bytes(stored) == sparse_nbytes(layout, shape, nnz, w.element_size())
            assert torch.equal(_bits(w), _bits(w_before)) and torch.equal(mask, mask_before)  # inputs untouched


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (3, 8), (1, 2), (2, 3), (5, 16)])
def test_nm_round_trip_pads_short_groups_and_counts_bytes(n, m, dtype):
    for shape in ((1, m), (5, 4 * m), (16, 6 * m)):
        w, mask = _weight(shape, dtype, seed=shape[0]), _nm_mask(shape, n, m, seed=shape[1])
        stored = encode_sparse(w, mask, "nm", n=n, m=m)
        assert torch.equal(_bits(stored.decode()), _bits(_expected(w, mask)))
        slots = shape[0] * shape[1] // m * n
        assert stored.values.shape == (shape[0], shape[1] // m * n) and stored.nnz == slots
        assert stored.positions.numel() == math.ceil(slots * max(1, math.ceil(math.log2(m))) / 8)
        assert stored.nbytes == _stored_bytes(stored) == sparse_nbytes("nm", shape, int(mask.sum()),
                                                                       w.element_size(), n=n, m=m)
        slots_mask = stored.mask()  # exactly n slots per group, covering every kept weight
        assert bool((slots_mask.view(shape[0], -1, m).sum(-1) == n).all())
        assert bool(slots_mask[mask].all())
        # padding slots hold +0.0
        assert bool((_bits(stored.decode()[slots_mask & ~mask]) == 0).all())


def test_nm_positions_for_a_known_mask():
    w = torch.arange(1.0, 9.0).view(1, 8)
    mask = torch.tensor([[False, True, False, True, False, False, True, False]])
    stored = encode_sparse(w, mask, "nm", n=2, m=4)
    # group 0 keeps columns 1, 3; group 1 keeps column 2 and pads at its lowest free column, 0
    assert stored.values.tolist() == [[2.0, 4.0, 0.0, 7.0]]
    assert stored.positions.tolist() == [1 | 3 << 2 | 0 << 4 | 2 << 6]  # 2-bit codes, LSB first


def test_real_pretrained_weights_magnitude_pruned(minilm_weights):
    w = minilm_weights["encoder.layer.0.intermediate.dense.weight"]  # [1536, 384]
    mask = w.abs() > w.abs().flatten().kthvalue(int(0.8 * w.numel())).values
    for layout in ("bitmask", "csr"):
        stored = encode_sparse(w, mask, layout)
        assert torch.equal(stored.decode(), _expected(w, mask))
    assert encode_sparse(w, mask, "csr").col_indices.dtype == torch.int16


def test_index_dtypes_are_the_smallest_that_fit():
    assert col_index_dtype(32768) == torch.int16 and col_index_dtype(32769) == torch.int32
    assert row_ptr_dtype(2**31 - 1) == torch.int32 and row_ptr_dtype(2**31) == torch.int64
    for in_f, want in ((32768, torch.int16), (32769, torch.int32)):
        w = torch.zeros(2, in_f)
        w[0, -1] = w[1, 0] = 1.0
        stored = encode_sparse(w, layout="csr")
        assert stored.col_indices.dtype == want and stored.crow_indices.dtype == torch.int32
        assert stored.col_indices.tolist() == [in_f - 1, 0] and torch.equal(stored.decode(), w)
    # the formula for sizes too big to build: int64 row pointers past 2^31 - 1 values
    shape, nnz = (65536, 65536), 2**31
    assert sparse_nbytes("csr", shape, nnz, 2) == nnz * (2 + 4) + (65536 + 1) * 8
    assert sparse_nbytes("csr", shape, nnz - 1, 2) == (nnz - 1) * (2 + 4) + (65536 + 1) * 4


def test_sparse_nbytes_worked_values():
    # [4096, 4096] fp16 at 90% sparsity: 1677722 values
    nnz = 1677722
    assert sparse_nbytes("dense", (4096, 4096), nnz, 2) == 33554432
    assert sparse_nbytes("bitmask", (4096, 4096), nnz, 2) == 2097152 + 2 * nnz
    assert sparse_nbytes("csr", (4096, 4096), nnz, 2) == 4 * nnz + 4097 * 4
    assert sparse_nbytes("nm", (4096, 4096), nnz, 2, n=2, m=4) == 8388608 * 2 + 8388608 * 2 // 8
    assert sparse_nbytes("nm", (8, 24), 0, 4, n=2, m=3) == 128 * 4 + 32  # 8 rows x 8 groups x 2 slots, 2-bit positions


def test_best_layout_picks_the_smallest():
    # fp32 [100, 100]: csr 6 nnz + 404, bitmask 4 nnz + 1250, dense 40000
    cases = {(100, 100): [(0, "csr"), (400, "csr"), (450, "bitmask"), (9000, "bitmask"), (9700, "dense"),
                          (10000, "dense")]}
    for shape, rows in cases.items():
        for nnz, want in rows:
            assert best_layout(shape, nnz, 4) == want, nnz
            sizes = {lay: sparse_nbytes(lay, shape, nnz, 4) for lay in ("dense", "bitmask", "csr")}
            assert sizes[want] == min(sizes.values())
    # csr vs bitmask crossover at fp16: csr costs 4 bytes a value + row pointers, bitmask 2 + 1/8 a position
    shape = (1024, 1024)
    flips = [nnz for nnz in range(0, 1024 * 1024, 4096) if best_layout(shape, nnz, 2) == "bitmask"]
    assert flips and 60000 < flips[0] < 70000  # (2 + 2) nnz + 4100 = 2 nnz + 131072  ->  nnz ~ 63500
    # [8, 8] fp32: bitmask 8 + 4 nnz ties dense's 256 bytes at nnz = 62: dense wins a tie
    assert (best_layout((8, 8), 62, 4), best_layout((8, 8), 61, 4)) == ("dense", "bitmask")


def test_bad_inputs_say_what_and_where():
    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of the weight's shape \(4, 8\), got \(4, 7\)"):
        encode_sparse(w, torch.ones(4, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        encode_sparse(w, torch.ones(4, 8))
    with pytest.raises(ValueError, match="2-D floating-point"):
        encode_sparse(torch.ones(4, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="layout must be one of"):
        encode_sparse(w, layout="coo")
    mask = torch.zeros(4, 8, dtype=torch.bool)
    mask[2, 4:7] = True
    with pytest.raises(ValueError, match=r"not 2:4: row 2, columns 4..7 keep 3 values"):
        encode_sparse(w, mask, "nm", n=2, m=4)
    with pytest.raises(ValueError, match="1 <= n <= m"):
        encode_sparse(w, mask, "nm", n=5, m=4)
    with pytest.raises(ValueError, match="in_features 8 is not a multiple of m=3"):
        encode_sparse(w, None, "nm", n=1, m=3)
    with pytest.raises(ValueError, match="positive integers n and m"):
        encode_sparse(w, None, "nm")
    with pytest.raises(ValueError, match="nnz must be an integer in 0..32"):
        sparse_nbytes("csr", (4, 8), 33, 4)
    with pytest.raises(ValueError, match="exceeds the 16 slots"):
        sparse_nbytes("nm", (4, 8), 17, 4, n=2, m=4)
    with pytest.raises(ValueError, match="layout must be"):
        sparse_nbytes("coo", (4, 8), 3, 4)
    with pytest.raises(ValueError, match="decode_sparse: expected"):
        decode_sparse(w)


# ----------------------------------------------------------------------------- corrupted buffers

def _samples():
    w = _weight((6, 16), torch.float32)
    return {"bitmask": encode_sparse(w, _mask((6, 16), 0.6), "bitmask"),
            "csr": encode_sparse(w, _mask((6, 16), 0.6), "csr"),
            "nm": encode_sparse(w, _nm_mask((6, 16), 2, 4), "nm", n=2, m=4),
            "nm3": encode_sparse(_weight((4, 12), torch.float32), _nm_mask((4, 12), 2, 3), "nm", n=2, m=3)}


def test_targeted_corruptions_are_refused():
    s = _samples()
    bm, csr, nm, nm3 = s["bitmask"], s["csr"], s["nm"], s["nm3"]
    bad = {
        "mask_bits sets": lambda: dataclasses.replace(bm, values=bm.values[:-1]),
        "1-D uint8 tensor of 12": lambda: dataclasses.replace(bm, mask_bits=bm.mask_bits[:-1]),
        "crow_indices must run from 0": lambda: dataclasses.replace(csr, crow_indices=csr.crow_indices - 1),
        "1-D int16 tensor": lambda: dataclasses.replace(csr, col_indices=csr.col_indices.int()),
        "col_indices must lie in 0..15": lambda: dataclasses.replace(
            csr, col_indices=torch.where(torch.arange(csr.nnz) == 3, 16, csr.col_indices).to(torch.int16)),
        "crow_indices decrease at row 1": lambda: dataclasses.replace(
            csr, crow_indices=torch.tensor([0, csr.nnz, 1, 2, 3, 4, csr.nnz], dtype=torch.int32)),
        "not strictly increasing": lambda: dataclasses.replace(csr, col_indices=csr.col_indices.flip(0)),
        "values must have shape": lambda: dataclasses.replace(nm, values=nm.values.reshape(-1)),
        "stores a position >= m=3": lambda: dataclasses.replace(nm3, positions=torch.full_like(nm3.positions, 255)),
        "row 0, group 0 has positions": lambda: dataclasses.replace(nm, positions=torch.zeros_like(nm.positions)),
        "floating-point": lambda: dataclasses.replace(bm, values=bm.values.long()),
    }
    for message, build in bad.items():
        with pytest.raises(ValueError, match=message):
            build()
    tail = torch.zeros(3, 1)  # 3 positions: the last byte has 5 spare bits, which must stay 0
    tail[1] = 1.0
    t = encode_sparse(tail, layout="bitmask")
    with pytest.raises(ValueError, match="bits set past the last of 3"):
        dataclasses.replace(t, mask_bits=torch.tensor([0b1000_0010], dtype=torch.uint8),
                            values=torch.ones(1))


@pytest.mark.parametrize("name", ["bitmask", "csr", "nm", "nm3"])
def test_fuzzed_buffers_give_valueerror_or_a_valid_decode(name):
    stored = _samples()[name]
    g = torch.Generator().manual_seed(hash(name) % 1000)
    refused = 0
    for trial in range(150):
        tensors = dict(stored.tensors())
        key = list(tensors)[int(torch.randint(len(tensors), (1,), generator=g))]
        t = tensors[key].clone()
        how = trial % 4
        if how == 0:  # wrong length
            t = t.reshape(-1)[: max(0, t.numel() - 1 - int(torch.randint(3, (1,), generator=g)))]
        elif how == 1:
            t = torch.cat([t.reshape(-1), t.reshape(-1)[:2]])
        elif how == 2 and not t.is_floating_point():  # random bytes in an index buffer
            flat = t.view(torch.uint8).reshape(-1)
            i = int(torch.randint(flat.numel(), (1,), generator=g))
            flat[i] = int(torch.randint(256, (1,), generator=g))
        elif how == 3 and not t.is_floating_point():  # out-of-range index
            flat = t.reshape(-1)
            flat[int(torch.randint(flat.numel(), (1,), generator=g))] = torch.iinfo(t.dtype).max
        try:
            again = dataclasses.replace(stored, **{key: t})
        except ValueError:
            refused += 1
            continue
        out = again.decode()  # accepted: must decode to a tensor of the right shape
        assert out.shape == stored.shape and torch.equal(again.mask(), again.mask())
    assert refused > 50
