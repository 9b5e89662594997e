"""Mixed-precision training: the forward pass under autocast in bf16 or fp16 while the
weights (the optimizer's "master" copy) stay fp32, and, for fp16, dynamic loss scaling.

fp16 has 5 exponent bits: small gradients underflow to zero. The loss is multiplied by a
scale S before backward, so the gradients are S times larger; they are divided by S
(unscaled) before clipping and the optimizer step. When any gradient is inf or NaN the
step is skipped and S is multiplied by `backoff` (0.5); after `growth_interval` clean
steps in a row S is multiplied by `growth` (2). bf16 has fp32's exponent range and needs
no scaling (its scaler is disabled: scale 1, nothing skipped).
"""
from __future__ import annotations

import contextlib
import math

import torch

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, where: str = "training") -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"{where}: precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def autocast(precision: str, device: torch.device | str):
    """The autocast context for `precision` on `device` (fp32: no autocast)."""
    check_precision(precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    kind = torch.device(device).type
    return torch.autocast(device_type=kind, dtype=_DTYPES[precision])


class LossScaler:
    """Dynamic loss scaling (as torch.amp.GradScaler, written out so its rules are visible
    and tested): scale(loss), then unscale(params) -> True when the gradients are finite,
    then update(found_inf)."""

    def __init__(self, init_scale: float = 2.0 ** 16, growth: float = 2.0, backoff: float = 0.5,
                 growth_interval: int = 2000, enabled: bool = True):
        if not (init_scale > 0 and math.isfinite(init_scale)):
            raise ValueError(f"LossScaler: init_scale must be a positive finite number, got {init_scale!r}")
        if not growth > 1:
            raise ValueError(f"LossScaler: growth must be above 1, got {growth!r}")
        if not 0 < backoff < 1:
            raise ValueError(f"LossScaler: backoff must be in (0, 1), got {backoff!r}")
        if isinstance(growth_interval, bool) or not isinstance(growth_interval, int) or growth_interval < 1:
            raise ValueError(f"LossScaler: growth_interval must be a positive integer, got {growth_interval!r}")
        self.scale_value = float(init_scale) if enabled else 1.0
        self.growth, self.backoff, self.growth_interval = growth, backoff, growth_interval
        self.enabled = enabled
        self.clean_steps = 0
        self.skipped = 0

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale_value if self.enabled else loss

    def unscale(self, params) -> bool:
        """Divide every gradient by the scale; True when all are finite (the step may run)."""
        finite = True
        for p in params:
            if p.grad is None:
                continue
            if self.enabled:
                p.grad.div_(self.scale_value)
            if finite and not bool(torch.isfinite(p.grad).all()):
                finite = False
        return finite

    def update(self, found_inf: bool) -> None:
        if not self.enabled:
            return
        if found_inf:
            self.scale_value *= self.backoff
            self.clean_steps = 0
            self.skipped += 1
        else:
            self.clean_steps += 1
            if self.clean_steps >= self.growth_interval:
                self.scale_value *= self.growth
                self.clean_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale_value, "clean_steps": self.clean_steps, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.scale_value = float(state["scale"])
        self.clean_steps = int(state["clean_steps"])
        self.skipped = int(state["skipped"])


def scaler_for(precision: str, **kwargs) -> LossScaler:
    """fp16 scales dynamically; bf16 and fp32 need no scaling (a disabled scaler)."""
    return LossScaler(enabled=check_precision(precision) == "fp16", **kwargs)
