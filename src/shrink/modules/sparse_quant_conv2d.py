"""SparseQuantConv2d: a pruned Conv2d whose kept weights are stored as integer codes.

A QuantConv2d that keeps its layer's sparsity pattern, as SparseQuantLinear does for a
Linear: the weight is the [out_channels, in_channels/groups * kh * kw] matrix that
`Target.weight_view()` shows algorithms (each row one filter, columns in (channel, kh, kw)
order), and of it only the kept weights' integer codes are stored (bit-packed at the
spec's width), with the pattern of that matrix (a bitmask, CSR indices, or N:M positions,
shrink.formats.sparse) and the scales and zero-points of the dense grid. Persistent buffers:

  codes      uint8, the kept codes packed, row-major for bitmask / CSR, slot order for N:M
  scales, zeros   as QuantConv2d stores them
  mask_bits | col_indices + crow_indices | positions   the pattern

Bytes (`nbytes`, no bias): packed kept codes + pattern + scales + zero-points. digits-cnn's
conv2 (32 x 144, int8 per channel, asymmetric) at 50%: 2304 codes + 576 (bitmask) + 128 (an
fp16 scale and zero-point a filter) = 3008 bytes, against 4736 for the dense codes.

Forward is QuantConv2d's "reference" path: the dense weight is rebuilt from the kept codes
(the zero code where pruned, then exactly +0.0 there) and run through F.conv2d, so the
output equals a QuantConv2d holding the same dense codes, bit for bit. Only integer grids
(format "int", 1-8 bits) are stored this way (recipe/install.py keeps the others dense).
"""
from __future__ import annotations

import torch
from torch import nn

from shrink.modules._packed import placeholder_storage
from shrink.modules._sparse_codes import SparseCodes, check_grid, clone, encode_codes, shell_codes
from shrink.modules.quant_conv2d import QuantConv2d
from shrink.quant import QTensor, QuantSpec

__all__ = ["SparseQuantConv2d"]


class SparseQuantConv2d(SparseCodes, QuantConv2d):
    """y = conv2d(x, dequantize(codes) * mask, bias), with only the kept codes stored.

    Build one with `from_qtensor` (the quantized [out, in/groups*kh*kw] matrix, the pruning
    mask and the conv's geometry) or `from_conv`. The constructor makes a shell of the right
    sizes for load_state_dict to fill. `dense_weight()` is the [out, in/groups*kh*kw] matrix
    (as SparseConv2d's), `dequantized_weight()` nn.Conv2d's 4-D weight (as QuantConv2d's).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, spec: QuantSpec, layout: str, nnz: int,
                 stride=1, padding=0, dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 n: int | None = None, m: int | None = None, *, weight_dtype: torch.dtype = torch.float32,
                 cache_weight: bool = False):
        nn.Module.__init__(self)
        if not isinstance(spec, QuantSpec):
            raise TypeError(f"SparseQuantConv2d: spec must be a QuantSpec, got {type(spec).__name__}")
        check_grid(spec, "SparseQuantConv2d", "QuantConv2d")
        self._set_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode)
        pattern, codes = shell_codes("SparseQuantConv2d", spec, layout, tuple(self._matrix_shape), nnz, n, m)
        _, scales, zeros = placeholder_storage(self._matrix_shape, spec)
        b = torch.zeros(out_channels, dtype=weight_dtype) if bias else None
        self._set_pattern(pattern)
        self._setup(spec, weight_dtype, codes, scales, zeros, b, cache_weight)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, qtensor: QTensor, mask: torch.Tensor, layout: str = "bitmask",
                  n: int | None = None, m: int | None = None, *, cache_weight: bool = False) -> "SparseQuantConv2d":
        """The codes of `qtensor` (conv's [out, in/groups*kh*kw] weight quantized) where `mask`
        (bool, that matrix's shape or conv's weight shape), with conv's geometry and bias."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"SparseQuantConv2d.from_conv expects an nn.Conv2d, got {type(conv).__name__}")
        if isinstance(mask, torch.Tensor) and tuple(mask.shape) == tuple(conv.weight.shape):
            mask = mask.reshape(conv.weight.shape[0], -1)
        bias = None if conv.bias is None else conv.bias.detach()
        return cls.from_qtensor(qtensor, bias, mask, layout, n, m, in_channels=conv.in_channels,
                                kernel_size=conv.kernel_size, stride=conv.stride, padding=conv.padding,
                                dilation=conv.dilation, groups=conv.groups, padding_mode=conv.padding_mode,
                                cache_weight=cache_weight)

    @classmethod
    def from_qtensor(cls, qt: QTensor, bias: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                     layout: str = "bitmask", n: int | None = None, m: int | None = None, *, in_channels: int,
                     kernel_size, stride=1, padding=0, dilation=1, groups: int = 1, padding_mode: str = "zeros",
                     cache_weight: bool = False) -> "SparseQuantConv2d":
        """The codes of `qt` (the [out, in_channels/groups * kh * kw] matrix) where `mask`
        (bool, the same shape) stored in `layout` ("bitmask", "csr", or "nm" with n, m: at
        most n kept a group of m along a row). Codes outside the mask are dropped: those
        weights are zero. The inputs are never modified."""
        if not isinstance(qt, QTensor) or len(qt.shape) != 2:
            what = f"a QTensor of shape {tuple(qt.shape)}" if isinstance(qt, QTensor) else type(qt).__name__
            raise ValueError(f"SparseQuantConv2d.from_qtensor needs the 2-D [out, in/groups*kh*kw] QTensor "
                             f"(Target.weight_view() quantized), got {what}")
        check_grid(qt.spec, "SparseQuantConv2d", "QuantConv2d")
        mod = cls.__new__(cls)
        nn.Module.__init__(mod)
        out_channels = int(qt.shape[0])
        mod._set_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode)
        if tuple(int(s) for s in qt.shape) != tuple(mod._matrix_shape):
            raise ValueError(f"SparseQuantConv2d: QTensor of shape {tuple(qt.shape)} does not match the conv: "
                             f"expected the [out, in/groups*kh*kw] matrix {list(mod._matrix_shape)}")
        pattern, kept, cpu = encode_codes("SparseQuantConv2d", qt, mask, layout, n, m)
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or not bias.is_floating_point() or \
                    tuple(bias.shape) != (out_channels,):
                got = f"{tuple(bias.shape)} {bias.dtype}" if isinstance(bias, torch.Tensor) else type(bias).__name__
                raise ValueError(f"SparseQuantConv2d: bias must be a float tensor of shape ({out_channels},), "
                                 f"got {got}")
            bias = bias.detach().clone()
        mod._set_pattern(pattern)
        mod._setup(qt.spec, qt.dtype, kept, clone(cpu.scale), clone(cpu.zero_point), bias, cache_weight)
        return mod

    def dense_codes(self) -> QuantConv2d:
        """The same codes stored dense (the zero code where pruned), as a QuantConv2d: forward equal."""
        return QuantConv2d.from_qtensor(
            self.to_qtensor(), None if self.bias is None else self.bias.detach(), in_channels=self.in_channels,
            kernel_size=self.kernel_size, stride=self.stride, padding=self.padding, dilation=self.dilation,
            groups=self.groups, padding_mode=self.padding_mode)
