"""Storage, views and state_dict plumbing shared by SparseLinear and SparseConv2d.

A sparse layer keeps a shrink.formats.sparse stored weight as module state: the
values as an nn.Parameter `values` (trainable; the pattern is not) and the pattern
as persistent integer buffers named as the dataclass names them.
"""
from __future__ import annotations

import torch
from torch import nn

from shrink.formats.pack import pack_bits
from shrink.formats.sparse import (
    LAYOUTS, BitmaskWeight, CSRWeight, NMWeight, check_nm, col_index_dtype, dense_from_bitmask, dense_from_csr,
    dense_from_nm, nm_index_bits, row_ptr_dtype,
)

INDEX_BUFFERS = {"bitmask": ("mask_bits",), "csr": ("col_indices", "crow_indices"), "nm": ("positions",)}


class SparseBase(nn.Module):
    """Storage, views and state_dict plumbing shared by SparseLinear and SparseConv2d.
    Subclasses set in_features/out_features (the stored [out, in] matrix) and bias."""

    def _setup_storage(self, stored, bias: torch.Tensor | None) -> None:
        self.layout = stored.layout
        self.n, self.m = (stored.n, stored.m) if stored.layout == "nm" else (None, None)
        tensors = stored.tensors()
        self.values = nn.Parameter(tensors.pop("values"))
        for name, t in tensors.items():
            self.register_buffer(name, t)
        self.register_parameter("bias", None if bias is None else nn.Parameter(bias))

    def _matrix(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    # ------------------------------------------------------------ views

    def stored(self):
        """The storage as a checked shrink.formats.sparse dataclass (values detached)."""
        values = self.values.detach()
        idx = {name: self._buffers[name] for name in INDEX_BUFFERS[self.layout]}
        if self.layout == "bitmask":
            return BitmaskWeight(self._matrix(), values, **idx)
        if self.layout == "csr":
            return CSRWeight(self._matrix(), values, **idx)
        return NMWeight(self._matrix(), self.n, self.m, values, **idx)

    def _dense(self, values: torch.Tensor) -> torch.Tensor:
        shape = self._matrix()
        if self.layout == "bitmask":
            return dense_from_bitmask(values, self.mask_bits, shape)
        if self.layout == "csr":
            return dense_from_csr(values, self.col_indices, self.crow_indices, shape)
        return dense_from_nm(values, self.positions, shape, self.n, self.m)

    def dense_weight(self) -> torch.Tensor:
        """The equivalent dense [out, in] matrix (zeros where pruned), values' dtype, detached."""
        return self._dense(self.values.detach())

    def mask(self) -> torch.Tensor:
        """bool [out, in]: the positions that have stored values (the fixed pattern)."""
        return self._dense(torch.ones_like(self.values, dtype=torch.bool))

    @property
    def nnz(self) -> int:
        """Stored values (for nm every slot, padding included)."""
        return self.values.numel()

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / (self.out_features * self.in_features)

    @property
    def nbytes(self) -> int:
        """Stored bytes: values, pattern and bias."""
        tensors = [self.values, *(self._buffers[n] for n in INDEX_BUFFERS[self.layout])]
        if self.bias is not None:
            tensors.append(self.bias)
        return sum(t.numel() * t.element_size() for t in tensors)

    # ------------------------------------------------------------ nn.Module plumbing

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        n_errors = len(error_msgs)
        for name in INDEX_BUFFERS[self.layout]:
            mine, theirs = self._buffers[name], state_dict.get(prefix + name)
            if isinstance(theirs, torch.Tensor) and theirs.dtype != mine.dtype:
                error_msgs.append(f"{prefix}{name} is stored as {theirs.dtype} but this {type(self).__name__} "
                                  f"({self.layout}, nnz={self.nnz}) keeps {mine.dtype}; casting would change the pattern")
        if len(error_msgs) > n_errors:
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if len(error_msgs) == n_errors:
            try:
                self.stored()
            except ValueError as e:
                error_msgs.append(f"{prefix or type(self).__name__}: the loaded sparse storage is invalid: {e}")


def placeholder_stored(layout: str, shape: tuple[int, int], nnz: int, dtype: torch.dtype,
                       n: int | None = None, m: int | None = None):
    """A valid stored weight of the given sizes (zero values, the first positions kept), for a
    shell that load_state_dict fills. Built directly: no dense [out, in] tensor."""
    out_f, in_f = shape
    numel = out_f * in_f
    if isinstance(nnz, bool) or not isinstance(nnz, int) or not 0 <= nnz <= numel:
        raise ValueError(f"nnz must be an integer in 0..{numel} for a [{out_f}, {in_f}] weight, got {nnz!r}")
    if layout == "bitmask":
        bits = torch.zeros(-(-numel // 8), dtype=torch.uint8)
        bits[: nnz // 8] = 255
        if nnz % 8:
            bits[nnz // 8] = (1 << (nnz % 8)) - 1
        return BitmaskWeight(shape, torch.zeros(nnz, dtype=dtype), bits)
    if layout == "csr":
        crow = torch.clamp(torch.arange(out_f + 1) * in_f, max=nnz).to(row_ptr_dtype(nnz))
        cols = (torch.arange(nnz) % in_f).to(col_index_dtype(in_f))
        return CSRWeight(shape, torch.zeros(nnz, dtype=dtype), cols, crow)
    if layout == "nm":
        check_nm(n, m, in_f, "nm")
        slots = out_f * (in_f // m) * n
        if nnz != slots:
            raise ValueError(f"nnz={nnz} does not match {n}:{m} on [{out_f}, {in_f}], which stores "
                             f"out * in / m * n = {slots} values")
        pos = torch.arange(n, dtype=torch.uint8).repeat(slots // n)
        return NMWeight(shape, n, m, torch.zeros(out_f, in_f // m * n, dtype=dtype),
                        pack_bits(pos, nm_index_bits(m)))
    raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
