"""Sparse integer codes: what SparseQuantLinear and SparseQuantConv2d share.

A quantized layer that an earlier step pruned keeps the integer codes of its kept weights
only (bit-packed at the spec's width, shrink.formats.pack) and the pattern of its [out, in]
weight matrix as shrink.formats.sparse stores it (a bitmask, CSR indices, or N:M positions);
the scales and zero-points stay those of the dense grid. `SparseCodes` is the part of such
a module that knows the pattern; it sits before QuantLinear / QuantConv2d in the bases and
overrides only the views of the weight (to_qtensor, _dequantize, nbytes) and the pattern
checks of load_state_dict, so the parent's forward runs on the rebuilt dense codes.

Pruned weights dequantize to exactly +0.0: every position outside the pattern (and an N:M
padding slot) takes the code that decodes to zero (0 symmetric, the zero-point asymmetric),
and the dequantized weight is multiplied by nothing there (torch.where).
"""
from __future__ import annotations

import torch

from shrink.formats import IntFormat
from shrink.formats.pack import pack_bits, packed_nbytes, unpack_bits
from shrink.formats.sparse import (
    BitmaskWeight, CSRWeight, NMWeight, dense_from_bitmask, dense_from_csr, dense_from_nm, encode_sparse,
    sparse_nbytes,
)
from shrink.modules._sparse import INDEX_BUFFERS, placeholder_stored
from shrink.quant import QTensor, QuantSpec
from shrink.quant.blocks import layout_for


def sparse_codes_nbytes(layout: str, shape, nnz: int, bits: int, n: int | None = None,
                        m: int | None = None) -> int:
    """Bytes of the codes and pattern of a [out, in] weight with `nnz` kept weights of
    `bits` bits in `layout` ("dense": every code, no pattern). N:M stores n slots a group."""
    out_f, in_f = int(shape[0]), int(shape[1])
    if layout == "dense":
        return packed_nbytes(out_f * in_f, bits)
    slots = out_f * (in_f // m) * n if layout == "nm" else nnz
    index = sparse_nbytes(layout, (out_f, in_f), nnz, 1, n, m) - slots   # the pattern's bytes alone
    return packed_nbytes(slots, bits) + index


def sparse_codes_layout(shape, nnz: int, bits: int, n: int | None = None, m: int | None = None) -> str:
    """The smallest storage of the codes: "nm" when the pattern is N:M (n, m given), else the
    smaller of "bitmask" and "csr"; "dense" where the pattern costs more than the codes it saves."""
    candidates = ["nm"] if n is not None and m is not None else ["bitmask", "csr"]
    sizes = {lay: sparse_codes_nbytes(lay, shape, nnz, bits, n, m) for lay in candidates}
    best = min(sizes, key=sizes.get)
    return best if sizes[best] < sparse_codes_nbytes("dense", shape, nnz, bits) else "dense"


def check_grid(spec: QuantSpec, owner: str, dense: str) -> None:
    """Only integer grids of 1-8 bits have a zero code under every scale."""
    if spec.format != "int" or not 1 <= spec.bits <= 8:
        raise ValueError(f"{owner} stores integer codes of 1-8 bits; format {spec.format} "
                         f"({spec.bits} bits) has no zero code under every scale: keep it a dense {dense}")


def shell_codes(owner: str, spec: QuantSpec, layout: str, shape: tuple[int, int], nnz: int,
                n: int | None, m: int | None):
    """(placeholder pattern, zero packed codes) of the given sizes, for a shell that
    load_state_dict fills."""
    try:
        pattern = placeholder_stored(layout, shape, nnz, torch.float32, n, m)
    except ValueError as e:
        raise ValueError(f"{owner}: {e}") from None
    return pattern, torch.zeros(packed_nbytes(pattern.nnz, spec.bits), dtype=torch.uint8)


def encode_codes(owner: str, qt: QTensor, mask, layout: str, n: int | None, m: int | None):
    """(pattern, packed kept codes uint8, qt's CPU copy) for a 2-D [out, in] QTensor `qt` and
    a bool [out, in] `mask`: the codes where mask, in the pattern's order (row-major for
    bitmask / CSR, slot order for N:M). The inputs are never modified."""
    shape = (int(qt.shape[0]), int(qt.shape[1]))
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != shape:
        what = f"{tuple(mask.shape)} {mask.dtype}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{owner}.from_qtensor: mask must be a bool tensor of shape {shape}, got {what}")
    mask = mask.cpu()
    cpu = QTensor(data=qt.data.cpu(), shape=qt.shape, dtype=qt.dtype, spec=qt.spec, grid=qt.grid,
                  scale=None if qt.scale is None else qt.scale.cpu(),
                  zero_point=None if qt.zero_point is None else qt.zero_point.cpu())
    codes = torch.where(mask, _dense_stored_codes(cpu), _zero_codes(cpu))   # uint8 [out, in]
    try:
        pattern = encode_sparse(codes.float(), mask, layout, n=n, m=m)   # codes < 256: exact in float32
        if layout == "nm":   # padding slots hold the zero code too: store every slot's own code
            pattern = encode_sparse(codes.float(), pattern.mask(), "nm", n=n, m=m)
    except ValueError as e:
        raise ValueError(f"{owner}.from_qtensor: {e}") from None
    return pattern, pack_bits(pattern.values.reshape(-1).to(torch.uint8), qt.spec.bits), cpu


class SparseCodes:
    """The pattern half of a sparse quantized layer. The host class (QuantLinear or
    QuantConv2d) provides out_features, in_features, spec, weight_dtype, _grid and the
    codes / scales / zeros buffers; `_set_pattern` must run before its `_setup`."""

    def _set_pattern(self, pattern) -> None:
        self.layout = pattern.layout
        self.n, self.m = (pattern.n, pattern.m) if pattern.layout == "nm" else (None, None)
        self._nnz = pattern.nnz
        for name, t in pattern.tensors().items():
            if name != "values":
                self.register_buffer(name, t.cpu())

    # ------------------------------------------------------------ the pattern

    def _pattern(self, tensors: dict | None = None):
        """The pattern as a checked formats.sparse dataclass (placeholder values)."""
        idx = {name: (tensors or self._buffers)[name] for name in INDEX_BUFFERS[self.layout]}
        shape = (self.out_features, self.in_features)
        if self.layout == "bitmask":
            return BitmaskWeight(shape, torch.zeros(self._nnz), **idx)
        if self.layout == "csr":
            return CSRWeight(shape, torch.zeros(self._nnz), **idx)
        return NMWeight(shape, self.n, self.m, torch.zeros(shape[0], shape[1] // self.m * self.n), **idx)

    def _scatter(self, values: torch.Tensor) -> torch.Tensor:
        """Stored-order values -> dense [out, in] (zeros elsewhere), on values' device."""
        shape = (self.out_features, self.in_features)
        if self.layout == "bitmask":
            return dense_from_bitmask(values, self.mask_bits.to(values.device), shape)
        if self.layout == "csr":
            return dense_from_csr(values, self.col_indices.to(values.device), self.crow_indices.to(values.device),
                                  shape)
        return dense_from_nm(values.reshape(shape[0], -1), self.positions, shape, self.n, self.m)

    def mask(self) -> torch.Tensor:
        """bool [out, in]: the stored positions (for N:M every slot, zero-coded padding included)."""
        return self._scatter(torch.ones(self._nnz, dtype=torch.bool, device=self.codes.device))

    @property
    def nnz(self) -> int:
        """Stored codes (for N:M every slot)."""
        return self._nnz

    @property
    def sparsity(self) -> float:
        return 1.0 - self._nnz / (self.out_features * self.in_features)

    # ------------------------------------------------------------ views of the weight

    def _cpu_qtensor(self) -> QTensor:
        """The dense [out, in] QTensor: kept codes where stored, the zero code elsewhere (CPU)."""
        shape = torch.Size((self.out_features, self.in_features))
        scale = None if self.scales is None else self.scales.cpu()
        zp = None if self.zeros is None else self.zeros.cpu()
        probe = QTensor(data=torch.zeros(0, dtype=torch.uint8), shape=shape, dtype=self.weight_dtype,
                        spec=self.spec, grid=self._grid, scale=scale, zero_point=zp)
        kept = unpack_bits(self.codes.cpu(), self.spec.bits, self._nnz)
        cpu_mask = self._scatter(torch.ones(self._nnz, dtype=torch.bool))
        dense = torch.where(cpu_mask, self._scatter(kept), _zero_codes(probe))
        lay = layout_for(shape, self.spec)
        order = dense.reshape(-1) if lay.axis == -1 else dense.movedim(lay.axis, 0).reshape(-1)
        return QTensor(data=pack_bits(order, self.spec.bits), shape=shape, dtype=self.weight_dtype,
                       spec=self.spec, grid=self._grid, scale=scale, zero_point=zp)

    def to_qtensor(self) -> QTensor:
        """The weight as a dense [out, in] QTensor (a new one: zero codes where pruned)."""
        return self._cpu_qtensor()

    def _dequantize(self, device: torch.device) -> torch.Tensor:
        """The dense [out, in] weight, exact +0.0 where pruned, on `device`."""
        w = self._cpu_qtensor().dequantize()
        w = torch.where(self._scatter(torch.ones(self._nnz, dtype=torch.bool)), w, torch.zeros((), dtype=w.dtype))
        return w.to(device)

    def dense_weight(self) -> torch.Tensor:
        """The effective dense [out, in] weight matrix (exact +0.0 where pruned), weight_dtype."""
        return self._dequantize(self.codes.device)

    @property
    def nbytes(self) -> int:
        """Stored bytes of the weight: kept codes + pattern + scales + zero-points (no bias)."""
        tensors = [self.codes, self.scales, self.zeros, *(self._buffers[n] for n in INDEX_BUFFERS[self.layout])]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def extra_repr(self) -> str:
        nm = f" {self.n}:{self.m}" if self.layout == "nm" else ""
        return super().extra_repr() + f", layout={self.layout}{nm}, nnz={self._nnz}, sparsity={self.sparsity:.3f}"

    # ------------------------------------------------------------ nn.Module plumbing

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        n_errors = len(error_msgs)
        owner = type(self).__name__
        theirs = {name: state_dict.get(prefix + name) for name in INDEX_BUFFERS[self.layout]}
        for name, t in theirs.items():
            mine = self._buffers[name]
            if isinstance(t, torch.Tensor) and t.dtype != mine.dtype:
                error_msgs.append(f"{prefix}{name} is stored as {t.dtype} but this {owner} ({self.layout}, "
                                  f"nnz={self._nnz}) keeps {mine.dtype}; casting would change the pattern")
        if len(error_msgs) > n_errors:
            return
        if all(isinstance(t, torch.Tensor) and t.device.type != "meta" for t in theirs.values()):
            try:   # checked before _prepare decodes it: a corrupt pattern must not index out of bounds
                self._pattern(theirs)
            except ValueError as e:
                error_msgs.append(f"{prefix or owner}: the loaded sparse pattern is invalid: {e}")
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def _dense_stored_codes(qt: QTensor) -> torch.Tensor:
    """The unsigned stored codes of a 2-D QTensor as uint8 [out, in]."""
    lay = qt.layout
    return lay.from_blocks(qt.stored_codes().reshape(lay.rows, lay.inner)).contiguous()


def _zero_codes(qt: QTensor) -> torch.Tensor:
    """uint8 [out, in]: at each position the stored code that dequantizes to exactly 0
    (symmetric: the code 0; asymmetric: its block's integer zero-point)."""
    grid = qt.grid
    assert isinstance(grid, IntFormat)
    shape = tuple(int(s) for s in qt.shape)
    if qt.zero_point is None:
        return torch.full(shape, -grid.qmin, dtype=torch.uint8)
    lay = qt.layout
    zp = lay.params_as_blocks(qt.zero_point.cpu(), "zero_point").to(torch.float32)
    zp = grid.to_unsigned(zp.round().to(torch.int32)).expand(lay.rows, lay.groups, lay.group_size)
    return lay.from_blocks(zp).contiguous()


def clone(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().clone()
