"""Lookup-table formats: each code is an index into a small table of values.

NF4 (QLoRA) is a fixed 16-entry table built from quantiles of the standard
normal, so that each code is equally likely for normally distributed weights
scaled to [-1, 1]. A general codebook (k-means weight sharing, Deep
Compression) carries its own table.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class CodebookFormat:
    """A table of `len(values)` sorted values; codes are indices into it.

    The table is stored alongside the codes in `table_dtype` (fp32 by default,
    as Deep Compression does), so it counts toward the stored bytes unless the
    format is a fixed, well-known table (`builtin=True`, e.g. NF4).
    """

    values: torch.Tensor
    name: str = "codebook"
    table_dtype: torch.dtype = torch.float32
    builtin: bool = False

    def __post_init__(self) -> None:
        v = self.values
        if not isinstance(v, torch.Tensor) or v.dim() != 1 or v.numel() < 1:
            raise ValueError("CodebookFormat.values must be a non-empty 1-D tensor")
        if v.numel() > 256:
            raise ValueError(f"CodebookFormat holds at most 256 values (8-bit codes), got {v.numel()}")
        if not torch.isfinite(v).all():
            raise ValueError("CodebookFormat.values must be finite")
        v = v.detach().to(torch.float64)
        if (v[1:] < v[:-1]).any():
            v = torch.sort(v).values
        object.__setattr__(self, "values", v)

    @property
    def bits(self) -> int:
        return max(1, math.ceil(math.log2(self.values.numel())))

    @property
    def table_nbytes(self) -> int:
        if self.builtin:
            return 0
        return self.values.numel() * torch.empty((), dtype=self.table_dtype).element_size()

    def stored_values(self) -> torch.Tensor:
        """The table as stored (rounded to its dtype): what decode uses."""
        return self.values.to(self.table_dtype).to(torch.float64)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Index of the nearest table value (ties go to the lower value)."""
        table = self.stored_values()
        mids = ((table[1:] + table[:-1]) / 2).to(x.device)
        return torch.bucketize(x.to(torch.float64), mids, right=False).to(torch.int32)

    def decode(self, codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.stored_values().to(device=codes.device, dtype=dtype)[codes.long()]

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, CodebookFormat)
            and self.name == other.name
            and self.table_dtype == other.table_dtype
            and torch.equal(self.values, other.values)
        )

    def __hash__(self) -> int:
        return hash((self.name, self.values.numel()))


def nf4_values() -> torch.Tensor:
    """The 16 NF4 levels, computed from normal quantiles (QLoRA, Dettmers et al. 2023).

    8 positive levels from normal quantiles at probabilities spaced evenly from
    delta down to 0.5, 7 negative ones the same way, plus an exact zero, all
    divided by the largest magnitude. delta = 1 - (1/32 + 1/30)/2 = 0.96770833
    (the paper's offset) keeps the extreme quantile finite.
    """
    offset = 1.0 - (1.0 / 32 + 1.0 / 30) / 2
    def ppf(p: torch.Tensor) -> torch.Tensor:
        return torch.special.ndtri(p)
    pos = ppf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -ppf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg])
    v = v / v.abs().max()
    return torch.sort(v).values


NF4 = CodebookFormat(nf4_values(), name="nf4", table_dtype=torch.float32, builtin=True)
