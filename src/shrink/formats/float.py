"""Floating-point formats: fp32, fp16, bf16 and the two fp8 formats.

Rounding is to nearest, ties to even, and saturating: values beyond the largest
finite number become that number (never inf or NaN), which is what a weight
or activation quantizer wants. The grid rounding is plain arithmetic over
(exponent, mantissa) so one routine serves every width, subnormals included;
torch's own dtypes then hold the exact bit patterns.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FloatFormat:
    name: str
    exp_bits: int
    man_bits: int
    bias: int
    max_value: float
    torch_dtype: torch.dtype
    code_dtype: torch.dtype  # integer dtype of the same width, for bit patterns

    @property
    def bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits

    @property
    def min_normal(self) -> float:
        return 2.0 ** (1 - self.bias)

    @property
    def min_subnormal(self) -> float:
        return 2.0 ** (1 - self.bias - self.man_bits)

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest value on this format's grid (saturating, ties to even), in float64."""
        xd = x.to(torch.float64)
        a = xd.abs().clamp(max=self.max_value)
        _, exp = torch.frexp(a)  # a = m * 2**exp, m in [0.5, 1): floor(log2 a) = exp - 1
        e = (exp - 1).clamp(min=1 - self.bias)  # below the normal range: subnormal spacing
        quantum = torch.pow(2.0, (e - self.man_bits).to(torch.float64))
        r = torch.round(a / quantum) * quantum
        r = r.clamp(max=self.max_value)
        return torch.copysign(r, xd)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Values -> bit patterns (uint8 for fp8, int16 for fp16/bf16, int32 for fp32)."""
        return self.round(x).to(self.torch_dtype).view(self.code_dtype)

    def decode(self, codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if codes.dtype != self.code_dtype:
            codes = codes.to(self.code_dtype)
        return codes.view(self.torch_dtype).to(dtype)


FP32 = FloatFormat("fp32", 8, 23, 127, float(torch.finfo(torch.float32).max), torch.float32, torch.int32)
FP16 = FloatFormat("fp16", 5, 10, 15, 65504.0, torch.float16, torch.int16)
BF16 = FloatFormat("bf16", 8, 7, 127, float(torch.finfo(torch.bfloat16).max), torch.bfloat16, torch.int16)
# E4M3 "fn": no infinities, one NaN pattern per sign, so the top binade reaches 448.
FP8_E4M3 = FloatFormat("fp8-e4m3", 4, 3, 7, 448.0, torch.float8_e4m3fn, torch.uint8)
# E5M2 keeps IEEE infinities and NaNs; the largest finite value is 57344.
FP8_E5M2 = FloatFormat("fp8-e5m2", 5, 2, 15, 57344.0, torch.float8_e5m2, torch.uint8)

FLOAT_FORMATS = {f.name: f for f in (FP32, FP16, BF16, FP8_E4M3, FP8_E5M2)}
