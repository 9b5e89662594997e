"""Learned step size quantization (LSQ, Esser et al. 2020): fake quantization whose
step size (scale) is a trainable parameter.

Forward, per block of the spec's layout (per tensor, per channel and per group are one
code path, as in quant/ops.py):

    x_hat = (clamp(round(x / s) + z, qmin, qmax) - z) * s

computed with shrink's own encode/decode (quant/core.py), so the values are bit for bit
what `quantize(x, spec, scale=s, zero_point=z)` followed by `dequantize` stores.

Backward, with u = x / s + z (the paper's v / s, shifted by the integer zero-point z):

    d x_hat / d x = 1                       if qmin < u < qmax, else 0   (straight-through,
                                                                          masked outside the clip range)
    d x_hat / d s = round(u) - u            if qmin < u < qmax
                    qmin - z                if u <= qmin
                    qmax - z                if u >= qmax

and the gradient reaching s is multiplied by g = 1 / sqrt(n * qmax), n the elements
sharing that step size (the paper's gradient scale; qmax is its Q_P). The zero-point is
not learned (it stays the integer the range gave it).
"""
from __future__ import annotations

import math

import torch

from shrink.formats import IntFormat
from shrink.quant.blocks import layout_for
from shrink.quant.core import decode, scaled_int
from shrink.quant.ranges import min_scale, minmax_range, qparams_from_range
from shrink.quant.spec import QuantSpec


def _int_grid(spec: QuantSpec, what: str) -> IntFormat:
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"{what}: spec must be a QuantSpec, got {type(spec).__name__}")
    grid = spec.grid()
    if not isinstance(grid, IntFormat):
        raise ValueError(f"{what}: learned step sizes need an integer format, got format {spec.format!r}")
    return grid


def lsq_grad_scale(numel_per_scale: int, qmax: int) -> float:
    """g = 1 / sqrt(n * Q_P): the factor LSQ multiplies a step size's gradient by."""
    if numel_per_scale < 1 or qmax < 1:
        raise ValueError(f"lsq_grad_scale: need numel_per_scale >= 1 and qmax >= 1, got {numel_per_scale}, {qmax}")
    return 1.0 / math.sqrt(numel_per_scale * qmax)


class _LSQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, blocks, s, zp, grid, g):
        x = blocks.detach().nan_to_num(0.0).to(torch.float32)   # NaN is a ragged group's padding
        s32 = s.detach().to(torch.float32)
        u = scaled_int(x, s32, zp)
        q = grid.encode(u).to(torch.float32)
        out = decode(q.to(torch.int32), s32, zp, grid)
        ctx.save_for_backward(u, q, zp if zp is not None else torch.zeros(()))
        ctx.grid, ctx.g, ctx.s_dtype = grid, g, s.dtype
        return out.to(blocks.dtype)

    @staticmethod
    def backward(ctx, grad):
        u, q, zp = ctx.saved_tensors
        grid = ctx.grid
        inside = (u > grid.qmin) & (u < grid.qmax)
        grad = grad.to(torch.float32)
        gx = grad * inside
        # inside: round(u) - u; clipped: the clamped code minus the zero-point
        ds = torch.where(inside, q - u, q - zp.to(torch.float32))
        gs = (grad * ds).sum(dim=-1, keepdim=True) * ctx.g
        return gx, gs.to(ctx.s_dtype), None, None, None


def lsq_fake_quantize(x: torch.Tensor, scale: torch.Tensor, spec: QuantSpec,
                      zero_point: torch.Tensor | None = None, *, grad_scale: float | None = None) -> torch.Tensor:
    """Fake-quantize x with a learnable step size `scale` (shaped as the spec's scales: ()
    per tensor, (C,) per channel, (C, G) per group; a single value is broadcast). Gradients
    flow to x (straight-through inside the clip range) and to scale (LSQ, times grad_scale,
    default 1 / sqrt(elements per scale * qmax)). zero_point: the asymmetric spec's integer
    zero-points (not learned); None for a symmetric spec."""
    grid = _int_grid(spec, "lsq_fake_quantize")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"lsq_fake_quantize: x must be a floating-point tensor, got "
                        f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.numel() == 0:
        raise ValueError(f"lsq_fake_quantize: input of shape {tuple(x.shape)} is empty; nothing to quantize")
    if not isinstance(scale, torch.Tensor) or not scale.is_floating_point():
        raise TypeError("lsq_fake_quantize: scale must be a floating-point tensor")
    if not bool(torch.isfinite(scale.detach()).all()) or bool((scale.detach() <= 0).any()):
        raise ValueError("lsq_fake_quantize: scale must be finite and positive (clamp it, e.g. with "
                         "clamp_scale, before quantizing)")
    lay = layout_for(x.shape, spec)
    s = lay.params_as_blocks(scale, "scale")
    if spec.has_zero_point:
        if zero_point is None:
            raise ValueError("lsq_fake_quantize: an asymmetric spec needs zero_point=")
        zp = lay.params_as_blocks(zero_point, "zero_point").detach().to(torch.float32)
    else:
        if zero_point is not None and bool(torch.as_tensor(zero_point).ne(0).any()):
            raise ValueError("lsq_fake_quantize: a symmetric spec has no zero-point; pass zero_point=None")
        zp = None
    g = lsq_grad_scale(lay.group_size, grid.qmax) if grad_scale is None else float(grad_scale)
    out = _LSQ.apply(lay.to_blocks(x), s, zp, grid, g)
    return lay.from_blocks(out).to(x.dtype)


def clamp_scale(scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The scale as it will be stored: rounded to spec.scale_dtype (at least its smallest
    usable value), with a straight-through gradient, so that training sees exactly the
    scales a converted layer keeps."""
    floor = min_scale(spec.scale_dtype).to(torch.float32)
    s = torch.maximum(scale.to(torch.float32), floor)
    stored = torch.maximum(s.detach().to(spec.scale_dtype).to(torch.float32), floor)
    return s + (stored - s).detach()


def observed_params(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale, zero_point) a min/max observer gives x under spec, in the spec's parameter
    shape and scale_dtype: what quantize(x, spec) would store."""
    grid = spec.grid()
    lay = layout_for(x.shape, spec)
    with torch.no_grad():
        lo, hi = minmax_range(lay.to_blocks(x.detach().to(torch.float32)))
        s, zp = qparams_from_range(lo, hi, spec, grid)
    return lay.blocks_to_params(s.contiguous()), None if zp is None else lay.blocks_to_params(zp.contiguous())
