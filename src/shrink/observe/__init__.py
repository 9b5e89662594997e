"""Calibration observers: statistics over batches -> clipping ranges -> (scale, zero-point)."""
from shrink.observe.base import Observer
from shrink.observe.hessian import GramCache, HessianObserver, gram_matrix
from shrink.observe.minmax import MinMaxObserver, MovingAverageMinMaxObserver
from shrink.observe.mse import MSEObserver
from shrink.observe.percentile import PercentileObserver

__all__ = [
    "GramCache", "HessianObserver", "MSEObserver", "MinMaxObserver", "MovingAverageMinMaxObserver", "Observer",
    "PercentileObserver", "gram_matrix",
]
