"""SparseQuantLinear: a pruned Linear whose kept weights are stored as integer codes.

A QuantLinear that keeps its layer's sparsity pattern: the integer codes of the kept
weights only (bit-packed at the spec's width, shrink.formats.pack), the pattern as
shrink.formats.sparse stores it (a bitmask, CSR indices, or N:M positions), and the
scales and zero-points of the dense [out, in] grid. Persistent buffers:

  codes      uint8, the kept codes packed (unsigned, as a QTensor packs them), in the
             pattern's order: row-major for bitmask / CSR, slot order for N:M
  scales, zeros   as QuantLinear stores them (per group of the dense row)
  mask_bits | col_indices + crow_indices | positions   the pattern (formats/sparse.py)

Bytes (`nbytes`, no bias, as QuantLinear counts): packed kept codes + pattern + scales
+ zero-points. At 50% unstructured sparsity, int4 g128: 0.25 (codes) + 0.125 (bitmask)
+ 0.031 (fp16 scale and zero-point per 128) = 0.406 bytes a weight, against 0.531 for
the dense int4 codes; 2:4 + int4: 0.25 + 0.25 (2-bit positions) + 0.031.

Pruned weights dequantize to exactly +0.0: every position outside the pattern (and an
N:M padding slot) takes the code that decodes to zero (0 symmetric, the zero-point
asymmetric), and the reference path multiplies by nothing there (torch.where).
The packed kernels (int4pack/int8pack/dequant_cuda) take dense codes: those are rebuilt
once from the sparse storage when the module is built, loaded or moved (`_prepare`),
and run by QuantLinear's own kernels, so forward equals a QuantLinear holding the same
dense codes (zero codes where pruned) - bit for bit on every path.

Only integer grids (format "int", 1-8 bits) are stored this way; other formats have no
zero code under every scale, and stay dense QuantLinear (recipe/install.py says why).
"""
from __future__ import annotations

import torch
from torch import nn

from shrink.modules._packed import placeholder_storage
from shrink.modules._sparse_codes import (
    SparseCodes, check_grid, clone, encode_codes, shell_codes, sparse_codes_layout, sparse_codes_nbytes,
)
from shrink.modules.quant_linear import QuantLinear, _check_dims
from shrink.quant import QTensor, QuantSpec

__all__ = ["SparseQuantLinear", "sparse_codes_layout", "sparse_codes_nbytes"]


class SparseQuantLinear(SparseCodes, QuantLinear):
    """y = x @ (dequantize(codes) * mask).T + bias, with only the kept codes stored.

    Build one with `from_qtensor` (a dense QTensor and the pruning mask). The constructor
    makes a shell of the right sizes for load_state_dict to fill. The pattern's views and
    checks are SparseCodes' (modules/_sparse_codes.py), shared with SparseQuantConv2d.
    """

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, layout: str, nnz: int,
                 bias: bool = True, n: int | None = None, m: int | None = None, *,
                 weight_dtype: torch.dtype = torch.float32, kernel: str = "auto", cache_weight: bool = False):
        nn.Module.__init__(self)
        _check_dims(in_features, out_features)
        if not isinstance(spec, QuantSpec):
            raise TypeError(f"SparseQuantLinear: spec must be a QuantSpec, got {type(spec).__name__}")
        check_grid(spec, "SparseQuantLinear", "QuantLinear")
        pattern, codes = shell_codes("SparseQuantLinear", spec, layout, (out_features, in_features), nnz, n, m)
        _, scales, zeros = placeholder_storage(torch.Size((out_features, in_features)), spec)
        b = torch.zeros(out_features, dtype=weight_dtype) if bias else None
        self._set_pattern(pattern)
        self._setup(in_features, out_features, spec, weight_dtype, codes, scales, zeros, b, kernel, cache_weight)

    @classmethod
    def from_qtensor(cls, qt: QTensor, bias: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                     layout: str = "bitmask", n: int | None = None, m: int | None = None, *,
                     kernel: str = "auto", cache_weight: bool = False) -> "SparseQuantLinear":
        """The codes of `qt` [out, in] where `mask` (bool [out, in]) stored in `layout`
        ("bitmask", "csr", or "nm" with n, m: at most n kept a group of m). Codes outside
        the mask are dropped: those weights are zero. The inputs are never modified."""
        if not isinstance(qt, QTensor) or len(qt.shape) != 2:
            what = f"a QTensor of shape {tuple(qt.shape)}" if isinstance(qt, QTensor) else type(qt).__name__
            raise ValueError(f"SparseQuantLinear.from_qtensor needs a 2-D [out, in] QTensor, got {what}")
        check_grid(qt.spec, "SparseQuantLinear", "QuantLinear")
        shape = (int(qt.shape[0]), int(qt.shape[1]))
        pattern, kept, cpu = encode_codes("SparseQuantLinear", qt, mask, layout, n, m)
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or not bias.is_floating_point() or tuple(bias.shape) != shape[:1]:
                raise ValueError(f"SparseQuantLinear: bias must be a float tensor of shape ({shape[0]},)")
            bias = bias.detach().clone()
        mod = cls.__new__(cls)
        nn.Module.__init__(mod)
        mod._set_pattern(pattern)
        mod._setup(shape[1], shape[0], qt.spec, qt.dtype, kept, clone(cpu.scale), clone(cpu.zero_point),
                   bias, kernel, cache_weight)
        return mod

    def dense_codes(self) -> QuantLinear:
        """The same codes stored dense (the zero code where pruned), as a QuantLinear: forward equal."""
        return QuantLinear.from_qtensor(self.to_qtensor(), None if self.bias is None else self.bias.detach())
