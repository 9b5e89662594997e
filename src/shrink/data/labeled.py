"""Labeled training batches: the inputs a model takes plus the targets a hard-label loss
needs (class indices for a classifier). Unlabeled batches are the model inputs alone, as
calibration data is; a causal LM's labels are its own next tokens, so it needs none."""
from __future__ import annotations

from typing import Any, NamedTuple

import torch


class Labeled(NamedTuple):
    inputs: Any            # what the model is called with: a tensor, a dict of arguments or a tuple
    labels: torch.Tensor   # class indices, one per sample (or per position)


def labeled_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int = 64) -> list[Labeled]:
    """Inputs and their labels cut into Labeled batches of `batch_size` rows, in order."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"labeled_batches: {x.shape[0]} inputs but {y.shape[0]} labels")
    return [Labeled(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)]


def split_batch(batch) -> tuple[Any, torch.Tensor | None]:
    """(inputs, labels) of a Labeled batch; (batch, None) for anything else."""
    if isinstance(batch, Labeled):
        return batch.inputs, batch.labels
    return batch, None


def rebatch(batches: list, batch_size: int) -> list:
    """The same samples cut into batches of `batch_size` rows (the last may be smaller).
    Tensors, dicts of tensors and Labeled batches of those; all batches must be of one kind."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not batches:
        return []
    first = batches[0]
    if isinstance(first, Labeled):
        inputs = rebatch([b.inputs for b in batches], batch_size)
        labels = rebatch([b.labels for b in batches], batch_size)
        return [Labeled(x, y) for x, y in zip(inputs, labels)]
    if isinstance(first, torch.Tensor):
        if len({tuple(b.shape[1:]) for b in batches}) > 1:
            raise ValueError("cannot re-batch: the batches have different shapes after the first dimension; "
                             "leave batch_size unset to train on the batches as they are")
        whole = torch.cat(list(batches))
        return list(whole.split(batch_size))
    if isinstance(first, dict):
        keys = list(first)
        if any(not isinstance(b, dict) or list(b) != keys for b in batches):
            raise ValueError("cannot re-batch: the batches are dicts with different keys")
        shapes = {tuple(b[k].shape[1:]) for b in batches for k in keys[:1]}
        if len(shapes) > 1:
            raise ValueError(f"cannot re-batch: the batches have different sequence shapes ({sorted(shapes)[:3]}); "
                             "leave batch_size unset to train on the batches as they are")
        cols = {k: torch.cat([b[k] for b in batches]) for k in keys}
        n = next(iter(cols.values())).shape[0]
        return [{k: v[i:i + batch_size] for k, v in cols.items()} for i in range(0, n, batch_size)]
    raise ValueError(f"cannot re-batch batches of type {type(first).__name__}: give tensors, dicts of tensors or "
                     "Labeled(inputs, labels)")
