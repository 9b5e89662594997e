"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights.

Activations of LLMs have a few channels with huge magnitudes, which ruins
per-tensor int8 activations; weights are easy to quantize. Dividing input
channel j of the activation by s_j and multiplying the weights' column j by
s_j leaves the product unchanged and, with
    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha),
balances the two ranges (alpha = 0.5 by default). The division is folded
into the previous LayerNorm or Linear; then weights are int8 per channel and
activations int8 per token, quantized on the fly (W8A8).
"""
from __future__ import annotations

from typing import Sequence

import torch

from shrink.quant import check_finite


def smoothquant_scales(act_absmax: torch.Tensor, weights: torch.Tensor | Sequence[torch.Tensor],
                       alpha: float = 0.5, eps: float = 1e-5) -> torch.Tensor:
    """s [in] from per-channel activation max |x| (calibration) and the weights sharing that
    input (q/k/v, gate/up: the max over all of them, per input column)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothquant: alpha must be in [0, 1], got {alpha}")
    ws = [weights] if isinstance(weights, torch.Tensor) else list(weights)
    if not ws:
        raise ValueError("smoothquant: no weights given")
    check_finite(act_absmax, "smoothquant: activation max")
    n = act_absmax.numel()
    for i, w in enumerate(ws):
        if w.dim() != 2 or w.shape[1] != n:
            raise ValueError(f"smoothquant: weight {i} has shape {tuple(w.shape)}; expected [out, {n}]")
        check_finite(w, f"smoothquant: weight {i}")
    w_absmax = torch.stack([w.detach().abs().amax(dim=0).float() for w in ws]).amax(dim=0)
    a = act_absmax.detach().float().abs().clamp(min=eps)
    s = a.pow(alpha) / w_absmax.clamp(min=eps).pow(1.0 - alpha)
    return s.clamp(min=eps)


def quantize_per_token(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric per-token quantization: codes int8 [..., in], scales [..., 1] float32."""
    if not 2 <= bits <= 8:
        raise ValueError(f"quantize_per_token: bits must be in 2..8, got {bits}")
    qmax = (1 << (bits - 1)) - 1
    xf = x.to(torch.float32)
    scale = (xf.abs().amax(dim=-1, keepdim=True) / qmax).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(xf / scale).clamp_(-qmax, qmax).to(torch.int8)
    return q, scale
