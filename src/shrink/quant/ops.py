"""quantize / dequantize / fake_quantize: the public numeric primitives."""
from __future__ import annotations

import torch

from shrink.formats import IntFormat, pack_bits
from shrink.quant.blocks import BlockLayout, layout_for
from shrink.quant.core import decode, encode, in_range_mask
from shrink.quant.qtensor import QTensor
from shrink.quant.ranges import minmax_range, mse_range, percentile_range, qparams_from_range
from shrink.quant.spec import QuantSpec

OBSERVERS = ("minmax", "percentile", "mse")


def check_finite(x: torch.Tensor, what: str = "tensor") -> None:
    """Raise a ValueError naming where the first NaN/inf is."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(x).__name__}")
    if not (x.is_floating_point()):
        raise TypeError(f"{what}: expected a floating-point tensor, got {x.dtype}")
    bad = ~torch.isfinite(x)
    if bad.any():
        n = int(bad.sum())
        first = tuple(int(i) for i in torch.nonzero(bad)[0].tolist())
        value = x[first].item() if first else x.item()
        raise ValueError(
            f"{what} of shape {tuple(x.shape)} has {n} non-finite value(s) "
            f"(first at index {first}: {value}); replace or mask them before quantizing"
        )


def _params(x_blocks: torch.Tensor, spec: QuantSpec, grid, lay: BlockLayout, observer: str, scale, zero_point, observer_kwargs):
    if not spec.has_scale:
        if scale is not None or zero_point is not None:
            raise ValueError(f"format {spec.format!r} has no scale or zero-point; do not pass them")
        return None, None
    if scale is not None:
        if observer_kwargs:
            raise ValueError(f"observer options {sorted(observer_kwargs)} do nothing with an explicit scale=")
        s = lay.params_as_blocks(scale, "scale")
        if not torch.isfinite(s.to(torch.float64)).all() or (s <= 0).any():
            raise ValueError("scale must be finite and positive")
        if (s.to(torch.float64) < torch.finfo(torch.float32).tiny).any():
            raise ValueError(
                f"scale below {torch.finfo(torch.float32).tiny:.3g} (the smallest normal float32) "
                "would make 1/scale infinite; use a larger scale"
            )
        if spec.has_zero_point:
            if zero_point is None:
                raise ValueError("an asymmetric spec needs zero_point= alongside scale=")
            zp = lay.params_as_blocks(zero_point, "zero_point")
            if not torch.isfinite(zp.to(torch.float64)).all():
                raise ValueError("zero_point must be finite")
        else:
            if zero_point is not None and bool(torch.as_tensor(zero_point).ne(0).any()):
                raise ValueError("a symmetric spec has no zero-point; pass zero_point=None or zeros")
            zp = None
        return s, zp
    if zero_point is not None:
        raise ValueError("zero_point= given without scale=; pass both or neither")
    if observer == "minmax":
        if observer_kwargs:
            raise ValueError(
                f"observer options {sorted(observer_kwargs)} need observer='percentile' or 'mse', not 'minmax'"
            )
        lo, hi = minmax_range(x_blocks)
    elif observer == "percentile":
        lo, hi = percentile_range(x_blocks, **observer_kwargs)
    elif observer == "mse":
        lo, hi = mse_range(x_blocks, spec, grid, **observer_kwargs)
    else:
        raise ValueError(f"observer must be one of {', '.join(OBSERVERS)}; got {observer!r}")
    return qparams_from_range(lo, hi, spec, grid)


def quantize(
    x: torch.Tensor,
    spec: QuantSpec,
    *,
    observer: str = "minmax",
    scale: torch.Tensor | None = None,
    zero_point: torch.Tensor | None = None,
    **observer_kwargs,
) -> QTensor:
    """Quantize `x` under `spec`.

    Without scale/zero_point the observer picks the clipping range per block
    ("minmax", "percentile" with percentile=, "mse" with grid_points=,
    max_shrink=, norm=). Given explicitly, they are used exactly as given, in
    their own dtype, and are what the QTensor stores.
    """
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    check_finite(x, "quantize: input")
    if x.numel() == 0:
        raise ValueError(f"quantize: input of shape {tuple(x.shape)} is empty; nothing to quantize")
    grid = spec.grid()
    lay = layout_for(x.shape, spec)
    with torch.no_grad():
        blocks = lay.to_blocks(x.detach().to(torch.float32) if x.dtype != torch.float64 else x.detach())
        s, zp = _params(blocks, spec, grid, lay, observer, scale, zero_point, observer_kwargs)
        codes = encode(blocks, s, zp, grid)
        flat = codes.reshape(lay.rows, -1)[:, : lay.inner].reshape(-1)
        if isinstance(grid, IntFormat):
            data = pack_bits(grid.to_unsigned(flat), grid.bits)
        elif grid.bits <= 8:
            data = pack_bits(flat.to(torch.uint8) if flat.dtype != torch.uint8 else flat, grid.bits)
        else:
            data = flat.clone()
    return QTensor(
        data=data,
        shape=x.shape,
        dtype=x.dtype,
        spec=spec,
        grid=grid,
        scale=None if s is None else lay.blocks_to_params(s.contiguous()).clone(),
        zero_point=None if zp is None else lay.blocks_to_params(zp.contiguous()).clone(),
    )


def dequantize(qt: QTensor) -> torch.Tensor:
    """Codes back to floats: w_hat = (q - zero_point) * scale (table lookup for NF4/codebooks)."""
    if not isinstance(qt, QTensor):
        raise TypeError(f"dequantize expects a QTensor, got {type(qt).__name__}")
    return qt.dequantize()


class _FakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, blocks_fn, params):
        lay, grid, s, zp = params
        with torch.no_grad():
            blocks = lay.to_blocks(x.to(torch.float32))
            out = decode(encode(blocks, s, zp, grid), s, zp, grid)
            mask = in_range_mask(blocks.nan_to_num(0.0), s, zp, grid)
        ctx.save_for_backward(lay.from_blocks(mask))
        return lay.from_blocks(out).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return grad * mask.to(grad.dtype), None, None


def fake_quantize(
    x: torch.Tensor,
    spec: QuantSpec,
    *,
    observer: str = "minmax",
    scale: torch.Tensor | None = None,
    zero_point: torch.Tensor | None = None,
    **observer_kwargs,
) -> torch.Tensor:
    """Quantize and dequantize in one differentiable op.

    Forward: the dequantized value. Backward: straight-through, i.e. the
    incoming gradient where x is inside the clipping range and zero outside
    (as torch.fake_quantize_per_channel_affine).
    """
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    check_finite(x.detach(), "fake_quantize: input")
    if x.numel() == 0:
        raise ValueError(f"fake_quantize: input of shape {tuple(x.shape)} is empty; nothing to quantize")
    grid = spec.grid()
    lay = layout_for(x.shape, spec)
    with torch.no_grad():
        blocks = lay.to_blocks(x.detach().to(torch.float32))
        s, zp = _params(blocks, spec, grid, lay, observer, scale, zero_point, observer_kwargs)
    return _FakeQuant.apply(x, None, (lay, grid, s, zp))
