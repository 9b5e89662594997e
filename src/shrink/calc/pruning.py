"""Pruning arithmetic: magnitude pruning on lists of floats, sparsity, sparse FLOPs,
and the rounds and cost of iterative magnitude pruning (the lottery-ticket search).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from shrink.calc import _check as c

_LOG_SLACK = 1e-9  # log(0.2)/log(0.8) style quotients land a hair off exact integers


def magnitude_prune(values: Sequence[float], sparsity: float) -> list[float]:
    """Zero the round(sparsity x n) smallest-|w| values (ties: the earlier one goes first).

    The count uses Python's round(), as torch.nn.utils.prune does: 50% of 9 -> 4
    (seed 001, ch. 3). Seed 000, Ex. 4.1: 50% of [0.5, -0.1, 0.8, -0.02, 0.3, -0.7, 0.05, 0.9]
    leaves [0.5, 0.8, -0.7, 0.9], sum 1.5.
    """
    vals = c.numbers("magnitude_prune", "values", values)
    s = c.fraction("magnitude_prune", "sparsity", sparsity, high_open=False)
    k = round(s * len(vals))
    order = sorted(range(len(vals)), key=lambda i: (abs(vals[i]), i))
    out = list(vals)
    for i in order[:k]:
        out[i] = 0.0
    return out


def keep_top_k(values: Sequence[float], k: int) -> list[float]:
    """Keep the k largest |w|, zero the rest: min L(W_P) s.t. ||W_P||_0 <= k by magnitude
    (seed 002, ch. 1: [5.0, 0.3, -0.4, -2.1, 0.01, 1.7], T=3 -> [5.0, 0, 0, -2.1, 0, 1.7])."""
    vals = c.numbers("keep_top_k", "values", values)
    kk = c.index("keep_top_k", "k", k, len(vals) + 1)
    order = sorted(range(len(vals)), key=lambda i: (-abs(vals[i]), i))
    keep = set(order[:kk])
    return [v if i in keep else 0.0 for i, v in enumerate(vals)]


def threshold_prune(values: Sequence[float], threshold: float) -> list[float]:
    """Zero every value with |w| < threshold; |w| >= threshold survives (seed 003, Your Turn #2)."""
    vals = c.numbers("threshold_prune", "values", values)
    t = c.non_negative("threshold_prune", "threshold", threshold)
    return [v if abs(v) >= t else 0.0 for v in vals]


def sparsity_of(values: Sequence[float]) -> float:
    """Fraction of exact zeros (seed 001, ch. 3: 4 of 9 -> 44%; seed 003: 4 of 8 -> 50%)."""
    vals = c.numbers("sparsity_of", "values", values)
    return sum(1 for v in vals if v == 0.0) / len(vals)


def sparse_matmul_flops(m: int, k: int, n: int, sparsity: float) -> float:
    """Theoretical FLOPs with the zeros skipped: 2mkn x (1 - sparsity) (seed 000, Ex. 4.3)."""
    fn = "sparse_matmul_flops"
    s = c.fraction(fn, "sparsity", sparsity)
    return 2 * c.positive_int(fn, "m", m) * c.positive_int(fn, "k", k) * c.positive_int(fn, "n", n) * (1 - s)


def sparse_speedup_bound(sparsity: float) -> float:
    """Theoretical ceiling 1 / (1 - sparsity): 90% -> 10x (seed 000, ch. 4 key formula, Ex. 4.3)."""
    return 1.0 / (1.0 - c.fraction("sparse_speedup_bound", "sparsity", sparsity))


def imp_rounds(target_sparsity: float, prune_rate: float) -> int:
    """Iterative magnitude pruning rounds N = ceil(log(1 - s) / log(1 - p))
    (seed 000, ch. 5; Ex. 5.1: s=0.8, p=0.2 -> ceil(7.213) = 8; 90% at 20% -> 11).

    A quotient within 1e-9 of an integer counts as that integer, so that s = 1 - (1-p)^N
    gives exactly N rounds despite rounding in the logarithms.
    """
    s = c.fraction("imp_rounds", "target_sparsity", target_sparsity)
    p = c.fraction("imp_rounds", "prune_rate", prune_rate, low_open=True)
    if s == 0:
        return 0
    return math.ceil(math.log(1 - s) / math.log(1 - p) - _LOG_SLACK)


def imp_remaining(params: float, prune_rate: float, rounds: int) -> list[float]:
    """Remaining parameters after each round: params x (1 - p)^i, i = 1..rounds
    (seed 000, Ex. 5.3 and 5.5: 100M, 20%, 5 rounds -> ..., 32.768M)."""
    n = c.positive("imp_remaining", "params", params)
    p = c.fraction("imp_remaining", "prune_rate", prune_rate, low_open=True)
    r = c.positive_int("imp_remaining", "rounds", rounds)
    return [n * (1 - p) ** i for i in range(1, r + 1)]


def imp_sparsity(prune_rate: float, rounds: int) -> float:
    """Sparsity after N rounds = 1 - (1 - p)^N (seed 000, Ex. 5.3: 5 rounds of 20% -> 67% removed)."""
    p = c.fraction("imp_sparsity", "prune_rate", prune_rate, low_open=True)
    r = c.positive_int("imp_sparsity", "rounds", rounds)
    return 1 - (1 - p) ** r


def imp_cost(target_sparsity: float, prune_rate: float, run_cost: float = 1.0) -> float:
    """Cost of the lottery-ticket search = rounds x one full training run (seed 000, ch. 5 key
    formula; Ex. 5.1: 8 rounds x 100 epochs = 800 epochs, 8.0x a single run)."""
    cost = c.positive("imp_cost", "run_cost", run_cost)
    return imp_rounds(target_sparsity, prune_rate) * cost
