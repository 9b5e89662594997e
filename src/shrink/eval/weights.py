"""Weight reconstruction quality: what quantizing each tensor costs, before any
activation data is involved (SQNR, worst error in units of the step)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import torch

from shrink.quant import QTensor, QuantSpec, dequantize, quantize


@dataclass(frozen=True)
class LayerError:
    name: str
    shape: tuple[int, ...]
    params: int
    bytes_fp32: int
    bytes_stored: int
    sqnr_db: float
    rel_rmse: float
    max_abs_error: float

    def to_dict(self) -> dict:
        return asdict(self)


def sqnr_db(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 10 log10(sum x^2 / sum (x - x_hat)^2), in float64."""
    x, x_hat = x.to(torch.float64), x_hat.to(torch.float64)
    noise = float(((x - x_hat) ** 2).sum())
    signal = float((x ** 2).sum())
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


def roundtrip_errors(
    tensors: Iterable[tuple[str, torch.Tensor]],
    spec: QuantSpec | None = None,
    *,
    observer: str = "minmax",
    quantizer: Callable[[torch.Tensor], QTensor] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[LayerError]:
    """Quantize and dequantize each tensor; measure the error and stored bytes.

    Give either a spec (with an observer) or a `quantizer` callable that
    returns a QTensor (e.g. k-means weight sharing).
    """
    if (spec is None) == (quantizer is None):
        raise ValueError("roundtrip_errors: pass exactly one of spec= or quantizer=")
    out = []
    for i, (name, w) in enumerate(tensors):
        qt = quantizer(w) if quantizer is not None else quantize(w, spec, observer=observer)
        w_hat = dequantize(qt).to(torch.float64)
        w64 = w.to(torch.float64)
        err = (w64 - w_hat)
        rms = float(w64.pow(2).mean().sqrt())
        out.append(LayerError(
            name=name,
            shape=tuple(w.shape),
            params=w.numel(),
            bytes_fp32=4 * w.numel(),
            bytes_stored=qt.nbytes,
            sqnr_db=sqnr_db(w64, w_hat),
            rel_rmse=float(err.pow(2).mean().sqrt()) / rms if rms > 0 else 0.0,
            max_abs_error=float(err.abs().max()),
        ))
        if progress is not None:
            progress(i + 1)
    return out


def summarize(layers: list[LayerError]) -> dict:
    """Totals over layers: bytes, compression vs fp32, SQNR of the whole set."""
    if not layers:
        raise ValueError("summarize: no layers to summarize")
    params = sum(l.params for l in layers)
    stored = sum(l.bytes_stored for l in layers)
    fp32 = sum(l.bytes_fp32 for l in layers)
    finite = [l.sqnr_db for l in layers if math.isfinite(l.sqnr_db)]
    return {
        "layers": len(layers),
        "params": params,
        "bytes_fp32": fp32,
        "bytes_stored": stored,
        "bits_per_weight": 8.0 * stored / params,
        "compression_vs_fp32": fp32 / stored,
        "compression_vs_fp16": fp32 / 2 / stored,
        "sqnr_db_min": min(finite) if finite else math.inf,
        "sqnr_db_mean": sum(finite) / len(finite) if finite else math.inf,
        "rel_rmse_max": max(l.rel_rmse for l in layers),
    }
