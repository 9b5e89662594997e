"""Round-to-nearest (RTN) weight quantization: the baseline every PTQ method beats.

Each weight is rounded to its nearest code under scales chosen by an observer
(min/max, percentile or MSE) per tensor, output channel or group of input
columns. Given the layer's input Hessian H = 2/n X X^T its loss is the output
error tr((W - Q) H (W - Q)^T), the quantity GPTQ minimises, so the two compare.
"""
from __future__ import annotations

import time

import torch

from shrink.algos.result import QuantResult
from shrink.quant import QuantSpec, check_finite, dequantize, quantize


def rtn(
    weight: torch.Tensor,
    spec: QuantSpec,
    *,
    observer: str = "minmax",
    hessian: torch.Tensor | None = None,
    **observer_kwargs,
) -> QuantResult:
    """Quantize a Linear weight [out, in] by rounding to nearest; groups run along `in`.

    observer / observer_kwargs: as shrink.quant.quantize ("minmax", "percentile"
    with percentile=, "mse" with grid_points=, max_shrink=, norm=).
    hessian: [in, in]; when given, loss = tr((W - Q) H (W - Q)^T), else mean((W - Q)^2).
    """
    start = time.perf_counter()
    check_weight(weight, spec, "rtn")
    if hessian is not None:
        check_hessian(hessian, weight.shape[1], "rtn")
    qt = quantize(weight, spec, observer=observer, **observer_kwargs)
    q = dequantize(qt)
    if hessian is None:
        loss = float((weight.detach().to(torch.float64) - q.to(torch.float64)).square().mean())
    else:
        loss = hessian_loss(weight.detach(), q, hessian)
    return QuantResult(qtensor=qt, loss=loss, seconds=time.perf_counter() - start)


def check_weight(weight: torch.Tensor, spec: QuantSpec, who: str) -> None:
    """A finite, non-empty float [out, in] matrix and a spec whose channels are its rows."""
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"{who}: spec must be a QuantSpec, got {type(spec).__name__}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"{who}: weight must be a 2-D [out, in] tensor, got {shape}")
    if weight.numel() == 0:
        raise ValueError(f"{who}: weight of shape {tuple(weight.shape)} is empty")
    check_finite(weight.detach(), f"{who}: weight")
    # Scales belong to output channels and groups run along the input: the
    # layout a Linear's GPTQ (and every int4 kernel) needs.
    if spec.granularity != "tensor" and spec.has_scale and spec.axis % 2 != 0:
        raise ValueError(
            f"{who}: QuantSpec.axis={spec.axis} would put scales on input columns; "
            "use axis=0 (output channels, the rows of [out, in]) so groups run along `in`"
        )


def check_hessian(hessian: torch.Tensor, in_features: int, who: str) -> None:
    """A finite, symmetric float [in, in] matrix with a non-negative diagonal."""
    if not isinstance(hessian, torch.Tensor):
        raise TypeError(f"{who}: hessian must be a torch.Tensor, got {type(hessian).__name__}")
    if hessian.shape != (in_features, in_features):
        raise ValueError(
            f"{who}: hessian has shape {tuple(hessian.shape)} but the weight has {in_features} "
            f"input columns; it must be [{in_features}, {in_features}] (2/n X^T X of the layer's inputs)"
        )
    check_finite(hessian.detach(), f"{who}: hessian")
    h = hessian.detach()
    asym = float((h - h.T).abs().max())
    # Rounding of a float32 X^T X leaves a relative asymmetry near 1e-7; more is a wrong matrix.
    if asym > 1e-4 * float(h.abs().max()):
        raise ValueError(
            f"{who}: hessian is not symmetric (max |H - H^T| = {asym:.3g}); "
            "pass 2/n X^T X of the layer's inputs"
        )
    diag = torch.diagonal(h)
    if (diag < 0).any():
        i = int(torch.nonzero(diag < 0)[0])
        raise ValueError(
            f"{who}: hessian[{i}, {i}] = {float(diag[i]):.4g} is negative; a Hessian 2/n X^T X "
            "has a non-negative diagonal (was it built from the layer's inputs?)"
        )


def hessian_loss(weight: torch.Tensor, q: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T) in float64."""
    d = weight.to(torch.float64) - q.to(torch.float64)
    return float(((d @ hessian.to(torch.float64)) * d).sum())
