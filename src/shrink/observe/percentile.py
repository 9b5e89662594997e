"""Percentile observer: clip the rare extremes that would waste the grid."""
from __future__ import annotations

import torch

from shrink.observe.base import Observer
from shrink.quant import QuantSpec
from shrink.quant.ranges import percentile_range


class PercentileObserver(Observer):
    """Clipping range = the p-th (and (100-p)-th) percentile, averaged over batches.

    Each batch's percentiles are exact (order statistics with linear
    interpolation); across batches they are averaged with equal weight, which
    keeps memory flat however much calibration data flows through.
    """

    def __init__(self, spec: QuantSpec, percentile: float = 99.99):
        super().__init__(spec)
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"PercentileObserver.percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile

    def _batch_range(self, blocks):
        return percentile_range(blocks, self.percentile)

    def _merge(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        if self.lo is None:
            self.lo, self.hi = lo, hi
            return
        n = self.batches  # batches already merged
        self.lo = self.lo + (lo - self.lo) / (n + 1)
        self.hi = self.hi + (hi - self.hi) / (n + 1)
