"""Calibration observers: statistics over batches -> clipping ranges -> (scale, zero-point)."""
from shrink.observe.base import Observer
from shrink.observe.hessian import HessianObserver
from shrink.observe.minmax import MinMaxObserver, MovingAverageMinMaxObserver
from shrink.observe.mse import MSEObserver
from shrink.observe.percentile import PercentileObserver

__all__ = [
    "HessianObserver", "MSEObserver", "MinMaxObserver", "MovingAverageMinMaxObserver", "Observer",
    "PercentileObserver",
]
