"""QTensor: quantized codes with their typed metadata, and what they cost to store."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from shrink.formats import CodebookFormat, FloatFormat, IntFormat, packed_nbytes, unpack_bits
from shrink.quant.blocks import BlockLayout, layout_for
from shrink.quant.core import decode
from shrink.quant.spec import QuantSpec


@dataclass(frozen=True, eq=False)
class QTensor:
    """A quantized tensor.

    data        codes densely bit-packed into uint8 (formats of 1..8 bits), or the
                raw 16/32-bit patterns for fp16/bf16/fp32, in block order
                (channel axis first, then the rest, row-major)
    shape       the original shape; dtype the original float dtype
    spec        how it was quantized; grid the resolved format (holds a codebook)
    scale       per block, shaped () / (C,) / (C, G); None for unscaled formats
    zero_point  same shape as scale for asymmetric int; else None
    """

    data: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    spec: QuantSpec
    grid: IntFormat | FloatFormat | CodebookFormat
    scale: torch.Tensor | None
    zero_point: torch.Tensor | None

    @property
    def layout(self) -> BlockLayout:
        return layout_for(self.shape, self.spec)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n

    def stored_codes(self) -> torch.Tensor:
        """Codes in block order, flat: unsigned (as packed) or raw float bit patterns."""
        if self.grid.bits <= 8:
            return unpack_bits(self.data, self.grid.bits, self.numel)
        return self.data

    def _codes_in_blocks(self) -> torch.Tensor:
        lay = self.layout
        stored = self.stored_codes()
        if isinstance(self.grid, IntFormat):
            stored = self.grid.from_unsigned(stored)
        flat = stored.reshape(lay.rows, lay.inner)
        pad = lay.groups * lay.group_size - lay.inner
        if pad:
            flat = torch.nn.functional.pad(flat.to(torch.int32), (0, pad)).to(stored.dtype)
        return flat.reshape(lay.rows, lay.groups, lay.group_size)

    def int_codes(self) -> torch.Tensor:
        """Integer codes in the original shape, unpacked, in the spec's range:
        signed for symmetric int, 0..2^b-1 for asymmetric int, table indices for
        NF4/codebooks, bit patterns (as integers) for float formats."""
        lay = self.layout
        stored = self.stored_codes()
        if isinstance(self.grid, IntFormat):
            codes = self.grid.from_unsigned(stored)
        else:
            codes = stored.to(torch.int32)
        return lay.from_blocks(codes.reshape(lay.rows, lay.inner)).contiguous()

    def dequantize(self) -> torch.Tensor:
        lay = self.layout
        scale = None if self.scale is None else lay.params_as_blocks(self.scale, "scale")
        zp = None if self.zero_point is None else lay.params_as_blocks(self.zero_point, "zero_point")
        codes = self._codes_in_blocks()  # unpacked on the CPU; decoded where the scales live (a GPU's)
        if scale is not None and codes.device != scale.device:
            codes = codes.to(scale.device)
        values = decode(codes, scale, zp, self.grid)
        return lay.from_blocks(values).to(self.dtype).contiguous()

    @property
    def nbytes(self) -> int:
        """Stored bytes: densely packed codes + scales + zero-points (+ a codebook table)."""
        if self.grid.bits <= 8:
            total = packed_nbytes(self.numel, self.grid.bits)
        else:
            total = self.data.numel() * self.data.element_size()
        for p in (self.scale, self.zero_point):
            if p is not None:
                total += p.numel() * p.element_size()
        if isinstance(self.grid, CodebookFormat):
            total += self.grid.table_nbytes
        return total

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.numel if self.numel else 0.0

    def __repr__(self) -> str:
        return (
            f"QTensor(shape={tuple(self.shape)}, format={_format_name(self.spec)}, "
            f"granularity={self.spec.granularity}, nbytes={self.nbytes})"
        )


def _format_name(spec: QuantSpec) -> str:
    return f"int{spec.bits}" if spec.format == "int" else spec.format
