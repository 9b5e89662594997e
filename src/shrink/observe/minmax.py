"""Min/max observers: the running extreme, and its moving average for activations."""
from __future__ import annotations

import torch

from shrink.observe.base import Observer
from shrink.quant import QuantSpec
from shrink.quant.ranges import minmax_range


class MinMaxObserver(Observer):
    """Clipping range = the most extreme values seen over all batches."""

    def _batch_range(self, blocks):
        return minmax_range(blocks)


class MovingAverageMinMaxObserver(Observer):
    """Clipping range = exponential moving average of each batch's min and max.

    lo <- (1 - momentum) * lo + momentum * batch_min (the first batch sets it).
    One outlier batch moves the range by `momentum` of its excess instead of
    widening it for good, which suits activations seen during QAT.
    """

    def __init__(self, spec: QuantSpec, momentum: float = 0.01):
        super().__init__(spec)
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"MovingAverageMinMaxObserver.momentum must be in (0, 1], got {momentum}")
        self.momentum = momentum

    def _batch_range(self, blocks):
        return minmax_range(blocks)

    def _merge(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        if self.lo is None:
            self.lo, self.hi = lo, hi
            return
        m = self.momentum
        self.lo = self.lo + m * (lo - self.lo)
        self.hi = self.hi + m * (hi - self.hi)
