"""In-process latency: warm-up, then the median of timed forward passes.

`measure_latency(model, batch)` times `model(batch)` (a tensor, a mapping of
model arguments, or a tuple, as calibration batches are) under
inference_mode, after `warmup` untimed calls, and reports the median and the
spread of `runs` timed ones. On a GPU the device is synchronized before each
clock read. `latency_probe(batch)` makes the batch-1 and batched inputs from
one calibration batch; `latency_metric` times both for a model.

Latency is a property of this machine and its load at that moment: compare
figures taken side by side, in one run (compress measures the baseline and
the result the same way, minutes apart).

Threads: timing a model that other threads are running is safe (a model in eval
mode is not touched), but the figures then include their contention.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from shrink.modules._buffers import eval_mode
from shrink.modules.decode import sync_device
from shrink.surgery.capture import call_model, to_device


def batch_rows(batch: Any) -> int:
    """How many examples a batch holds: the first dimension of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    values = batch.values() if isinstance(batch, Mapping) else batch
    for v in values:
        if isinstance(v, torch.Tensor) and v.dim():
            return int(v.shape[0])
    raise ValueError("cannot tell the batch size: the batch holds no tensor with a batch dimension")


def first_rows(batch: Any, n: int) -> Any:
    """The first n examples of a batch (every tensor sliced along its first dimension)."""
    rows = batch_rows(batch)
    cut = (lambda v: v[:n] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == rows else v)  # noqa: E731
    if isinstance(batch, torch.Tensor):
        return batch[:n]
    if isinstance(batch, Mapping):
        return {k: cut(v) for k, v in batch.items()}
    return type(batch)(cut(v) for v in batch)


def measure_latency(model: nn.Module, batch: Any, *, warmup: int = 2, runs: int = 7) -> dict:
    """{"median_ms", "min_ms", "max_ms", "runs", "warmup", "batch_size"} of model(batch)."""
    if warmup < 0 or runs < 1:
        raise ValueError(f"measure_latency: warmup must be >= 0 and runs >= 1, got {warmup} and {runs}")
    device = _device(model)
    batch = to_device(batch, device)
    times = []
    with eval_mode(model), torch.inference_mode():   # a model already in eval mode is not touched
        for i in range(warmup + runs):
            sync_device(device)
            t0 = time.perf_counter()
            call_model(model, batch, move=False)  # moved once, above
            sync_device(device)
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            "runs": runs, "warmup": warmup, "batch_size": batch_rows(batch)}


def latency_probe(batch: Any, batched: int = 8) -> dict:
    """{"batch1": the first example, "batched": the first `batched` examples (or all)} of a batch."""
    rows = batch_rows(batch)
    return {"batch1": first_rows(batch, 1), "batched": first_rows(batch, min(batched, rows))}


def latency_metric(model: nn.Module, probe: dict, *, warmup: int = 2, runs: int = 7) -> dict:
    """Batch-1 and batched latency of `model` on a probe from `latency_probe`:
    {"latency_ms": the batch-1 median, "batch1": {...}, "batched": {...}, "threads", "device"}."""
    one = measure_latency(model, probe["batch1"], warmup=warmup, runs=runs)
    many = measure_latency(model, probe["batched"], warmup=warmup, runs=runs)
    return {"latency_ms": one["median_ms"], "batch1": one, "batched": many,
            "threads": torch.get_num_threads(), "device": str(_device(model))}


def _device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")

