"""Integer code formats of 1-8 bits: their code range and rounding.

A format only knows its grid. Scales, zero-points and granularity live in
`shrink.quant`; the format turns already-scaled values into codes and back.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class IntFormat:
    """b-bit integers.

    signed, restricted (default): codes in [-(2^(b-1)-1), 2^(b-1)-1], so the
    grid is symmetric and zero is exact; full_range adds -2^(b-1).
    unsigned: codes in [0, 2^b - 1], used with a zero-point.
    """

    bits: int
    signed: bool = True
    full_range: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise ValueError(f"IntFormat.bits must be an integer in 1..8, got {self.bits!r}")
        if self.signed and not self.full_range and self.bits < 2:
            raise ValueError(
                "IntFormat: a 1-bit signed restricted range holds only 0; "
                "use signed=False (asymmetric) or full_range=True"
            )

    @property
    def name(self) -> str:
        return f"{'int' if self.signed else 'uint'}{self.bits}"

    @property
    def qmin(self) -> int:
        if not self.signed:
            return 0
        half = 1 << (self.bits - 1)
        return -half if self.full_range else -(half - 1)

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1 if not self.signed else (1 << (self.bits - 1)) - 1

    @property
    def levels(self) -> int:
        return self.qmax - self.qmin + 1

    def encode(self, scaled: torch.Tensor) -> torch.Tensor:
        """Round half to even and clamp: scaled values -> int32 codes."""
        return torch.round(scaled).clamp_(self.qmin, self.qmax).to(torch.int32)

    def decode(self, codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return codes.to(dtype)

    def to_unsigned(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes shifted to 0..2^b-1 for bit packing."""
        return (codes - self.qmin).to(torch.uint8) if self.signed else codes.to(torch.uint8)

    def from_unsigned(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.to(torch.int32) + self.qmin
