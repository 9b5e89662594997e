"""Choosing a block's clipping range, and turning a range into (scale, zero-point).

Range estimators work on blocks [rows, groups, group_size] (NaN = padding)
and return (lo, hi) of shape [rows, groups, 1] with lo <= 0 <= hi: the range
always contains zero, so zero is exactly representable and the integer
zero-point lies inside the code range (as in PyTorch's observers and GPTQ).
"""
from __future__ import annotations

import torch

from shrink.formats import CodebookFormat, FloatFormat, IntFormat
from shrink.quant.core import decode, encode
from shrink.quant.spec import QuantSpec

Range = tuple[torch.Tensor, torch.Tensor]


def minmax_range(blocks: torch.Tensor) -> Range:
    x = blocks.nan_to_num(0.0)
    lo = x.amin(dim=-1, keepdim=True).clamp(max=0)
    hi = x.amax(dim=-1, keepdim=True).clamp(min=0)
    return lo, hi


def percentile_range(blocks: torch.Tensor, percentile: float = 99.99) -> Range:
    """Clip to the given percentile of each block (and 100 - p below).

    Linear interpolation between order statistics, as numpy's default; NaN
    padding sorts last and is excluded from the count.
    """
    if not 50.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (50, 100], got {percentile}")
    s = torch.sort(blocks.to(torch.float64), dim=-1).values  # NaN sorts to the end
    n = (~torch.isnan(blocks)).sum(dim=-1, keepdim=True).clamp(min=1)

    def at(q: float) -> torch.Tensor:
        pos = (n - 1).to(torch.float64) * q
        i0 = pos.floor().long()
        i1 = torch.minimum(i0 + 1, n - 1)
        frac = pos - i0
        v0, v1 = s.gather(-1, i0), s.gather(-1, i1)
        return v0 + (v1 - v0) * frac

    p = percentile / 100.0
    lo = at(1.0 - p).clamp(max=0).to(blocks.dtype)
    hi = at(p).clamp(min=0).to(blocks.dtype)
    return lo, hi


def min_scale(dtype: torch.dtype) -> torch.Tensor:
    """The smallest scale kept: positive in `dtype` and with 1/scale finite in float32
    (the arithmetic runs in float32, as PyTorch's kernels do)."""
    zero = torch.zeros((), dtype=dtype)
    smallest = torch.nextafter(zero, torch.ones_like(zero))
    floor = torch.tensor(torch.finfo(torch.float32).tiny, dtype=torch.float64)
    return torch.maximum(smallest.to(torch.float64), floor).to(dtype)


def round_up_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast to `dtype`, rounding up, so a stored scale never shrinks the range."""
    y = x.to(dtype)
    low = y.to(x.dtype) < x
    if low.any():
        y = torch.where(low, torch.nextafter(y, torch.full_like(y, float("inf"))), y)
    return y


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec, grid) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(lo, hi) -> (scale, zero_point) as stored (spec.scale_dtype).

    int symmetric:  scale = absmax / qmax   (full range: absmax / ((qmax - qmin) / 2), as torch)
    int asymmetric: scale = (hi - lo) / (qmax - qmin), zp = qmin - round(lo / scale)
    nf4:            scale = absmax          (table spans [-1, 1])
    fp8:            scale = absmax / max finite value
    A block of zeros gets scale 1 (any scale is exact there).
    """
    lo32, hi32 = lo.to(torch.float32), hi.to(torch.float32)
    absmax = torch.maximum(-lo32, hi32)
    if isinstance(grid, IntFormat):
        if spec.symmetric:
            denom = (grid.qmax - grid.qmin) / 2 if grid.full_range else grid.qmax
            scale = absmax / denom
        else:
            scale = (hi32 - lo32) / (grid.qmax - grid.qmin)
    elif isinstance(grid, CodebookFormat):
        scale = absmax / float(grid.values.abs().max())
    elif isinstance(grid, FloatFormat):
        scale = absmax / grid.max_value
    else:  # pragma: no cover - QuantSpec admits no other grid
        raise TypeError(f"no scale rule for {grid!r}")
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    stored = round_up_to(scale, spec.scale_dtype)
    if torch.isinf(stored).any():
        raise ValueError(
            f"a scale of {float(scale.max()):.4g} overflows {spec.scale_dtype}; "
            "use QuantSpec(scale_dtype=torch.float32) for tensors with values this large"
        )
    stored = torch.maximum(stored, min_scale(spec.scale_dtype))
    if not spec.has_zero_point:
        return stored, None
    s = stored.to(torch.float32)
    zp = (grid.qmin - torch.round(lo32 / s)).clamp(grid.qmin, grid.qmax)
    return stored, zp.to(spec.scale_dtype)


def mse_range(
    blocks: torch.Tensor,
    spec: QuantSpec,
    grid,
    *,
    grid_points: int = 100,
    max_shrink: float = 0.8,
    norm: float = 2.0,
) -> Range:
    """Per block, the shrunken min/max range that minimises sum |x - x_hat|^norm.

    Candidates are f * (lo, hi) for f = 1, 1 - 1/grid_points, ..., 1 - max_shrink,
    each scored with the stored parameters quantization will use (rounded
    scale, integer zero-point). Integer candidates are scored in plain float32
    (a multiply and an add, not the fused torch-exact rounding: several times
    faster, and different only at exact ties); the winner is then re-scored
    exactly against f = 1, so the result is never worse than min/max's.
    """
    if not 0.0 <= max_shrink < 1.0 or grid_points < 1:
        raise ValueError("mse_range: need grid_points >= 1 and 0 <= max_shrink < 1")
    # Row chunks small enough to stay in cache while every candidate is scored.
    per_row = max(1, blocks.shape[1] * blocks.shape[2])
    rows = max(1, _CHUNK_ELEMENTS // per_row)
    if blocks.shape[0] > rows:
        parts = [_mse_range(blocks[i:i + rows], spec, grid, grid_points, max_shrink, norm)
                 for i in range(0, blocks.shape[0], rows)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return _mse_range(blocks, spec, grid, grid_points, max_shrink, norm)


_CHUNK_ELEMENTS = 1 << 19


def _mse_range(blocks, spec, grid, grid_points, max_shrink, norm) -> Range:
    lo0, hi0 = minmax_range(blocks)
    x = blocks.to(torch.float32)
    valid = ~torch.isnan(x)
    x0 = torch.where(valid, x, torch.zeros_like(x))
    fast = _fast_roundtrip if isinstance(grid, IntFormat) else _exact_roundtrip
    best_err = torch.full_like(lo0, float("inf"))
    best_lo, best_hi = lo0.clone(), hi0.clone()
    for i in range(int(max_shrink * grid_points) + 1):
        f = 1.0 - i / grid_points
        lo, hi = lo0 * f, hi0 * f
        err = _block_error(x0, fast(x0, lo, hi, spec, grid), valid, norm, torch.float32)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, lo, best_lo)
        best_hi = torch.where(better, hi, best_hi)
    if fast is _exact_roundtrip:
        return best_lo, best_hi
    exact_best = _block_error(x0, _exact_roundtrip(x0, best_lo, best_hi, spec, grid), valid, norm)
    exact_minmax = _block_error(x0, _exact_roundtrip(x0, lo0, hi0, spec, grid), valid, norm)
    keep = exact_best <= exact_minmax
    return torch.where(keep, best_lo, lo0), torch.where(keep, best_hi, hi0)


def _block_error(x, x_hat, valid, norm: float, dtype=torch.float64) -> torch.Tensor:
    err = (x_hat - x).abs_()
    err = err.square_() if norm == 2.0 else err.pow_(norm)
    return torch.where(valid, err, torch.zeros_like(err)).sum(dim=-1, keepdim=True, dtype=dtype)


def _exact_roundtrip(x, lo, hi, spec, grid) -> torch.Tensor:
    scale, zp = qparams_from_range(lo, hi, spec, grid)
    return decode(encode(x, scale, zp, grid), scale, zp, grid)


def _fast_roundtrip(x, lo, hi, spec, grid) -> torch.Tensor:
    scale, zp = qparams_from_range(lo, hi, spec, grid)
    s = scale.to(torch.float32)
    z = torch.zeros_like(s) if zp is None else zp.to(torch.float32)
    q = torch.round(x * (1.0 / s) + z).clamp_(grid.qmin, grid.qmax)
    return q.sub_(z).mul_(s)
