"""Sparse storage of a pruned [out, in] weight, with exact byte counts.

Three layouts, each a frozen dataclass of the tensors it stores plus the dense shape:

  bitmask  `mask_bits`: one bit per position of the dense matrix, row-major, packed
           least-significant first (shrink.formats.pack, 1-bit); `values`: the kept
           values in row-major order.
  csr      `values` in row-major order, `col_indices` (int16 when in_features <= 32768,
           else int32: the smallest that holds every column), `crow_indices`
           [out + 1] row pointers (int32 when nnz < 2^31, else int64).
  nm       N:M semi-structured: every group of m consecutive columns of a row stores
           exactly n slots. `values` [out, in/m*n]; `positions`: each slot's column within
           its group, ascending, packed at ceil(log2 m) bits. A group with fewer than n
           kept values is padded with zero-valued slots at its lowest free columns.

`encode_sparse(weight, mask, layout)` builds one; `.decode()` gives back the exact
dense tensor (weight where mask, +0.0 elsewhere; bit-exact, -0.0 and NaN included).
`.nbytes` is the sum of the stored tensors' bytes; `sparse_nbytes` computes the
same from (shape, nnz) alone. Constructing a dataclass checks every length, dtype
and index (readers of stored buffers must not crash on a corrupted file), so
`decode` never reads out of bounds. The `dense_from_*` functions are the unchecked,
device-agnostic, differentiable (w.r.t. values) decoders that modules run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from shrink.formats.pack import pack_bits, packed_nbytes, unpack_bits

LAYOUTS = ("bitmask", "csr", "nm")
_INT16_MAX, _INT32_MAX = 2**15 - 1, 2**31 - 1


# ----------------------------------------------------------------------------- sizes

def col_index_dtype(in_features: int) -> torch.dtype:
    """The smallest integer dtype that holds every column index 0..in_features-1."""
    return torch.int16 if in_features - 1 <= _INT16_MAX else torch.int32


def row_ptr_dtype(nnz: int) -> torch.dtype:
    """The smallest dtype torch's CSR takes for row pointers 0..nnz."""
    return torch.int32 if nnz <= _INT32_MAX else torch.int64


def nm_index_bits(m: int) -> int:
    """Bits per stored position within a group of m: ceil(log2 m)."""
    return max(1, math.ceil(math.log2(m)))


def sparse_nbytes(layout: str, shape, nnz: int, value_bytes: int, n: int | None = None,
                  m: int | None = None) -> int:
    """Stored bytes of a [out, in] weight with `nnz` kept values in `layout`
    ("dense", "bitmask", "csr" or "nm"), without building it; equal to `.nbytes`
    of what encode_sparse returns. For "nm" the count is fixed by (shape, n, m):
    every group stores n slots, so nnz only has to fit."""
    out_f, in_f = _check_shape(shape, "sparse_nbytes")
    numel = out_f * in_f
    if isinstance(nnz, bool) or not isinstance(nnz, int) or not 0 <= nnz <= numel:
        raise ValueError(f"sparse_nbytes: nnz must be an integer in 0..{numel} for shape {(out_f, in_f)}, got {nnz!r}")
    if isinstance(value_bytes, bool) or not isinstance(value_bytes, int) or value_bytes < 1:
        raise ValueError(f"sparse_nbytes: value_bytes must be a positive integer, got {value_bytes!r}")
    if layout == "dense":
        return numel * value_bytes
    if layout == "bitmask":
        return packed_nbytes(numel, 1) + nnz * value_bytes
    if layout == "csr":
        col = _itemsize(col_index_dtype(in_f))
        return nnz * (value_bytes + col) + (out_f + 1) * _itemsize(row_ptr_dtype(nnz))
    if layout == "nm":
        check_nm(n, m, in_f, "sparse_nbytes")
        slots = out_f * (in_f // m) * n
        if nnz > slots:
            raise ValueError(f"sparse_nbytes: nnz={nnz} exceeds the {slots} slots of {n}:{m} on shape {(out_f, in_f)}")
        return slots * value_bytes + packed_nbytes(slots, nm_index_bits(m))
    raise ValueError(f"sparse_nbytes: layout must be 'dense' or one of {', '.join(LAYOUTS)}, got {layout!r}")


def best_layout(shape, nnz: int, value_bytes: int) -> str:
    """The smallest of "dense", "bitmask" and "csr" for this (shape, nnz); dense on a tie."""
    sizes = {lay: sparse_nbytes(lay, shape, nnz, value_bytes) for lay in ("dense", "bitmask", "csr")}
    return min(sizes, key=lambda lay: (sizes[lay], lay != "dense"))


# ----------------------------------------------------------------------------- stored forms

class _Stored:
    layout: ClassVar[str]
    shape: tuple[int, int]
    values: torch.Tensor

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name (values first): what a module keeps as buffers."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def nnz(self) -> int:
        """Stored values (for nm: every slot, padding included)."""
        return self.values.numel()

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype


@dataclass(frozen=True, eq=False)
class BitmaskWeight(_Stored):
    shape: tuple[int, int]
    values: torch.Tensor      # [nnz], the kept values row-major
    mask_bits: torch.Tensor   # uint8 [ceil(out*in/8)]
    layout: ClassVar[str] = "bitmask"

    def __post_init__(self):
        out_f, in_f = _check_shape(self.shape, "bitmask")
        _check_values(self.values, "bitmask", None)
        need = packed_nbytes(out_f * in_f, 1)
        _check_index(self.mask_bits, "bitmask", "mask_bits", (torch.uint8,), need)
        tail = out_f * in_f % 8
        if tail and int(self.mask_bits[-1]) >> tail:
            raise ValueError(f"bitmask: mask_bits has bits set past the last of {out_f * in_f} positions")
        kept = int(unpack_mask(self.mask_bits, out_f * in_f).sum())
        if kept != self.values.numel():
            raise ValueError(f"bitmask: mask_bits sets {kept} positions but values holds {self.values.numel()}")

    def tensors(self):
        return {"values": self.values, "mask_bits": self.mask_bits}

    def mask(self) -> torch.Tensor:
        return unpack_mask(self.mask_bits, self.shape[0] * self.shape[1]).view(self.shape)

    def decode(self) -> torch.Tensor:
        return dense_from_bitmask(self.values, self.mask_bits, self.shape)


@dataclass(frozen=True, eq=False)
class CSRWeight(_Stored):
    shape: tuple[int, int]
    values: torch.Tensor        # [nnz], row-major
    col_indices: torch.Tensor   # [nnz] int16 / int32
    crow_indices: torch.Tensor  # [out + 1] int32 / int64
    layout: ClassVar[str] = "csr"

    def __post_init__(self):
        out_f, in_f = _check_shape(self.shape, "csr")
        _check_values(self.values, "csr", None)
        nnz = self.values.numel()
        _check_index(self.col_indices, "csr", "col_indices", (col_index_dtype(in_f),), nnz)
        _check_index(self.crow_indices, "csr", "crow_indices", (row_ptr_dtype(nnz),), out_f + 1)
        crow = self.crow_indices.long().cpu()
        if int(crow[0]) != 0 or int(crow[-1]) != nnz:
            raise ValueError(f"csr: crow_indices must run from 0 to nnz={nnz}, got {int(crow[0])}..{int(crow[-1])}")
        counts = crow.diff()
        if bool((counts < 0).any()):
            row = int((counts < 0).nonzero()[0])
            raise ValueError(f"csr: crow_indices decrease at row {row}")
        cols = self.col_indices.long().cpu()
        if nnz and (int(cols.min()) < 0 or int(cols.max()) >= in_f):
            raise ValueError(f"csr: col_indices must lie in 0..{in_f - 1}, got {int(cols.min())}..{int(cols.max())}")
        rows = torch.repeat_interleave(torch.arange(out_f), counts)
        bad = (rows[1:] == rows[:-1]) & (cols[1:] <= cols[:-1])
        if bool(bad.any()):
            i = int(bad.nonzero()[0]) + 1
            raise ValueError(f"csr: col_indices of row {int(rows[i])} are not strictly increasing (entry {i})")

    def tensors(self):
        return {"values": self.values, "col_indices": self.col_indices, "crow_indices": self.crow_indices}

    def mask(self) -> torch.Tensor:
        return dense_from_csr(torch.ones_like(self.values, dtype=torch.bool), self.col_indices,
                              self.crow_indices, self.shape)

    def decode(self) -> torch.Tensor:
        return dense_from_csr(self.values, self.col_indices, self.crow_indices, self.shape)


@dataclass(frozen=True, eq=False)
class NMWeight(_Stored):
    shape: tuple[int, int]
    n: int
    m: int
    values: torch.Tensor     # [out, in/m*n]
    positions: torch.Tensor  # uint8, out*in/m*n codes of ceil(log2 m) bits
    layout: ClassVar[str] = "nm"

    def __post_init__(self):
        out_f, in_f = _check_shape(self.shape, "nm")
        check_nm(self.n, self.m, in_f, "nm")
        _check_values(self.values, "nm", (out_f, in_f // self.m * self.n))
        slots = self.values.numel()
        _check_index(self.positions, "nm", "positions", (torch.uint8,), packed_nbytes(slots, nm_index_bits(self.m)))
        pos = unpack_positions(self.positions, self.m, slots).long().view(out_f, in_f // self.m, self.n)
        if slots and int(pos.max()) >= self.m:
            r, g, _ = (int(i) for i in (pos >= self.m).nonzero()[0])
            raise ValueError(f"nm: row {r}, group {g} stores a position >= m={self.m}")
        bad = pos[..., 1:] <= pos[..., :-1]
        if bool(bad.any()):
            r, g, _ = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"nm: row {r}, group {g} has positions {pos[r, g].tolist()}, not strictly increasing")

    def tensors(self):
        return {"values": self.values, "positions": self.positions}

    def mask(self) -> torch.Tensor:
        """The stored slots (n per group, zero-valued padding included)."""
        return dense_from_nm(torch.ones_like(self.values, dtype=torch.bool), self.positions, self.shape, self.n, self.m)

    def decode(self) -> torch.Tensor:
        return dense_from_nm(self.values, self.positions, self.shape, self.n, self.m)


SparseWeight = BitmaskWeight | CSRWeight | NMWeight


# ----------------------------------------------------------------------------- encode

def encode_sparse(weight: torch.Tensor, mask: torch.Tensor | None = None, layout: str = "bitmask", *,
                  n: int | None = None, m: int | None = None) -> SparseWeight:
    """Store `weight` [out, in] where `mask` (bool, same shape; default weight != 0) in `layout`.
    The inputs are never modified; the stored tensors are new."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        what = f"{tuple(weight.shape)} {weight.dtype}" if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"encode_sparse: weight must be a 2-D floating-point [out, in] tensor, got {what}")
    out_f, in_f = _check_shape(tuple(weight.shape), "encode_sparse")
    w = weight.detach()
    if mask is None:
        mask = w != 0
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (out_f, in_f):
        what = f"{tuple(mask.shape)} {mask.dtype}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"encode_sparse: mask must be a bool tensor of the weight's shape {(out_f, in_f)}, got {what}")
    mask = mask.to(w.device)
    if layout == "bitmask":
        bits = pack_bits(mask.reshape(-1).to(torch.uint8), 1).to(w.device)
        return BitmaskWeight((out_f, in_f), w[mask].clone(), bits)
    if layout == "csr":
        rows, cols = mask.nonzero(as_tuple=True)
        nnz = rows.numel()
        crow = torch.zeros(out_f + 1, dtype=torch.int64, device=w.device)
        crow[1:] = torch.bincount(rows, minlength=out_f).cumsum(0)
        return CSRWeight((out_f, in_f), w[rows, cols].clone(), cols.to(col_index_dtype(in_f)),
                         crow.to(row_ptr_dtype(nnz)))
    if layout == "nm":
        check_nm(n, m, in_f, "encode_sparse")
        groups = in_f // m
        mg = mask.view(out_f, groups, m)
        counts = mg.sum(-1)
        if bool((counts > n).any()):
            r, g = (int(i) for i in (counts > n).nonzero()[0])
            raise ValueError(f"encode_sparse: the mask is not {n}:{m}: row {r}, columns {g * m}..{g * m + m - 1} "
                             f"keep {int(counts[r, g])} values (at most {n} per group of {m})")
        # kept columns first, then the lowest free ones as padding; each group's n slots ascending
        key = (~mg).to(torch.int32) * m + torch.arange(m, dtype=torch.int32, device=w.device)
        pos = key.argsort(dim=-1, stable=True)[..., :n].sort(dim=-1).values
        # gather/where on the bit patterns: torch's fp16/bf16 gather rewrites NaN payloads
        vals = _as_bits(w).view(out_f, groups, m).gather(-1, pos)
        vals = torch.where(mg.gather(-1, pos), vals, torch.zeros((), dtype=vals.dtype, device=w.device))
        packed = pack_bits(pos.reshape(-1), nm_index_bits(m)).to(w.device)
        return NMWeight((out_f, in_f), n, m, vals.reshape(out_f, groups * n).view(w.dtype).contiguous(), packed)
    raise ValueError(f"encode_sparse: layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")


def decode_sparse(stored: SparseWeight) -> torch.Tensor:
    """The dense [out, in] tensor of a stored weight (values' dtype and device)."""
    if not isinstance(stored, (BitmaskWeight, CSRWeight, NMWeight)):
        raise ValueError(f"decode_sparse: expected a BitmaskWeight, CSRWeight or NMWeight, got {type(stored).__name__}")
    return stored.decode()


# ----------------------------------------------------------------------------- unchecked decoders

def unpack_mask(mask_bits: torch.Tensor, count: int) -> torch.Tensor:
    """1-bit packed mask -> bool [count], on mask_bits' device (numpy's C unpacker on the CPU)."""
    if mask_bits.device.type == "cpu":
        arr = np.unpackbits(mask_bits.numpy(), count=count, bitorder="little").view(np.bool_)
        return torch.from_numpy(arr)
    return _unpack_pow2(mask_bits, 1, count).bool()


def unpack_positions(positions: torch.Tensor, m: int, count: int) -> torch.Tensor:
    """N:M positions -> uint8 [count], on positions' device."""
    bits = nm_index_bits(m)
    if positions.device.type != "cpu" and 8 % bits == 0:
        return _unpack_pow2(positions, bits, count)
    return unpack_bits(positions.cpu(), bits, count).to(positions.device)


def dense_from_bitmask(values: torch.Tensor, mask_bits: torch.Tensor, shape) -> torch.Tensor:
    numel = shape[0] * shape[1]
    mask = unpack_mask(mask_bits, numel).to(values.device)
    dense = values.new_zeros(numel)
    if values.requires_grad and torch.is_grad_enabled():
        return dense.masked_scatter(mask, values).view(shape)
    return dense.masked_scatter_(mask, values).view(shape)  # in place: ~1.5x faster, no autograd record


def dense_from_csr(values: torch.Tensor, col_indices: torch.Tensor, crow_indices: torch.Tensor,
                   shape) -> torch.Tensor:
    out_f = shape[0]
    rows = torch.repeat_interleave(torch.arange(out_f, device=values.device), crow_indices.diff().long())
    dense = values.new_zeros(shape)
    return dense.index_put((rows, col_indices.long()), values)


def dense_from_nm(values: torch.Tensor, positions: torch.Tensor, shape, n: int, m: int) -> torch.Tensor:
    out_f, in_f = shape
    groups = in_f // m
    pos = unpack_positions(positions, m, values.numel()).long().view(out_f, groups, n).to(values.device)
    src = values.reshape(out_f, groups, n)
    if not (values.requires_grad and torch.is_grad_enabled()) and values.is_floating_point():
        # on the bit patterns: torch's fp16/bf16 scatter rewrites NaN payloads
        dense = _as_bits(values).new_zeros((out_f, groups, m))
        return dense.scatter_(-1, pos, _as_bits(src)).view(values.dtype).view(out_f, in_f)
    return values.new_zeros((out_f, groups, m)).scatter(-1, pos, src).view(out_f, in_f)


# ----------------------------------------------------------------------------- checks

def _unpack_pow2(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    return ((packed[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)[:count]


def _as_bits(t: torch.Tensor) -> torch.Tensor:
    """A float tensor's bit patterns as a same-width integer view."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _check_shape(shape, where: str) -> tuple[int, int]:
    ok = isinstance(shape, (tuple, list, torch.Size)) and len(shape) == 2 and all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape)
    if not ok:
        raise ValueError(f"{where}: shape must be two positive integers [out, in], got {shape!r}")
    return int(shape[0]), int(shape[1])


def check_nm(n, m, in_f: int, where: str) -> None:
    """ValueError unless 1 <= n <= m, 2 <= m <= 256 and m divides in_f."""
    for name, v in (("n", n), ("m", m)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{where}: the nm layout needs positive integers n and m, got {name}={v!r}")
    if not 2 <= m <= 256 or n > m:
        raise ValueError(f"{where}: N:M needs 1 <= n <= m and 2 <= m <= 256, got n={n}, m={m}")
    if in_f % m:
        raise ValueError(f"{where}: in_features {in_f} is not a multiple of m={m}; "
                         f"{n}:{m} groups run along each row")


def _check_values(values, where: str, shape) -> None:
    if not isinstance(values, torch.Tensor) or not values.is_floating_point():
        what = values.dtype if isinstance(values, torch.Tensor) else type(values).__name__
        raise ValueError(f"{where}: values must be a floating-point tensor, got {what}")
    want = shape if shape is not None else (values.numel(),)
    if tuple(values.shape) != tuple(want):
        raise ValueError(f"{where}: values must have shape {tuple(want)}, got {tuple(values.shape)}")


def _check_index(t, where: str, name: str, dtypes, length: int) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype not in dtypes or t.dim() != 1 or t.numel() != length:
        what = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
        want = "/".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{where}: {name} must be a 1-D {want} tensor of {length} elements, got {what}")
