"""Block-level encode/decode shared by quantize, dequantize, fake_quantize and
the MSE range search. Inputs are blocks [rows, groups, group_size] and
parameters [rows, groups, 1].

Integer rounding reproduces PyTorch's CPU kernels bit for bit:
q = clamp(round_half_even(fma(x, 1/scale, zero_point))), with 1/scale computed
in float32 and the fused multiply-add rounded once to float32.
"""
from __future__ import annotations

import torch

from shrink.formats import CodebookFormat, FloatFormat, IntFormat


def inverse_scale(scale: torch.Tensor) -> torch.Tensor:
    return torch.ones((), dtype=torch.float32) / scale.to(torch.float32)


def scaled_int(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None) -> torch.Tensor:
    """fma(x, 1/scale, zp) rounded once to float32 (before rounding to integers)."""
    if zp is None:  # no addend: the float32 product is already the once-rounded result
        return x.to(torch.float32) * inverse_scale(scale)
    inv = inverse_scale(scale).to(torch.float64)
    y = x.to(torch.float32).to(torch.float64) * inv
    if zp is not None:
        y = y + zp.to(torch.float64)
    return y.to(torch.float32)


def encode(x: torch.Tensor, scale: torch.Tensor | None, zp: torch.Tensor | None, grid) -> torch.Tensor:
    if x.is_floating_point() and torch.isnan(x).any():
        x = x.nan_to_num(0.0)  # padding only: real NaN is refused before this
    if isinstance(grid, IntFormat):
        return grid.encode(scaled_int(x, scale, zp))
    if scale is not None:
        x = x.to(torch.float32) * inverse_scale(scale)
    return grid.encode(x)


def decode(codes: torch.Tensor, scale: torch.Tensor | None, zp: torch.Tensor | None, grid) -> torch.Tensor:
    v = grid.decode(codes, torch.float32)
    if zp is not None:
        v = v - zp.to(torch.float32)
    if scale is not None:
        v = v * scale.to(torch.float32)
    return v


def in_range_mask(x: torch.Tensor, scale: torch.Tensor | None, zp: torch.Tensor | None, grid) -> torch.Tensor:
    """True where x lies inside the clipping range (the straight-through region)."""
    if isinstance(grid, IntFormat):
        q = torch.round(scaled_int(x, scale, zp))
        return (q >= grid.qmin) & (q <= grid.qmax)
    v = x.to(torch.float32)
    if scale is not None:
        v = v * inverse_scale(scale)
    if isinstance(grid, CodebookFormat):
        table = grid.stored_values()
        return (v >= float(table[0])) & (v <= float(table[-1]))
    assert isinstance(grid, FloatFormat)
    return v.abs() <= grid.max_value
