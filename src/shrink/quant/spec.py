"""QuantSpec: one frozen description of how a tensor is quantized.

Per-tensor, per-channel and per-group are one idea here (as torchao's
block_size): the tensor is viewed as [rows, groups, group_size] blocks and every
block gets one scale (and zero-point). The spec validates itself and names the
field at fault.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

import torch

from shrink.formats import FLOAT_FORMATS, NF4, CodebookFormat, Format, IntFormat

GRANULARITIES = ("tensor", "channel", "group")
FORMATS = ("int", "nf4", "fp8-e4m3", "fp8-e5m2", "fp16", "bf16", "fp32", "codebook")
_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Formats whose blocks carry a scale: integers, NF4 (absmax) and fp8 (absmax / max).
_SCALED = ("int", "nf4", "fp8-e4m3", "fp8-e5m2")


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize a tensor.

    bits         code width; for "int" 1..8 (default 8), implied by other formats
    symmetric    True: signed codes, no zero-point. False: unsigned codes 0..2^b-1
                 and an integer zero-point per block (int format only)
    granularity  "tensor" | "channel" | "group"
    group_size   elements per group along the non-channel axis ("group" only)
    axis         the channel axis (rows of an [out, in] weight)
    format       "int" | "nf4" | "fp8-e4m3" | "fp8-e5m2" | "fp16" | "bf16" | "fp32" | "codebook"
    full_range   symmetric int: use -2^(b-1) too (default restricted, zero exact)
    scale_dtype  how scales and zero-points are stored (fp16 by default)
    codebook     the table for format="codebook" (values, no scale)
    codebook_dtype  how that table is stored (fp32 by default, as Deep Compression)
    """

    bits: int | None = None
    symmetric: bool = True
    granularity: str = "channel"
    group_size: int | None = None
    axis: int = 0
    format: str = "int"
    full_range: bool = False
    scale_dtype: torch.dtype = torch.float16
    codebook: tuple[float, ...] | None = field(default=None)
    codebook_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"QuantSpec.format must be one of {', '.join(FORMATS)}; got {self.format!r}")
        implied = _implied_bits(self)
        if self.bits is None:
            object.__setattr__(self, "bits", implied)
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise ValueError(f"QuantSpec.bits must be an integer, got {self.bits!r}")
        if self.format == "int" and not 1 <= self.bits <= 8:
            raise ValueError(f"QuantSpec.bits must be in 1..8 for integer formats, got {self.bits}")
        if self.format != "int" and self.bits != implied:
            raise ValueError(f"QuantSpec.bits={self.bits} contradicts format {self.format!r} ({implied} bits)")
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"QuantSpec.granularity must be one of {', '.join(GRANULARITIES)}; got {self.granularity!r}"
            )
        if self.granularity == "group":
            if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size <= 0:
                raise ValueError(f"QuantSpec.group_size must be a positive integer for granularity='group', got {self.group_size!r}")
        elif self.group_size is not None:
            raise ValueError(f"QuantSpec.group_size is only used with granularity='group' (got granularity={self.granularity!r})")
        if isinstance(self.axis, bool) or not isinstance(self.axis, int):
            raise ValueError(f"QuantSpec.axis must be an integer, got {self.axis!r}")
        if not self.symmetric and self.format != "int":
            raise ValueError(f"QuantSpec.symmetric=False (a zero-point) needs format='int', not {self.format!r}")
        if self.full_range and not (self.format == "int" and self.symmetric):
            raise ValueError("QuantSpec.full_range applies to symmetric integer formats only")
        if self.format == "int" and self.symmetric and self.bits < 2 and not self.full_range:
            raise ValueError("QuantSpec.bits=1 symmetric holds only zero; use symmetric=False or full_range=True")
        if self.scale_dtype not in _SCALE_DTYPES:
            raise ValueError(f"QuantSpec.scale_dtype must be a float dtype, got {self.scale_dtype!r}")
        if self.format == "codebook":
            if not self.codebook or len(self.codebook) > 256:
                raise ValueError("QuantSpec.codebook must hold 1..256 values for format='codebook'")
            if self.granularity != "tensor":
                raise ValueError("QuantSpec: format='codebook' uses one table per tensor (granularity='tensor')")
            object.__setattr__(self, "codebook", tuple(float(v) for v in self.codebook))
            if self.codebook_dtype not in (torch.float16, torch.bfloat16, torch.float32):
                raise ValueError(f"QuantSpec.codebook_dtype must be float16, bfloat16 or float32, got {self.codebook_dtype!r}")
        elif self.codebook is not None:
            raise ValueError("QuantSpec.codebook is only used with format='codebook'")

    @property
    def has_scale(self) -> bool:
        return self.format in _SCALED

    @property
    def has_zero_point(self) -> bool:
        return self.format == "int" and not self.symmetric

    def grid(self) -> Format:
        """The numeric format the codes live in."""
        if self.format == "int":
            return IntFormat(self.bits, signed=self.symmetric, full_range=self.full_range)
        if self.format == "nf4":
            return NF4
        if self.format == "codebook":
            return CodebookFormat(torch.tensor(self.codebook, dtype=torch.float64), table_dtype=self.codebook_dtype)
        return FLOAT_FORMATS[self.format]

    def with_(self, **changes) -> "QuantSpec":
        return replace(self, **changes)

    @classmethod
    def from_name(cls, name: str, **overrides) -> "QuantSpec":
        """Parse an API format name: int8, int4-g128, nf4, nf4-g64, fp8-e4m3, fp16, ...

        Integers with a group suffix are asymmetric (one fp16 scale and one fp16
        zero-point per group); plain integers are symmetric per channel.
        """
        m = re.fullmatch(r"(int[1-8]|nf4|fp8-e4m3|fp8-e5m2|fp16|bf16|fp32)(?:-g(\d+))?", name.strip().lower())
        if not m:
            raise ValueError(
                f"unknown format name {name!r}; expected e.g. fp32, fp16, bf16, fp8-e4m3, fp8-e5m2, "
                "int8, int4, int3, int2, nf4, with an optional group suffix such as int4-g128"
            )
        base, group = m.group(1), m.group(2)
        kw: dict = {}
        if base.startswith("int"):
            kw.update(format="int", bits=int(base[3:]), symmetric=group is None)
        else:
            kw.update(format=base)
        if group is not None:
            if base in ("fp16", "bf16", "fp32"):
                raise ValueError(f"format {name!r}: {base} has no scales, so no group size")
            kw.update(granularity="group", group_size=int(group))
        elif base in ("fp16", "bf16", "fp32"):
            kw.update(granularity="tensor")
        kw.update(overrides)
        return cls(**kw)


def _implied_bits(spec: QuantSpec) -> int:
    if spec.format == "int":
        return 8 if spec.bits is None else spec.bits
    if spec.format == "nf4":
        return 4
    if spec.format == "codebook":
        n = len(spec.codebook) if spec.codebook else 1
        return max(1, (n - 1).bit_length())
    return FLOAT_FORMATS[spec.format].bits
