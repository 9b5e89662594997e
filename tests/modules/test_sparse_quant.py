"""SparseQuantLinear: the codes of the kept weights only, plus the pattern. Bytes as counted
by hand, pruned weights exactly +0.0, forward equal to the dense-codes QuantLinear of the
same codes (reference and packed-kernel paths), state_dict round trip, corrupt patterns refused."""
from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from shrink.algos.nm import check_nm
from shrink.modules import QuantLinear, SparseQuantLinear
from shrink.modules.sparse_quant_linear import sparse_codes_layout, sparse_codes_nbytes
from shrink.quant import QuantSpec, quantize

INT4 = QuantSpec(bits=4, symmetric=False, granularity="group", group_size=32)


def _case(out_f=32, in_f=128, keep=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    mask = torch.rand(out_f, in_f, generator=g) < keep
    return w, mask, torch.randn(out_f, generator=g)


def _nm_mask(w, n=2, m=4):
    groups = w.abs().view(w.shape[0], -1, m)
    idx = groups.topk(n, dim=-1).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True).view_as(w)


@pytest.mark.parametrize("layout", ["bitmask", "csr"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_bytes_are_the_kept_codes_the_pattern_and_the_scales(layout, symmetric):
    w, mask, bias = _case()
    spec = INT4 if not symmetric else INT4.with_(symmetric=True)
    qt = quantize(w * mask, spec)
    sq = SparseQuantLinear.from_qtensor(qt, bias, mask, layout)
    nnz = int(mask.sum())
    scales = 32 * (128 // 32) * 2 * (1 if symmetric else 2)          # fp16 scale (+ zero-point) per group
    pattern = 32 * 128 // 8 if layout == "bitmask" else nnz * 2 + 33 * 4   # 1 bit a position | int16 cols + int32 rows
    assert sq.nbytes == (nnz * 4 + 7) // 8 + pattern + scales
    assert sq.nbytes == sparse_codes_nbytes(layout, (32, 128), nnz, 4) + scales
    assert sq.nnz == nnz and sq.layout == layout
    dense = QuantLinear.from_qtensor(qt, bias)
    assert dense.nbytes == 32 * 128 // 2 + scales
    if layout == "bitmask":   # 50%: 0.25 + 0.125 bytes a weight for the codes and mask, against 0.5
        assert sq.nbytes - scales == pytest.approx(0.375 * 32 * 128, rel=0.03)


def test_pruned_weights_dequantize_to_exact_zero_whatever_the_codes_there():
    w, mask, bias = _case(seed=1)
    qt = quantize(w, INT4)   # the dense weight quantized: codes at pruned positions are not the zero code
    sq = SparseQuantLinear.from_qtensor(qt, bias, mask, "bitmask")
    d = sq.dense_weight()
    assert bool((d[~mask] == 0).all()) and not bool(torch.signbit(d[~mask]).any())   # +0.0
    assert torch.equal(d[mask], qt.dequantize()[mask])                              # kept: the same codes
    assert torch.equal(sq.mask(), mask)
    # the dense QTensor it hands out carries the zero code there: it dequantizes to exactly 0 too
    assert torch.equal(sq.to_qtensor().dequantize(), d)


@pytest.mark.parametrize("symmetric", [False, True])
def test_forward_equals_the_dense_codes_forward(symmetric):
    w, mask, bias = _case(seed=2)
    spec = INT4.with_(symmetric=symmetric)
    qt = quantize(w * mask, spec)
    x = torch.randn(5, 128)
    ref = SparseQuantLinear.from_qtensor(qt, bias, mask, "bitmask", kernel="reference")
    assert ref.kernel == "reference"
    want = F.linear(x, QuantLinear.from_qtensor(qt, bias).dequantized_weight() * mask, bias)
    assert torch.equal(ref(x), want)
    fast = SparseQuantLinear.from_qtensor(qt, bias, mask, "bitmask")
    assert fast.kernel == "int4pack_cpu"
    same = QuantLinear.from_qtensor(fast.to_qtensor(), bias)   # the same dense codes, dense storage
    assert torch.equal(fast(x), same(x))
    assert (fast(x) - want).abs().max() < 0.05 * want.abs().max()   # bf16 kernel: close to the reference


def test_int8_kernel_and_three_dimensional_inputs():
    w, mask, bias = _case(seed=3, keep=0.3)
    spec = QuantSpec(bits=8, symmetric=True, granularity="channel")
    qt = quantize(w * mask, spec)
    sq = SparseQuantLinear.from_qtensor(qt, bias, mask, "bitmask")
    assert sq.kernel == "int8pack_cpu"
    x = torch.randn(2, 3, 128)
    assert torch.equal(sq(x), QuantLinear.from_qtensor(sq.to_qtensor(), bias)(x))
    assert sq.nbytes == int(mask.sum()) + 32 * 128 // 8 + 32 * 2


def test_two_four_uses_nm_positions():
    w, _, bias = _case(seed=4)
    mask = _nm_mask(w)
    assert check_nm(mask, 2, 4)
    qt = quantize(w * mask, INT4)
    assert sparse_codes_layout((32, 128), int(mask.sum()), 4, 2, 4) == "nm"
    sq = SparseQuantLinear.from_qtensor(qt, bias, mask, "nm", 2, 4)
    slots = 32 * 128 // 2
    assert tuple(sq.positions.shape) == ((slots * 2 + 7) // 8,)   # 2 bits a slot's position
    assert sq.nbytes == slots * 4 // 8 + slots * 2 // 8 + 32 * 4 * 4
    assert torch.equal(sq.mask(), mask)
    d = sq.dense_weight()
    assert bool((d[~mask] == 0).all()) and torch.equal(d[mask], qt.dequantize()[mask])


def test_nm_padding_slots_hold_the_zero_code():
    w, _, bias = _case(seed=5)
    mask = _nm_mask(w)
    mask[0, :4] = False                 # a group with nothing kept: two padding slots
    qt = quantize(w, INT4)              # non-zero codes everywhere
    sq = SparseQuantLinear.from_qtensor(qt, bias, mask, "nm", 2, 4)
    d = sq.dense_weight()
    assert bool((d[~mask] == 0).all()) and int(sq.mask()[0, :4].sum()) == 2   # stored slots, weight 0


def test_layout_choice_and_refusals():
    assert sparse_codes_layout((64, 64), 2048, 4) == "bitmask"
    assert sparse_codes_layout((64, 64), 100, 4) == "csr"          # 97.6% sparse: indices beat a bitmask
    assert sparse_codes_layout((64, 64), 3700, 4) == "dense"       # 10% sparse: the mask costs more than it saves
    w, mask, bias = _case()
    with pytest.raises(ValueError, match="integer codes"):
        SparseQuantLinear.from_qtensor(quantize(w, QuantSpec(format="nf4", granularity="group", group_size=32)),
                                       bias, mask)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        SparseQuantLinear.from_qtensor(quantize(w, INT4), bias, mask.float())
    with pytest.raises(ValueError, match="not 2:4"):
        SparseQuantLinear.from_qtensor(quantize(w, INT4), bias, mask | True, "nm", 2, 4)


def test_state_dict_round_trip_and_a_corrupt_pattern_refused():
    w, mask, bias = _case(seed=6)
    x = torch.randn(4, 128)
    for layout, n, m, msk in (("bitmask", None, None, mask), ("csr", None, None, mask),
                              ("nm", 2, 4, _nm_mask(w))):
        sq = SparseQuantLinear.from_qtensor(quantize(w * msk, INT4), bias, msk, layout, n, m)
        shell = SparseQuantLinear(128, 32, INT4, layout, sq.nnz, n=n, m=m)
        shell.load_state_dict(sq.state_dict())
        assert torch.equal(shell.dense_weight(), sq.dense_weight()) and torch.equal(shell(x), sq(x))
        assert shell.kernel == sq.kernel
    sd = dict(sq.state_dict())
    bad = sd["positions"].clone()
    bad[0] = 0   # slots (0, 0): positions not strictly increasing
    with pytest.raises(RuntimeError, match="sparse pattern is invalid"):
        shell.load_state_dict({**sd, "positions": bad})
    with pytest.raises(RuntimeError, match="casting would change the pattern"):
        shell.load_state_dict({**sd, "positions": sd["positions"].to(torch.int16)})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("bits", [4, 3])
def test_cuda_paths_equal_the_dense_codes_module(bits):
    w, mask, bias = _case(seed=7)
    qt = quantize(w * mask, INT4.with_(bits=bits))
    sq = SparseQuantLinear.from_qtensor(qt, bias, mask, "bitmask").to("cuda")
    same = QuantLinear.from_qtensor(sq.to_qtensor(), bias).to("cuda")
    assert sq.kernel == same.kernel and sq.kernel in ("int4pack_cuda", "dequant_cuda")
    x = torch.randn(5, 128, device="cuda")
    assert torch.equal(sq(x), same(x))
    d = sq.dense_weight()
    assert d.device.type == "cuda" and bool((d[~mask.cuda()] == 0).all())
    back = sq.cpu()   # moved back: the CPU path, the same weight
    assert torch.equal(back.dense_weight(), d.cpu()) and back.kernel == ("int4pack_cpu" if bits == 4 else "reference")
