"""How much to prune where, and when: per-layer sparsity allocation from measured
loss curves, and the sparsity schedules of gradual and iterative pruning.

allocate_sparsity: layers differ in how much pruning hurts them (an attention
output projection may lose little at 70% while the first MLP loses much at 50%).
Given each layer's loss measured at candidate sparsities (layer_loss of a Wanda or
SparseGPT mask at 0.1, 0.2, ...), choose one level per layer so that the
parameter-weighted sparsity reaches the target at the least summed loss: a
multiple-choice knapsack, solved by dynamic programming over the pruned-parameter
budget discretised into `resolution` units of P / resolution parameters.

- each (layer, level) counts floor(p x s / unit) units (rounded down, so a
  solution the DP accepts really reaches the target: no final repair needed);
- the DP's answer is exact when every p x s is a whole number of units, and in
  general costs no more than the best choice at target + L / resolution (L layers:
  the most the rounding can hide); a final pass then swaps single layers to cheaper
  levels while the true weighted sparsity stays >= target, which recovers what the
  rounding gave away in nearly every case;
- cost O(L x levels x resolution) vector work and L x resolution int16 of memory.

Schedules:
- cubic_schedule: Zhu & Gupta (2017), s_t = s_f + (s_i - s_f)(1 - t/n)^3: prune
  fast while many redundant weights remain, slowly near the target;
- geometric_schedule: iterative magnitude pruning / lottery tickets (Frankle &
  Carbin 2019), each round removing `per_round` of the SURVIVING weights; its
  round count is shrink.calc.pruning.imp_rounds (seed 000, ch. 5).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from shrink.calc.pruning import imp_rounds

_EPS = 1e-9  # p x s / unit landing a hair under a whole number of units counts as it


@dataclass(frozen=True)
class Allocation:
    """ratios    {layer: chosen sparsity} in the order of `params`
    achieved  parameter-weighted sparsity sum(p x s) / sum(p)
    loss      summed loss of the chosen levels
    feasible  the target was reached (else every layer sits at its highest level)
    note      how the answer was found, or why the target could not be met
    """

    ratios: dict[str, float]
    achieved: float
    loss: float
    feasible: bool
    note: str


def allocate_sparsity(
    curves: Mapping[str, Mapping[float, float]],
    params: Mapping[str, int],
    target: float,
    *,
    resolution: int = 10_000,
) -> Allocation:
    """One sparsity per layer minimising the summed loss subject to
    sum(p x s) / sum(p) >= target. curves[layer] = {sparsity: loss} at the candidate
    levels (0.0 with loss 0 is implied unless given); params[layer] = its weight count."""
    names, levels, losses, sizes = _check_inputs(curves, params, target, resolution)
    total = sum(sizes)
    hi = sum(p * max(lv) for p, lv in zip(sizes, levels)) / total
    if hi < target - 1e-12:
        pick = [max(range(len(lv)), key=lv.__getitem__) for lv in levels]
        return _result(names, levels, losses, sizes, pick, False,
                       f"target {target:g} is out of reach: the highest measured levels give {hi:.6g}; "
                       "measure the curves at higher sparsities or lower the target")
    unit = total / resolution
    budget = max(0, math.ceil(target * resolution - _EPS))
    pick = _knapsack(levels, losses, sizes, unit, budget)
    note = f"dynamic programming over {resolution} units of {unit:.4g} parameters"
    if pick is None:  # the rounding hid a feasible answer: start from the highest levels
        pick = [max(range(len(lv)), key=lv.__getitem__) for lv in levels]
        note = "the discretised budget could not reach the target; started from the highest levels"
    pick, swaps = _polish(levels, losses, sizes, pick, target * total)
    if swaps:
        note += f"; {swaps} single-layer swap(s) to cheaper levels after the rounding"
    return _result(names, levels, losses, sizes, pick, True, note)


def _knapsack(levels, losses, sizes, unit, budget):
    """Min summed loss with sum(units) >= budget (saturating at budget). Returns the
    level index per layer, or None when the budget is unreachable in units."""
    inf = float("inf")
    dp = torch.full((budget + 1,), inf, dtype=torch.float64)
    dp[0] = 0.0
    choices, tops = [], []  # per layer: level chosen at each cell; predecessor of the top cell
    for lv, ls, p in zip(levels, losses, sizes):
        new = torch.full_like(dp, inf)
        choice = torch.full((budget + 1,), -1, dtype=torch.int16)
        top_pred = -1
        for k, (s, c) in enumerate(zip(lv, ls)):
            w = math.floor(p * s / unit + _EPS)
            cand = torch.full_like(dp, inf)
            if w <= budget:
                cand[w:] = dp[: budget + 1 - w] + c
            lo = max(0, budget - w)  # every cell >= budget - w lands on the top cell
            best = int(torch.argmin(dp[lo:])) + lo
            cand[budget] = dp[best] + c
            better = cand < new
            new = torch.where(better, cand, new)
            choice[better] = k
            if bool(better[budget]):
                top_pred = best
        dp = new
        choices.append(choice)
        tops.append(top_pred)
    if not math.isfinite(float(dp[budget])):
        return None
    pick = [0] * len(levels)
    b = budget
    for i in range(len(levels) - 1, -1, -1):
        k = int(choices[i][b])
        pick[i] = k
        b = tops[i] if b == budget else b - math.floor(sizes[i] * levels[i][k] / unit + _EPS)
    return pick


def _polish(levels, losses, sizes, pick, need):
    """Greedy single-layer swaps to cheaper levels while sum(p x s) >= need."""
    pick = list(pick)
    pruned = sum(p * lv[k] for p, lv, k in zip(sizes, levels, pick))
    tol = 1e-12 * max(1.0, need)
    swaps = 0
    while True:
        best = None
        for i, (lv, ls, p) in enumerate(zip(levels, losses, sizes)):
            for k in range(len(lv)):
                gain = ls[pick[i]] - ls[k]
                if gain > 0 and pruned - p * lv[pick[i]] + p * lv[k] >= need - tol:
                    if best is None or gain > best[0]:
                        best = (gain, i, k)
        if best is None:
            return pick, swaps
        _, i, k = best
        pruned += sizes[i] * (levels[i][k] - levels[i][pick[i]])
        pick[i] = k
        swaps += 1


def _result(names, levels, losses, sizes, pick, feasible, note) -> Allocation:
    ratios = {n: float(lv[k]) for n, lv, k in zip(names, levels, pick)}
    achieved = sum(p * lv[k] for p, lv, k in zip(sizes, levels, pick)) / sum(sizes)
    loss = float(sum(ls[k] for ls, k in zip(losses, pick)))
    return Allocation(ratios=ratios, achieved=achieved, loss=loss, feasible=feasible, note=note)


def _check_inputs(curves, params, target, resolution):
    if not isinstance(params, Mapping) or not params:
        raise ValueError("allocate_sparsity: params must be a non-empty mapping {layer: number of weights}")
    if not isinstance(curves, Mapping):
        raise ValueError("allocate_sparsity: curves must be a mapping {layer: {sparsity: loss}}")
    missing = [n for n in params if n not in curves]
    extra = [n for n in curves if n not in params]
    if missing or extra:
        raise ValueError(f"allocate_sparsity: curves and params must name the same layers "
                         f"(no curve for {missing[:5]}, no params for {extra[:5]})")
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 <= float(target) < 1.0:
        raise ValueError(f"allocate_sparsity: target must be a parameter-weighted sparsity in [0, 1), got {target!r}")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or not 1 <= resolution <= 10_000_000:
        raise ValueError(f"allocate_sparsity: resolution must be an integer in [1, 1e7], got {resolution!r}")
    names, levels, losses, sizes = [], [], [], []
    for n, p in params.items():
        if isinstance(p, bool) or not isinstance(p, int) or p < 1:
            raise ValueError(f"{n}: params must be a positive integer weight count, got {p!r}")
        curve = curves[n]
        if not isinstance(curve, Mapping) or not curve:
            raise ValueError(f"{n}: curve must be a non-empty mapping {{sparsity: loss}}")
        pts = {0.0: 0.0}
        for s, c in curve.items():
            ok_s = not isinstance(s, bool) and isinstance(s, (int, float)) and 0.0 <= float(s) < 1.0
            if not ok_s:
                raise ValueError(f"{n}: curve level {s!r} is not a sparsity in [0, 1)")
            if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(float(c)):
                raise ValueError(f"{n}: loss at sparsity {s!r} must be a finite number, got {c!r}")
            pts[float(s)] = float(c)
        lv = sorted(pts)
        names.append(n)
        levels.append(lv)
        losses.append([pts[s] for s in lv])
        sizes.append(p)
    if max(len(lv) for lv in levels) > 30_000:
        raise ValueError("allocate_sparsity: at most 30000 levels per layer")
    return names, levels, losses, sizes


def cubic_schedule(total_steps_or_rounds: int, final: float, initial: float = 0.0) -> list[float]:
    """Zhu & Gupta's gradual pruning: s_t = final + (initial - final)(1 - t/n)^3 for
    t = 1..n (n = total_steps_or_rounds); the last value is exactly `final`."""
    n = total_steps_or_rounds
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"cubic_schedule: total_steps_or_rounds must be a positive integer, got {n!r}")
    for label, v in (("final", final), ("initial", initial)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) < 1.0:
            raise ValueError(f"cubic_schedule: {label} sparsity must be in [0, 1), got {v!r}")
    if initial > final:
        raise ValueError(f"cubic_schedule: initial sparsity {initial} is above final {final}; pruning only grows")
    out = [final + (initial - final) * (1 - t / n) ** 3 for t in range(1, n)]
    return [float(s) for s in out] + [float(final)]


def geometric_schedule(target: float, per_round: float) -> list[float]:
    """Cumulative sparsity after each round of iterative magnitude pruning that removes
    `per_round` of the surviving weights: 1 - (1 - p)^k, the last round clipped to hit
    `target` exactly. The number of rounds is shrink.calc.pruning.imp_rounds (80% at
    20% per round: 8 rounds; 90%: 11)."""
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 <= float(target) < 1.0:
        raise ValueError(f"geometric_schedule: target sparsity must be in [0, 1), got {target!r}")
    if isinstance(per_round, bool) or not isinstance(per_round, (int, float)) or not 0.0 < float(per_round) < 1.0:
        raise ValueError("geometric_schedule: per_round must be a fraction in (0, 1) of the surviving weights, "
                         f"got {per_round!r}")
    rounds = imp_rounds(float(target), float(per_round))
    steps = [min(1 - (1 - per_round) ** k, float(target)) for k in range(1, rounds)]
    return steps + ([float(target)] if rounds else [])
