"""SparseQuantConv2d: a pruned conv's kept integer codes plus the pattern of its [out, in/groups*kh*kw]
matrix. Forward equal (torch.equal) to the QuantConv2d holding the same dense codes, for every layout,
grouped / strided / dilated geometry and cache_weight; pruned weights exactly +0.0; bytes counted by
hand; state_dict round trip; bad input refused with a clear message."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from shrink.modules import QuantConv2d, SparseConv2d, SparseQuantConv2d
from shrink.modules.sparse_quant_linear import sparse_codes_nbytes
from shrink.quant import QuantSpec, quantize

INT4 = QuantSpec(bits=4, symmetric=False, granularity="group", group_size=16)
INT8 = QuantSpec(bits=8, symmetric=False, granularity="channel")


def _conv(out_c=8, in_c=16, k=3, groups=1, seed=0, **geo):
    torch.manual_seed(seed)
    return nn.Conv2d(in_c, out_c, k, groups=groups, **geo)


def _mask(shape, keep=0.5, seed=0):
    """Exactly round(keep * numel) kept positions, at random."""
    g = torch.Generator().manual_seed(seed)
    flat = torch.zeros(shape[0] * shape[1], dtype=torch.bool)
    flat[torch.randperm(flat.numel(), generator=g)[: round(keep * flat.numel())]] = True
    return flat.view(shape)


def _nm_mask(w, n=2, m=4):
    groups = w.abs().view(w.shape[0], -1, m)
    idx = groups.topk(n, dim=-1).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True).view_as(w)


def _geometry(c: nn.Conv2d) -> dict:
    return dict(in_channels=c.in_channels, kernel_size=c.kernel_size, stride=c.stride, padding=c.padding,
                dilation=c.dilation, groups=c.groups)


def _pair(c: nn.Conv2d, spec, layout="bitmask", quantize_masked=False, mask=None, n=None, m=None, **kw):
    """(sparse, dense-codes QuantConv2d of the same codes, mask, qt) for conv c."""
    w = c.weight.detach().reshape(c.out_channels, -1)
    mask = _mask(tuple(w.shape)) if mask is None else mask
    qt = quantize(w * mask if quantize_masked else w, spec)
    sq = SparseQuantConv2d.from_qtensor(qt, c.bias.detach(), mask, layout, n, m, **_geometry(c), **kw)
    dense = QuantConv2d.from_qtensor(sq.to_qtensor(), c.bias.detach(), **_geometry(c))
    return sq, dense, mask, qt


@pytest.mark.parametrize("layout", ["bitmask", "csr"])
@pytest.mark.parametrize("spec", [INT4, INT4.with_(symmetric=True), INT8], ids=["int4", "int4sym", "int8"])
def test_forward_equals_the_dense_codes_quantconv2d(layout, spec):
    c = _conv(padding=1)
    sq, dense, mask, qt = _pair(c, spec, layout)
    x = torch.randn(3, 16, 7, 7)
    assert sq.kernel == dense.kernel == "reference"
    assert torch.equal(sq(x), dense(x))
    # and the conv of the quantized weight times the mask: the codes where pruned are dropped
    want = F.conv2d(x, (qt.dequantize() * mask).reshape(c.weight.shape), c.bias.detach(), padding=1)
    assert torch.equal(sq(x), want)
    assert torch.equal(sq(x[0]), dense(x[0]))   # unbatched [C, H, W]


def test_pruned_weights_dequantize_to_exact_zero_whatever_the_codes_there():
    c = _conv(seed=1)
    sq, dense, mask, qt = _pair(c, INT4)   # the dense weight quantized: pruned codes are not the zero code
    assert not bool((qt.dequantize()[~mask] == 0).all())
    d = sq.dense_weight()
    assert tuple(d.shape) == (8, 144)
    assert bool((d[~mask] == 0).all()) and not bool(torch.signbit(d[~mask]).any())   # +0.0
    assert torch.equal(d[mask], qt.dequantize()[mask])
    assert torch.equal(sq.mask(), mask)
    assert torch.equal(sq.dequantized_weight(), d.reshape(c.weight.shape))          # nn.Conv2d's 4-D view
    assert torch.equal(sq.to_qtensor().dequantize(), d)   # the zero code where pruned
    assert torch.equal(dense.dequantized_weight(), sq.dequantized_weight())


def test_bytes_counted_by_hand():
    # digits-cnn's second conv: 32 filters of 16 x 3 x 3 = a [32, 144] matrix, 50% kept
    c = _conv(out_c=32, in_c=16, seed=2)
    scales = 32 * 2 * 2                         # per filter: fp16 scale + fp16 zero-point
    sq, dense, mask, _ = _pair(c, INT8, "bitmask")
    assert sq.nnz == 2304 and sq.sparsity == 0.5
    assert sq.nbytes == 2304 + 32 * 144 // 8 + scales == 3008   # codes + 1 bit a position + scales
    assert dense.nbytes == 4608 + scales == 4736
    csr, _, _, _ = _pair(c, INT8, "csr", mask=mask)
    assert csr.nbytes == 2304 + 2304 * 2 + 33 * 4 + scales   # int16 column per code, int32 row pointers
    assert csr.nbytes == sparse_codes_nbytes("csr", (32, 144), 2304, 8) + scales
    int4, dense4, _, _ = _pair(c, INT4, "bitmask", mask=mask)
    scales4 = 32 * (144 // 16) * 2 * 2
    assert int4.nbytes == 2304 // 2 + 576 + scales4 and dense4.nbytes == 4608 // 2 + scales4


def test_two_four_stores_nm_positions_and_padding_slots_hold_the_zero_code():
    c = _conv(out_c=32, in_c=16, seed=3)
    w = c.weight.detach().reshape(32, -1)
    mask = _nm_mask(w)
    mask[0, :4] = False   # a group with nothing kept: two zero-coded padding slots
    sq, dense, _, _ = _pair(c, INT8, "nm", mask=mask, n=2, m=4)
    slots = 32 * 144 // 4 * 2
    assert sq.layout == "nm" and sq.nnz == slots
    assert sq.nbytes == slots + slots * 2 // 8 + 32 * 2 * 2   # int8 codes + 2-bit positions + scales
    d = sq.dense_weight()
    assert bool((d[~mask] == 0).all()) and int(sq.mask()[0, :4].sum()) == 2
    x = torch.randn(2, 16, 6, 6)
    assert torch.equal(sq(x), dense(x))


@pytest.mark.parametrize("geo", [dict(groups=4, padding=1), dict(groups=16, padding="same", dilation=2),
                                 dict(groups=2, stride=2, padding=(1, 0))],
                         ids=["grouped", "depthwise-dilated-same", "strided"])
@pytest.mark.parametrize("layout", ["bitmask", "csr"])
def test_grouped_and_strided_convs(geo, layout):
    c = _conv(out_c=16, in_c=16, seed=4, **geo)
    sq, dense, mask, _ = _pair(c, INT8, layout)
    assert (sq.out_features, sq.in_features) == (16, 16 // c.groups * 9)
    x = torch.randn(2, 16, 9, 9)
    assert torch.equal(sq(x), dense(x))
    assert sq(x).shape == c(x).shape


def test_cache_weight_and_from_conv_with_a_four_d_mask():
    c = _conv(padding=1, seed=5)
    w = c.weight.detach()
    mask4 = w.abs() > w.abs().median()
    qt = quantize(w.reshape(8, -1), INT4)
    sq = SparseQuantConv2d.from_conv(c, qt, mask4, cache_weight=True)
    assert sq._cached_weight is not None
    plain = SparseQuantConv2d.from_conv(c, qt, mask4.reshape(8, -1))
    x = torch.randn(2, 16, 5, 5)
    assert torch.equal(sq(x), plain(x)) and torch.equal(sq.mask(), mask4.reshape(8, -1))
    assert "layout=bitmask" in repr(sq) and "sparsity=0.500" in repr(sq)


def test_state_dict_round_trip_and_a_corrupt_pattern_refused():
    c = _conv(out_c=16, in_c=16, padding=1, seed=6)
    w = c.weight.detach().reshape(16, -1)
    x = torch.randn(2, 16, 5, 5)
    for layout, n, m, msk in (("bitmask", None, None, _mask((16, 144))), ("csr", None, None, _mask((16, 144), 0.1)),
                              ("nm", 2, 4, _nm_mask(w))):
        sq, _, _, _ = _pair(c, INT4, layout, mask=msk, n=n, m=m)
        shell = SparseQuantConv2d(16, 16, 3, INT4, layout, sq.nnz, padding=1, n=n, m=m)
        shell.load_state_dict(sq.state_dict())
        assert torch.equal(shell.dense_weight(), sq.dense_weight()) and torch.equal(shell(x), sq(x))
    sd = dict(sq.state_dict())
    bad = sd["positions"].clone()
    bad[0] = 0   # slots (0, 0): positions not strictly increasing
    with pytest.raises(RuntimeError, match="SparseQuantConv2d.*sparse pattern is invalid"):
        shell.load_state_dict({**sd, "positions": bad})
    with pytest.raises(RuntimeError, match="casting would change the pattern"):
        shell.load_state_dict({**sd, "positions": sd["positions"].to(torch.int16)})


def test_refusals_name_the_problem():
    c = _conv(seed=7)
    w = c.weight.detach().reshape(8, -1)
    mask = _mask((8, 144))
    with pytest.raises(ValueError, match="SparseQuantConv2d stores integer codes.*dense QuantConv2d"):
        SparseQuantConv2d.from_qtensor(quantize(w, QuantSpec(format="nf4", granularity="group", group_size=16)),
                                       None, mask, **_geometry(c))
    with pytest.raises(ValueError, match="2-D"):
        SparseQuantConv2d.from_qtensor(quantize(c.weight.detach(), INT8), None, mask, **_geometry(c))
    with pytest.raises(ValueError, match="mask must be a bool tensor of shape"):
        SparseQuantConv2d.from_qtensor(quantize(w, INT8), None, mask.float(), **_geometry(c))
    with pytest.raises(ValueError, match="does not match the conv"):
        SparseQuantConv2d.from_qtensor(quantize(w, INT8), None, mask, **{**_geometry(c), "kernel_size": 5})
    with pytest.raises(ValueError, match="padding_mode"):
        SparseQuantConv2d(16, 8, 3, INT8, "bitmask", 10, padding_mode="reflect")
    with pytest.raises(ValueError, match="SparseQuantConv2d: nnz must be"):
        SparseQuantConv2d(16, 8, 3, INT8, "bitmask", 10_000)


def test_same_codes_as_a_sparse_conv_quantized_by_hand():
    """A SparseConv2d (the prune step's output) quantized: its mask and dense weight feed from_qtensor."""
    c = _conv(padding=1, seed=8)
    sp = SparseConv2d.from_conv(c, mask=(c.weight.abs() > 0.05))
    qt = quantize(sp.dense_weight(), INT8)
    sq = SparseQuantConv2d.from_qtensor(qt, sp.bias.detach(), sp.mask(), **_geometry(c))
    assert sq.nnz == sp.nnz and torch.equal(sq.mask(), sp.mask())
    x = torch.randn(2, 16, 5, 5)
    assert (sq(x) - sp(x)).abs().max() < 0.02 * sp(x).abs().max()   # int8: close to the float sparse conv
