"""A layer whose input is multiplied by a fixed per-channel vector first.

AWQ and SmoothQuant move a per-channel scale from the weights to the input.
Folding it into the previous LayerNorm or Linear is free at run time; where
that op is not known (or is shared with other consumers) the scale is kept
here instead: one multiply per input element, recorded as "scales kept in the layer"."""
from __future__ import annotations

import torch
from torch import nn


class InputScaled(nn.Module):
    """y = inner(x * input_scale)."""

    def __init__(self, inner: nn.Module, input_scale: torch.Tensor):
        super().__init__()
        if input_scale.dim() != 1:
            raise ValueError(f"InputScaled: input_scale must be 1-D, got shape {tuple(input_scale.shape)}")
        if not torch.isfinite(input_scale).all():
            raise ValueError("InputScaled: input_scale has non-finite values")
        self.inner = inner
        self.register_buffer("input_scale", input_scale.detach().clone().to(torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.input_scale.numel():
            raise ValueError(f"InputScaled: input ends in {x.shape[-1]} features, expected {self.input_scale.numel()}")
        return self.inner(x * self.input_scale.to(x.dtype))

    def extra_repr(self) -> str:
        return f"features={self.input_scale.numel()}"
