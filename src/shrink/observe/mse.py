"""MSE observer: the clipping range that minimises reconstruction error.

Seed 001, chapter 9 (the derivation challenge): too wide a range wastes
levels on outliers (rounding error grows), too narrow clips the tails
(clipping error grows); the best range balances the two. It is found by grid
search over shrink factors of the min/max range.
"""
from __future__ import annotations

import torch

from shrink.observe.base import Observer
from shrink.quant import QuantSpec
from shrink.quant.ranges import minmax_range, mse_range


class MSEObserver(Observer):
    """Keeps the observed values (up to `max_samples` per channel, a
    deterministic strided subsample beyond that) and searches the range that
    minimises sum |x - x_hat|^norm when asked for it."""

    def __init__(self, spec: QuantSpec, *, grid_points: int = 100, max_shrink: float = 0.8,
                 norm: float = 2.0, max_samples: int = 1 << 16):
        super().__init__(spec)
        self.options = dict(grid_points=grid_points, max_shrink=max_shrink, norm=norm)
        self.max_samples = max_samples
        self._samples: list[torch.Tensor] = []

    def _batch_range(self, blocks):
        rows = blocks.shape[0]
        self._samples.append(blocks.reshape(rows, -1))
        self._dirty = True
        return minmax_range(blocks)

    def _finalize(self) -> None:
        if not getattr(self, "_dirty", False):
            return
        kept = torch.cat(self._samples, dim=1)
        if kept.shape[1] > self.max_samples:
            step = -(-kept.shape[1] // self.max_samples)
            kept = kept[:, ::step]
        self._samples = [kept]
        self.lo, self.hi = mse_range(kept.unsqueeze(1), self.spec, self.grid, **self.options)
        self._dirty = False
