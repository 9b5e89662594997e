"""Mixed precision: one bit width per layer, the least total error that fits a byte budget.

Two steps, both pure functions:

1. `layer_sensitivity` quantizes one weight at every candidate width and
   records the error it causes and the bytes it stores (codes + scales, as
   QTensor.nbytes counts them, so per-group scales are paid for).
   With the layer's input Hessian H the error is tr((W - Q) H (W - Q)^T),
   the output error that rtn and gptq report; without one it is the summed
   squared weight error (weight MSE x numel), so layers of different sizes
   add up on one scale.
2. `allocate_bits` picks one width per layer to minimise the summed error
   subject to sum(bytes) <= budget: a multiple-choice knapsack.

The allocator works in three stages:
- Lagrangian sweep. For a multiplier lam every layer independently takes
  argmin error + lam * bytes; the choices change only at the slopes of each
  layer's lower convex hull of (bytes, error). Walking all hull segments in
  order of error saved per byte visits every breakpoint of lam exactly (no
  bisection tolerance), and stopping before the first segment that does not
  fit gives the Lagrangian solution at the budget.
- Greedy fill. Leftover bytes buy the upgrade (any width, hull or not) with
  the best error saved per byte that still fits, until none fits.
- Branch and bound. The LP relaxation of the same walk (the last segment
  taken fractionally) is a lower bound on every allocation's error; a
  depth-first search with that bound proves the greedy answer optimal or
  replaces it, within `search_nodes` bound evaluations. Allocation.optimal
  says whether the search finished; error_bound is the best lower bound known.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Sequence

import torch

from shrink.algos.gptq import gptq
from shrink.algos.rtn import rtn
from shrink.quant import QuantSpec

METHODS = ("rtn", "gptq")


def default_spec_for_bits(bits: int) -> QuantSpec:
    """Symmetric integer codes with one fp16 scale per output channel; 16 means fp16."""
    if bits == 16:
        return QuantSpec.from_name("fp16")
    return QuantSpec(bits=bits)


@dataclass(frozen=True)
class Sensitivity:
    """What each candidate width costs one layer.

    name     the layer (unique within one allocation)
    errors   bits -> error (output error with a Hessian, summed squared weight error without)
    nbytes   bits -> stored bytes of the quantized weight (codes + scales + zero-points)
    params   weights in the layer (for bits per weight)
    """

    name: str
    errors: dict[int, float]
    nbytes: dict[int, int]
    params: int

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Sensitivity.name must be a non-empty string, got {self.name!r}")
        if isinstance(self.params, bool) or not isinstance(self.params, int) or self.params < 1:
            raise ValueError(f"Sensitivity {self.name!r}: params must be a positive integer, got {self.params!r}")
        if not self.errors:
            raise ValueError(f"Sensitivity {self.name!r}: errors is empty; give at least one width")
        if set(self.errors) != set(self.nbytes):
            raise ValueError(
                f"Sensitivity {self.name!r}: errors has widths {sorted(self.errors)} but nbytes has "
                f"{sorted(self.nbytes)}; both need the same widths"
            )
        for b in self.errors:
            if isinstance(b, bool) or not isinstance(b, int) or b < 1:
                raise ValueError(f"Sensitivity {self.name!r}: width {b!r} is not a positive integer")
        errors, nbytes = {}, {}
        for b in sorted(self.errors):
            e, n = self.errors[b], self.nbytes[b]
            if isinstance(e, bool) or not isinstance(e, (int, float)) or not math.isfinite(e) or e < 0:
                raise ValueError(f"Sensitivity {self.name!r}: errors[{b}] = {e!r} must be finite and >= 0")
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"Sensitivity {self.name!r}: nbytes[{b}] = {n!r} must be a positive integer")
            errors[b], nbytes[b] = float(e), n
        # own copies: the caller's dicts may change later, this record may not
        object.__setattr__(self, "errors", errors)
        object.__setattr__(self, "nbytes", nbytes)


@dataclass(frozen=True)
class Allocation:
    """The chosen widths and what they cost.

    bits             layer name -> chosen width
    total_bytes      stored bytes of all layers at those widths
    bits_per_weight  8 * total_bytes / total params
    total_error      sum of the chosen errors
    feasible         False when even the smallest widths exceed the budget (then
                     `bits` holds those smallest widths and `note` says the minimum)
    note             how the answer was reached, or why there is none
    budget_bytes     the byte budget that was applied
    optimal          the branch and bound finished: no allocation within budget has less error
    error_bound      a lower bound on the error of any allocation within budget
                     (equal to total_error when optimal; inf when none fits)
    """

    bits: dict[str, int]
    total_bytes: int
    bits_per_weight: float
    total_error: float
    feasible: bool
    note: str
    budget_bytes: int = 0
    optimal: bool = False
    error_bound: float = 0.0


def layer_sensitivity(
    weight: torch.Tensor,
    hessian: torch.Tensor | None = None,
    *,
    name: str,
    candidates: Sequence[int] = (2, 3, 4, 8),
    spec_for_bits: Callable[[int], QuantSpec] = default_spec_for_bits,
    method: str = "rtn",
) -> Sensitivity:
    """Quantize `weight` [out, in] at each candidate width and measure error and bytes.

    hessian: [in, in] (2/n X X^T of the layer's inputs) or None for the weight error.
    spec_for_bits(b) gives the QuantSpec for width b (its .bits must be b).
    method "gptq" needs a Hessian; "rtn" rounds to nearest.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"layer_sensitivity: name must be a non-empty string (the layer), got {name!r}")
    if method not in METHODS:
        raise ValueError(f"layer_sensitivity: method must be one of {', '.join(METHODS)}; got {method!r}")
    if method == "gptq" and hessian is None:
        raise ValueError("layer_sensitivity: method='gptq' needs the layer's Hessian; pass hessian= or use 'rtn'")
    widths = list(candidates)
    if not widths:
        raise ValueError("layer_sensitivity: candidates is empty; give at least one bit width")
    for b in widths:
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"layer_sensitivity: candidates must be positive integers, got {b!r}")
    if len(set(widths)) != len(widths):
        raise ValueError(f"layer_sensitivity: candidates {widths} repeat a width")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"layer_sensitivity {name!r}: weight must be a 2-D [out, in] tensor, got {shape}")
    errors: dict[int, float] = {}
    nbytes: dict[int, int] = {}
    for b in sorted(widths):
        spec = spec_for_bits(b)
        if not isinstance(spec, QuantSpec) or spec.bits != b:
            got = f"bits={spec.bits}" if isinstance(spec, QuantSpec) else type(spec).__name__
            raise ValueError(f"layer_sensitivity: spec_for_bits({b}) must return a QuantSpec with bits={b}, got {got}")
        if method == "gptq":
            res = gptq(weight, hessian, spec)
        else:
            res = rtn(weight, spec, hessian=hessian)
        # rtn without a Hessian reports the mean; the sum makes layers of different sizes comparable
        errors[b] = res.loss if hessian is not None else res.loss * weight.numel()
        nbytes[b] = res.qtensor.nbytes
    return Sensitivity(name=name, errors=errors, nbytes=nbytes, params=int(weight.numel()))


def allocate_bits(
    sensitivities: Sequence[Sensitivity],
    *,
    bits_per_weight: float | None = None,
    max_bytes: int | None = None,
    search_nodes: int = 20_000,
) -> Allocation:
    """One width per layer minimising the summed error within the byte budget.

    The budget is max_bytes, or bits_per_weight * total params / 8 bytes (rounded
    down), or the smaller of the two when both are given; bytes are the true
    stored bytes (scales included). search_nodes caps the branch and bound
    (0: Lagrangian sweep and greedy fill only).
    """
    sens = list(sensitivities)
    budget = _budget(sens, bits_per_weight, max_bytes)
    if isinstance(search_nodes, bool) or not isinstance(search_nodes, int) or search_nodes < 0:
        raise ValueError(f"allocate_bits: search_nodes must be a non-negative integer, got {search_nodes!r}")
    params = sum(s.params for s in sens)
    layers = [_frontier(s) for s in sens]

    def result(choice: list[int], feasible: bool, note: str, optimal: bool, bound: float) -> Allocation:
        total_bytes = sum(layers[i][c][0] for i, c in enumerate(choice))
        total_error = sum(layers[i][c][1] for i, c in enumerate(choice))
        return Allocation(
            bits={s.name: layers[i][c][2] for i, (s, c) in enumerate(zip(sens, choice))},
            total_bytes=total_bytes, bits_per_weight=8.0 * total_bytes / params, total_error=total_error,
            feasible=feasible, note=note, budget_bytes=budget, optimal=optimal,
            error_bound=total_error if optimal else bound)

    smallest = [0] * len(layers)
    min_bytes = sum(opts[0][0] for opts in layers)
    if min_bytes > budget:
        note = (f"infeasible: the budget is {budget} bytes ({8.0 * budget / params:.3f} bits per weight) but even "
                f"the smallest widths need {min_bytes} bytes ({8.0 * min_bytes / params:.3f} bits per weight); "
                "raise the budget or add smaller candidate widths")
        return result(smallest, False, note, False, math.inf)

    hulls = [_lower_hull(opts) for opts in layers]
    choice, bound = _lagrangian(layers, hulls, budget)
    choice = _greedy_fill(layers, choice, budget)
    if search_nodes == 0:
        return result(choice, True, "Lagrangian sweep + greedy fill (no search)", False, bound)
    best, nodes, done = _branch_and_bound(layers, hulls, budget, choice, search_nodes)
    if done:
        return result(best, True, f"optimal: proven by branch and bound ({nodes} nodes)", True, bound)
    err = sum(layers[i][c][1] for i, c in enumerate(best))
    return result(best, True, f"best found: search stopped after {nodes} nodes; at most {err - bound:.4g} "
                  "above the optimum (LP lower bound)", False, bound)


# ---------------------------------------------------------------- internals

# Layer options: (bytes, error, bits), sorted by bytes; hull segments: (saved per byte, layer, from, to).


def _budget(sens: list[Sensitivity], bpw, max_bytes) -> int:
    if not sens:
        raise ValueError("allocate_bits: sensitivities is empty; give at least one layer")
    for s in sens:
        if not isinstance(s, Sensitivity):
            raise TypeError(f"allocate_bits: expected Sensitivity records, got {type(s).__name__}")
    names = [s.name for s in sens]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"allocate_bits: layer names must be unique; repeated: {dup}")
    if bpw is None and max_bytes is None:
        raise ValueError("allocate_bits: give a budget, bits_per_weight= or max_bytes=")
    budgets = []
    if bpw is not None:
        if isinstance(bpw, bool) or not isinstance(bpw, (int, float)) or not math.isfinite(bpw) or bpw <= 0:
            raise ValueError(f"allocate_bits: bits_per_weight must be a positive number, got {bpw!r}")
        # exact arithmetic on the given float, rounded down: the budget is never exceeded
        budgets.append(math.floor(Fraction(bpw) * sum(s.params for s in sens) / 8))
    if max_bytes is not None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
            raise ValueError(f"allocate_bits: max_bytes must be a positive integer, got {max_bytes!r}")
        budgets.append(max_bytes)
    return min(budgets)


def _frontier(s: Sensitivity) -> list[tuple[int, float, int]]:
    """The layer's undominated options, bytes ascending and error strictly descending:
    an option that costs more bytes and saves no error is never needed."""
    opts = sorted(((s.nbytes[b], s.errors[b], b) for b in s.errors), key=lambda o: (o[0], o[1], o[2]))
    keep: list[tuple[int, float, int]] = []
    for o in opts:
        if keep and (o[1] >= keep[-1][1] or o[0] == keep[-1][0]):
            continue
        keep.append(o)
    return keep


def _lower_hull(opts: list[tuple[int, float, int]]) -> list[int]:
    """Indices of the lower convex hull of (bytes, error), from the cheapest option."""
    hull: list[int] = []
    for i, (b, e, _) in enumerate(opts):
        while len(hull) >= 2:
            (b1, e1, _), (b2, e2, _) = opts[hull[-2]], opts[hull[-1]]
            # drop the middle point when it lies on or above the chord (cross product >= 0)
            if (e2 - e1) * (b - b1) >= (e - e1) * (b2 - b1):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def _segments(layers, hulls) -> list[tuple[float, int, int, int]]:
    segs = []
    for i in range(len(layers)):
        h, opts = hulls[i], layers[i]
        for a, b in zip(h, h[1:]):
            segs.append(((opts[a][1] - opts[b][1]) / (opts[b][0] - opts[a][0]), i, a, b))
    # per layer the hull's savings per byte decrease, so this order keeps each layer's segments in turn
    segs.sort(key=lambda t: (-t[0], t[1], t[2]))
    return segs


def _lagrangian(layers, hulls, budget: int) -> tuple[list[int], float]:
    """(the Lagrangian solution at the budget, the LP lower bound on the error)."""
    choice = [0] * len(layers)
    used = sum(opts[0][0] for opts in layers)
    err = sum(opts[0][1] for opts in layers)
    for rate, i, a, b in _segments(layers, hulls):
        cost = layers[i][b][0] - layers[i][a][0]
        if used + cost > budget:
            # the LP relaxation takes this segment in part; the integer solution stops here
            return choice, err - rate * (budget - used)
        used, err, choice[i] = used + cost, err + layers[i][b][1] - layers[i][a][1], b
    return choice, err


def _greedy_fill(layers, choice: list[int], budget: int) -> list[int]:
    """Spend the leftover bytes on the upgrades that save the most error per byte."""
    choice = list(choice)
    used = sum(layers[i][c][0] for i, c in enumerate(choice))
    while True:
        best = None
        for i, c in enumerate(choice):
            b0, e0, _ = layers[i][c]
            for j in range(c + 1, len(layers[i])):
                b1, e1, _ = layers[i][j]
                if used + b1 - b0 <= budget:
                    rate = (e0 - e1) / (b1 - b0)
                    if best is None or rate > best[0]:
                        best = (rate, i, j)
        if best is None:
            return choice
        _, i, j = best
        used += layers[i][j][0] - layers[i][choice[i]][0]
        choice[i] = j


def _branch_and_bound(layers, hulls, budget: int, start: list[int], max_nodes: int):
    """Depth-first search over layers with the LP bound; returns (best, nodes, finished)."""
    n = len(layers)
    # decide the layers with the most error at stake first: the bound tightens fastest
    order = sorted(range(n), key=lambda i: -(layers[i][0][1] - layers[i][-1][1]))
    # suffix data in search order: cheapest bytes/error of the layers still open, and their hull segments
    min_b = [0] * (n + 1)
    min_e = [0.0] * (n + 1)
    for d in range(n - 1, -1, -1):
        min_b[d] = min_b[d + 1] + layers[order[d]][0][0]
        min_e[d] = min_e[d + 1] + layers[order[d]][0][1]
    depth_of = {i: d for d, i in enumerate(order)}
    segs = [(depth_of[i], layers[i][b][0] - layers[i][a][0], layers[i][b][1] - layers[i][a][1], rate)
            for rate, i, a, b in _segments(layers, hulls)]

    def lp_bound(d: int, room: int) -> float:
        """Least error of the open layers d.. (fractional choices) within `room` bytes."""
        room -= min_b[d]
        if room < 0:
            return math.inf
        err = min_e[d]
        for depth, cost, delta, rate in segs:
            if depth < d:
                continue
            if cost <= room:
                room -= cost
                err += delta
            else:
                return err - rate * room
        return err

    best = list(start)
    best_err = sum(layers[i][c][1] for i, c in enumerate(best))
    path = [0] * n
    nodes = 0
    # an explicit stack (depth, bytes used, error so far, next option to try): models have
    # more layers than Python's recursion limit allows frames
    stack = [[0, 0, 0.0, len(layers[order[0]]) - 1]]
    while stack:
        top = stack[-1]
        d, used, err, c = top
        if c < 0:
            stack.pop()
            continue
        top[3] = c - 1  # options from most bytes down: good allocations come early and prune more
        b, e, _ = layers[order[d]][c]
        if used + b + min_b[d + 1] > budget:
            continue
        nodes += 1
        if nodes > max_nodes:
            return best, max_nodes, False
        bound = err + e + lp_bound(d + 1, budget - used - b)
        # a relative margin so that rounding in the bound never discards a true improvement
        if bound >= best_err - 1e-12 * abs(best_err):
            continue
        path[d] = c
        if d + 1 < n:
            stack.append([d + 1, used + b, err + e, len(layers[order[d + 1]]) - 1])
        else:  # a complete allocation below the incumbent (at a leaf the bound is its error)
            best_err = err + e
            best = [0] * n
            for k, i in enumerate(order):
                best[i] = path[k]
    return best, nodes, True
