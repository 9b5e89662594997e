"""AWQ: activation-aware weight quantization (Lin et al., 2023).

Weights that meet large activations matter most. Scaling input channel j of
a weight up by s_j (and the activation down by s_j, folded into the previous
LayerNorm or Linear so the float model is unchanged) shrinks that weight's
relative rounding error. s = mean|x|^alpha, searched on a grid of alpha by
the layer's real output error; then each group's clipping range is searched
the same way. alpha = 0 and "no clipping" are candidates, so the result is
never worse than round-to-nearest on the calibration data.

Pure tensor function: `awq(weights, x, spec)` returns the scales to fold and
the quantized, scaled weights; folding into a model lives in surgery.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from shrink.observe import gram_matrix
from shrink.quant import QTensor, QuantSpec, check_finite, dequantize, quantize
from shrink.quant.blocks import layout_for
from shrink.quant.core import decode, encode
from shrink.quant.ranges import minmax_range, qparams_from_range


@dataclass(frozen=True, eq=False)
class AWQResult:
    """scales      [in]: multiply the weights' columns by these, divide the input by them
    alpha       the chosen exponent of mean|x|
    qtensors    one per weight: quantize(W * scales) with the chosen clipping
    error_rtn   output MSE of plain round-to-nearest (alpha 0, no clipping), all weights
    error       output MSE of the result, same data
    errors_by_alpha  the grid search, for the report
    """

    scales: torch.Tensor
    alpha: float
    qtensors: tuple[QTensor, ...]
    error_rtn: float
    error: float
    errors_by_alpha: tuple[float, ...]

    def effective_weights(self) -> list[torch.Tensor]:
        """What the layers compute with, in the unscaled input space: Q(W s) / s."""
        return [dequantize(q).to(torch.float32) / self.scales for q in self.qtensors]


def awq(
    weights: torch.Tensor | Sequence[torch.Tensor],
    x: torch.Tensor,
    spec: QuantSpec,
    *,
    grid: int = 20,
    clip: bool = True,
    clip_grid: int = 20,
    max_shrink: float = 0.5,
    max_tokens: int = 4096,
    seed: int = 0,
    scales: torch.Tensor | None = None,
) -> AWQResult:
    """Search AWQ scales for weights that share the input x ([..., in]; q/k/v or gate/up
    share one search) and quantize the scaled weights under `spec` (an int spec).

    scales: use these [in] instead of searching (alpha is then NaN and errors_by_alpha
    empty); the clipping search still runs. Used after a fold changed a weight's rows."""
    ws = [weights] if isinstance(weights, torch.Tensor) else list(weights)
    if not ws:
        raise ValueError("awq: no weights given")
    if spec.format != "int":
        raise ValueError(f"awq: needs an integer spec, got format {spec.format!r}")
    if spec.axis not in (0, -2):
        raise ValueError("awq: weights are [out, in] with the channel axis 0 (QuantSpec.axis=0)")
    in_features = ws[0].shape[-1]
    for i, w in enumerate(ws):
        if w.dim() != 2 or w.shape[1] != in_features:
            raise ValueError(f"awq: weight {i} has shape {tuple(w.shape)}; all must be [out, {in_features}]")
        check_finite(w, f"awq: weight {i}")
    if x.shape[-1] != in_features:
        raise ValueError(f"awq: activations end in {x.shape[-1]} features, the weights take {in_features}")
    check_finite(x, "awq: activations")
    if grid < 1 or clip_grid < 1 or not 0.0 <= max_shrink < 1.0:
        raise ValueError("awq: need grid >= 1, clip_grid >= 1 and 0 <= max_shrink < 1")
    x = _sample_tokens(x.reshape(-1, in_features).to(torch.float32), max_tokens, seed)
    ws32 = [w.detach().to(torch.float32) for w in ws]
    x_mean = x.abs().mean(dim=0)
    # Every error below is an output MSE mean_n,o ((x_n . (e_o - w_o))^2) = tr(D G D^T) / (n out)
    # with D = E - W and G = X^T X: computed from G ([in, in], once) instead of the tokens,
    # in/n of the work (the same values up to float rounding).
    n = x.shape[0]
    gram = gram_matrix(x, torch.float64).to(torch.float32)

    def error(effective: list[torch.Tensor]) -> float:
        return sum(_gram_error(e - w, gram) / n for e, w in zip(effective, ws32))

    errors: list[float] = []
    best = (math.inf, 0.0, torch.ones(in_features, device=x.device))
    if scales is not None:
        s = scales.detach().to(torch.float32).reshape(-1)
        if s.numel() != in_features or not torch.isfinite(s).all() or bool((s <= 0).any()):
            raise ValueError(f"awq: scales must be {in_features} finite positive values")
        best = (math.nan, math.nan, s)
        grid = 0
    for i in range(grid):
        alpha = i / grid
        s = _scales(x_mean, alpha)
        err = error([dequantize(quantize(w * s, spec)).to(torch.float32) / s for w in ws32])
        errors.append(err)
        if err < best[0]:
            best = (err, alpha, s)
    err_scaled, alpha, s = best
    qts = []
    for w in ws32:
        ws_ = w * s
        q_plain = quantize(ws_, spec)
        if clip:
            gram_s = gram / s[:, None] / s[None, :]  # the Gram of the scaled input x / s
            q_clip = _clipped(ws_, gram_s, spec, clip_grid, max_shrink)
            e_plain = _gram_error(dequantize(q_plain).float() / s - w, gram)
            e_clip = _gram_error(dequantize(q_clip).float() / s - w, gram)
            qts.append(q_clip if e_clip <= e_plain else q_plain)
        else:
            qts.append(q_plain)
    final = error([dequantize(q).to(torch.float32) / s for q in qts])
    err_rtn = errors[0] if errors else error([dequantize(quantize(w, spec)).to(torch.float32) for w in ws32])
    return AWQResult(scales=s, alpha=alpha, qtensors=tuple(qts), error_rtn=err_rtn, error=final,
                     errors_by_alpha=tuple(errors))


def _gram_error(d: torch.Tensor, gram: torch.Tensor) -> float:
    """sum_n ||x_n D^T||^2 / out, from the Gram matrix of x: tr(D G D^T) / out."""
    return float(((d @ gram) * d).sum(dtype=torch.float64)) / d.shape[0]


def _scales(x_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    s = x_mean.pow(alpha).clamp(min=1e-4)
    # normalise around 1 so neither the weights nor the folded activations drift in magnitude
    return s / (s.max() * s.min()).sqrt()


def _clipped(w: torch.Tensor, gram: torch.Tensor, spec: QuantSpec, clip_grid: int, max_shrink: float) -> QTensor:
    """Per (row, group), the shrink of the range that minimises that group's partial output
    error sum_n (x_n,group . (w - q)_group)^2 = d^T G_gg d, G_gg the group's diagonal block of
    the input's Gram matrix. Rows are processed in chunks to bound memory."""
    lay = layout_for(w.shape, spec)
    G, g = lay.groups, lay.group_size
    pad = G * g - gram.shape[0]
    gp = torch.nn.functional.pad(gram, (0, pad, 0, pad)).reshape(G, g, G, g)
    idx = torch.arange(G, device=gram.device)
    gblocks = gp[idx, :, idx, :]                                # [G, g, g]
    blocks = lay.to_blocks(w)                                   # [out, G, g], NaN padding
    lo0, hi0 = minmax_range(blocks)
    best_lo, best_hi = lo0.clone(), hi0.clone()
    rows = max(1, (1 << 24) // max(1, G * g))
    for r0 in range(0, blocks.shape[0], rows):
        sl = slice(r0, r0 + rows)
        best_lo[sl], best_hi[sl] = _clip_rows(blocks[sl], gblocks, lo0[sl], hi0[sl], spec, clip_grid, max_shrink)
    scale, zp = qparams_from_range(best_lo, best_hi, spec, spec.grid())
    return quantize(w, spec, scale=lay.blocks_to_params(scale),
                    zero_point=None if zp is None else lay.blocks_to_params(zp))


def _clip_rows(blocks, gblocks, lo0, hi0, spec, clip_grid, max_shrink):
    grid = spec.grid()
    wz = blocks.nan_to_num(0.0)
    best_err = torch.full(lo0.shape, math.inf, device=lo0.device)
    best_lo, best_hi = lo0.clone(), hi0.clone()
    for i in range(int(max_shrink * clip_grid) + 1):
        f = 1.0 - i / clip_grid
        m = torch.maximum(-lo0, hi0) * f
        lo, hi = torch.maximum(lo0, -m), torch.minimum(hi0, m)
        scale, zp = qparams_from_range(lo, hi, spec, grid)
        d = decode(encode(wz, scale, zp, grid), scale, zp, grid) - wz   # [rows, G, g]
        err = (torch.einsum("ogk,gkl->ogl", d, gblocks) * d).sum(dim=-1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, lo, best_lo)
        best_hi = torch.where(better, hi, best_hi)
    return best_lo, best_hi


def _sample_tokens(x: torch.Tensor, max_tokens: int, seed: int) -> torch.Tensor:
    if x.shape[0] <= max_tokens:
        return x
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(x.shape[0], generator=g)[:max_tokens].sort().values
    return x[idx]
