"""Importance scores for structured pruning (whole output neurons, hidden MLP
neurons, attention heads), and the choice of which units stay.

Removing hidden neuron j of an MLP removes row j of every producer (up, and gate
in a gated MLP) and column j of the consumer (down); the surgery that does it lives
in shrink.surgery. Here only the numbers:

- "l1" / "l2": the sum of the norms of every slice that goes away with the unit
  (producer rows plus the consumer column), the magnitude importance of a coupled
  group as torch-pruning and LLM-Pruner's element-wise criterion use it. Cheap,
  data-free; it mixes the scales of the matrices (a producer row's norm grows with
  its fan-in, so the consumer column weighs less in wide layers), which is fine for
  a ranking inside one layer, not across layers;
- "activation": ||a_j||_2 x ||W_down[:, j]||_2, the L2 norm of neuron j's output over
  calibration tokens (the consumer's input feature j) times the consumer column's
  L2 norm: Wanda's score (|w| x ||x||) summed over a column in the L2 sense. It is
  the size of what the neuron actually contributes to the next layer's output, so it
  sees dead or rarely-firing neurons that magnitude cannot (producers are then used
  only to check the width).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from shrink.algos.magnitude import check_tensor

SCORES = ("l1", "l2")
NEURON_SCORES = ("l1", "l2", "activation")


def row_scores(weight: torch.Tensor, score: str = "l1", *, name: str = "weight") -> torch.Tensor:
    """Norm of each output row of [out, in] (the importance of each output neuron): float [out]."""
    check_tensor(weight, name, dims=2)
    return _norm(weight, 1, _score(score, SCORES, name))


def neuron_scores(
    producers: Sequence[torch.Tensor],
    consumer: torch.Tensor | None = None,
    score: str = "l1",
    act_norm: torch.Tensor | None = None,
    *,
    name: str = "mlp",
) -> torch.Tensor:
    """Importance of each hidden neuron of width W: producers are [W, in] (up, gate),
    consumer [out, W] (down). "l1"/"l2": sum of the producer rows' norms plus the
    consumer column's norm; "activation": act_norm[j] x ||consumer[:, j]||_2 (needs
    both). Returns float32 [W] (float64 if an input is float64)."""
    how = _score(score, NEURON_SCORES, name)
    if isinstance(producers, torch.Tensor) or not isinstance(producers, Sequence):
        raise ValueError(f"{name}: producers must be a sequence of [width, in] weights (e.g. [up] or [gate, up])")
    width = None
    for i, p in enumerate(producers):
        check_tensor(p, f"{name}: producer {i}", dims=2)
        if width is not None and p.shape[0] != width:
            raise ValueError(f"{name}: producer {i} has {p.shape[0]} rows, producer 0 has {width}; "
                             "producers of one hidden layer share its width")
        width = p.shape[0]
    if consumer is not None:
        check_tensor(consumer, f"{name}: consumer", dims=2)
        if width is not None and consumer.shape[1] != width:
            raise ValueError(f"{name}: consumer has {consumer.shape[1]} input columns but the producers have "
                             f"{width} rows; pass the consumer as [out, width]")
        width = consumer.shape[1]
    if width is None:
        raise ValueError(f"{name}: give at least one producer or a consumer to score")
    tensors = list(producers) + ([] if consumer is None else [consumer])
    dt = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    if how == "activation":
        if consumer is None or act_norm is None:
            raise ValueError(f"{name}: score='activation' needs the consumer weight and act_norm "
                             "(the L2 norm of each hidden neuron's output over calibration tokens)")
        check_tensor(act_norm, f"{name}: act_norm", dims=1, what="act_norm")
        if act_norm.shape[0] != width or bool((act_norm < 0).any()):
            raise ValueError(f"{name}: act_norm must be {width} non-negative norms (one per hidden neuron), "
                             f"got shape {tuple(act_norm.shape)}")
        return act_norm.detach().to(dt) * _norm(consumer, 0, "l2").to(dt)
    total = torch.zeros(width, dtype=dt)
    for p in producers:
        total += _norm(p, 1, how).to(dt)
    if consumer is not None:
        total += _norm(consumer, 0, how).to(dt)
    return total


def group_scores(scores: torch.Tensor, group_size: int, *, name: str = "scores") -> torch.Tensor:
    """Sum of consecutive runs of group_size scores (per attention head or channel group):
    [width] -> [width // group_size]."""
    check_tensor(scores, name, dims=1, what="scores")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"{name}: group_size must be a positive integer, got {group_size!r}")
    if scores.shape[0] % group_size:
        raise ValueError(f"{name}: {scores.shape[0]} scores do not split into groups of {group_size} "
                         "(e.g. hidden size = heads x head_dim); check the group size")
    return scores.detach().reshape(-1, group_size).sum(1)


def keep_indices(
    scores: torch.Tensor,
    fraction: float | None = None,
    *,
    count: int | None = None,
    name: str = "weight",
    multiple_of: int = 1,
) -> torch.Tensor:
    """Sorted indices (int64) of the units kept after removing the lowest-scoring ones:
    round(fraction x n) of them, or `count`; ties: the lower index is removed first.

    multiple_of: the number KEPT is made a multiple of it (kernels like widths that are
    multiples of 8 or 64) by rounding the removed count to the nearest value that
    allows it (half-way: remove fewer). Keeping all n units is always allowed, so a
    small removal may round to none. When no multiple fits between multiple_of and n,
    nothing is removed.
    """
    check_tensor(scores, name, dims=1, what="scores")
    n = scores.shape[0]
    if isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or multiple_of < 1:
        raise ValueError(f"{name}: multiple_of must be a positive integer, got {multiple_of!r}")
    if (fraction is None) == (count is None):
        raise ValueError(f"{name}: give exactly one of fraction (of units removed) or count (units removed)")
    if count is not None:
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= n:
            raise ValueError(f"{name}: count must be an integer in [0, {n}] (units removed), got {count!r}")
        r = count
    else:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
            raise ValueError(f"{name}: fraction must be a number in [0, 1] (of units removed), got {fraction!r}")
        r = round(float(fraction) * n)
    if r >= n:
        raise ValueError(f"{name}: removing every unit of {name} ({r} of {n}) leaves nothing; "
                         "lower the fraction or remove the layer itself")
    if r and multiple_of > 1:
        kept = n - r
        lo = kept // multiple_of * multiple_of
        options = [k for k in (lo, lo + multiple_of) if multiple_of <= k <= n] + [n]
        kept = min(options, key=lambda k: (abs(k - kept), -k))
        r = n - kept
    order = torch.sort(scores.detach(), stable=True).indices  # ascending; equal: lower index first
    return torch.sort(order[r:]).values


def _score(score, allowed, name: str) -> str:
    if score not in allowed:
        raise ValueError(f"{name}: score must be one of {', '.join(allowed)}; got {score!r}")
    return score


def _norm(w: torch.Tensor, dim: int, how: str) -> torch.Tensor:
    x = w.detach()
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.to(dt)
    return x.abs().sum(dim) if how == "l1" else torch.linalg.vector_norm(x, 2, dim)
