"""Observers: calibration statistics over many batches -> (scale, zero-point).

An observer sees batches (activations, or a weight once), keeps a running
clipping range per block and turns it into the stored parameters with the
same rule quantize() uses, so `quantize(x, spec, scale=s, zero_point=z)`
with an observer's `qparams()` matches quantizing with that range.

Per-tensor and per-channel (any axis) are supported; per-group needs a fixed
tensor shape and is for weights (use quantize(..., observer=...) there).
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from shrink.quant import QuantSpec, check_finite
from shrink.quant.blocks import layout_for
from shrink.quant.ranges import qparams_from_range


class Observer(ABC):
    def __init__(self, spec: QuantSpec):
        if not isinstance(spec, QuantSpec):
            raise TypeError(f"{type(self).__name__}: spec must be a QuantSpec, got {type(spec).__name__}")
        if spec.granularity == "group":
            raise ValueError(
                f"{type(self).__name__}: granularity='group' needs a fixed tensor shape; observers "
                "handle 'tensor' and 'channel' (quantize weights per group with quantize(observer=...))"
            )
        if not spec.has_scale:
            raise ValueError(f"{type(self).__name__}: format {spec.format!r} has no scale to calibrate")
        self.spec = spec
        self.grid = spec.grid()
        self.batches = 0
        self._rows: int | None = None
        self.lo: torch.Tensor | None = None  # [rows, 1, 1]
        self.hi: torch.Tensor | None = None

    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        check_finite(x.detach(), f"{type(self).__name__}: batch {self.batches}")
        if x.numel() == 0:
            raise ValueError(f"{type(self).__name__}: batch {self.batches} is empty")
        lay = layout_for(x.shape, self.spec)
        if self._rows is None:
            self._rows = lay.rows
        elif lay.rows != self._rows:
            raise ValueError(
                f"{type(self).__name__}: batch {self.batches} has {lay.rows} channels on axis "
                f"{self.spec.axis}, earlier batches had {self._rows}"
            )
        return lay.to_blocks(x.detach().to(torch.float32))

    def observe(self, x: torch.Tensor) -> torch.Tensor:
        """Record a batch; returns it unchanged (so it can sit in a forward pass)."""
        with torch.no_grad():
            lo, hi = self._batch_range(self._blocks(x))
            self._merge(lo, hi)
        self.batches += 1
        return x

    __call__ = observe

    @abstractmethod
    def _batch_range(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This observer's statistic of one batch, as (lo, hi) per block."""

    def _merge(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            self.lo, self.hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The clipping range per block, shaped () per tensor or (C,) per channel."""
        self._require_data()
        shape = () if self.spec.granularity == "tensor" else (self._rows,)
        return self.lo.reshape(shape), self.hi.reshape(shape)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(scale, zero_point) as stored, shaped like range(); zero_point None if symmetric."""
        self._require_data()
        scale, zp = qparams_from_range(self.lo, self.hi, self.spec, self.grid)
        shape = () if self.spec.granularity == "tensor" else (self._rows,)
        return scale.reshape(shape), None if zp is None else zp.reshape(shape)

    def _require_data(self) -> None:
        if self.lo is None:
            raise ValueError(f"{type(self).__name__}: no batches observed yet; feed calibration data first")
        self._finalize()

    def _finalize(self) -> None:
        """Turn accumulated statistics into self.lo/self.hi (most observers keep them current)."""
