"""allocate_sparsity against brute force, and the cubic / geometric schedules
(the latter agreeing with shrink.calc.pruning's lottery-ticket rounds)."""
from __future__ import annotations

import itertools
import math
import random

import pytest

from shrink.algos.sparsity import Allocation, allocate_sparsity, cubic_schedule, geometric_schedule
from shrink.calc.pruning import imp_rounds, imp_sparsity

LEVELS = [i / 10 for i in range(1, 10)]


def brute_force(curves, params, target):
    """The least summed loss over every combination of levels meeting the target."""
    names = list(params)
    total = sum(params.values())
    best = None
    options = [sorted({0.0: 0.0, **curves[n]}.items()) for n in names]
    for combo in itertools.product(*options):
        if sum(params[n] * s for n, (s, _) in zip(names, combo)) / total >= target - 1e-12:
            loss = sum(c for _, c in combo)
            best = loss if best is None else min(best, loss)
    return best


def _random_case(rng, layers):
    params = {f"layer{i}": rng.randint(50, 5000) for i in range(layers)}
    curves = {}
    for n in params:
        a, e = rng.uniform(0.1, 10), rng.uniform(1, 4)
        curves[n] = {s: a * s ** e + rng.uniform(0, 0.05) for s in LEVELS}
    return curves, params


def test_matches_brute_force_within_the_stated_bound():
    rng = random.Random(0)
    exact = 0
    for trial in range(60):
        layers = rng.randint(2, 4)
        curves, params = _random_case(rng, layers)
        target = rng.uniform(0.05, 0.85)
        res = allocate_sparsity(curves, params, target)
        assert isinstance(res, Allocation) and res.feasible
        assert list(res.ratios) == list(params)
        total = sum(params.values())
        assert res.achieved == pytest.approx(sum(params[n] * s for n, s in res.ratios.items()) / total)
        assert res.achieved >= target - 1e-12
        assert res.loss == pytest.approx(sum(curves[n][s] if s else 0.0 for n, s in res.ratios.items()))
        best = brute_force(curves, params, target)
        assert res.loss >= best - 1e-9  # it is feasible, so it cannot beat the optimum
        # the documented bound: no worse than the optimum at target + layers / resolution
        assert res.loss <= brute_force(curves, params, target + layers / 10_000) + 1e-9
        exact += math.isclose(res.loss, best, rel_tol=1e-12, abs_tol=1e-12)
    assert exact >= 57  # the rounding almost never costs anything


def test_exact_on_whole_units():
    curves = {"a": {0.25: 1.0, 0.5: 3.0, 0.75: 9.0}, "b": {0.25: 0.5, 0.5: 1.0, 0.75: 4.0},
              "c": {0.25: 2.0, 0.5: 6.0, 0.75: 7.0}}
    params = {"a": 400, "b": 400, "c": 200}
    for target in (0.1, 0.3, 0.45, 0.5, 0.6, 0.7):
        res = allocate_sparsity(curves, params, target, resolution=1000)
        assert res.loss == pytest.approx(brute_force(curves, params, target)), target


def test_beats_uniform_on_skewed_layers():
    # attention barely notices pruning, the MLP suffers: a non-uniform split must win
    params = {"attn": 1000, "mlp": 3000, "head": 500}
    curves = {"attn": {s: 0.1 * s for s in LEVELS}, "mlp": {s: 5 * s ** 3 for s in LEVELS},
              "head": {s: 20 * s ** 2 for s in LEVELS}}
    res = allocate_sparsity(curves, params, 0.5)
    uniform = sum(c[0.5] for c in curves.values())
    assert res.feasible and res.achieved >= 0.5
    assert res.loss < 0.8 * uniform
    assert res.ratios["attn"] > 0.5 > res.ratios["head"]
    assert res.loss == pytest.approx(brute_force(curves, params, 0.5))


def test_zero_target_and_explicit_zero_level():
    curves = {"a": {0.5: 1.0}, "b": {0.0: 0.2, 0.5: 0.1}}  # b measured worse at 0 than at 0.5
    res = allocate_sparsity(curves, {"a": 10, "b": 10}, 0.0)
    assert res.ratios == {"a": 0.0, "b": 0.5} and res.loss == pytest.approx(0.1)


def test_infeasible_target_reports_it():
    curves = {"a": {0.5: 1.0}, "b": {0.3: 1.0}}
    res = allocate_sparsity(curves, {"a": 100, "b": 100}, 0.45)
    assert not res.feasible and res.ratios == {"a": 0.5, "b": 0.3}
    assert res.achieved == pytest.approx(0.4) and "out of reach" in res.note


def test_allocation_errors():
    with pytest.raises(ValueError, match="same layers"):
        allocate_sparsity({"a": {0.5: 1.0}}, {"a": 10, "b": 10}, 0.3)
    with pytest.raises(ValueError, match="target must be"):
        allocate_sparsity({"a": {0.5: 1.0}}, {"a": 10}, 1.0)
    with pytest.raises(ValueError, match=r"^a: curve level 1.0 is not a sparsity"):
        allocate_sparsity({"a": {1.0: 1.0}}, {"a": 10}, 0.3)
    with pytest.raises(ValueError, match=r"^a: loss at sparsity 0.5 must be a finite"):
        allocate_sparsity({"a": {0.5: float("nan")}}, {"a": 10}, 0.3)
    with pytest.raises(ValueError, match=r"^a: params must be a positive integer"):
        allocate_sparsity({"a": {0.5: 1.0}}, {"a": 0}, 0.3)


def test_cubic_schedule():
    s = cubic_schedule(10, 0.8)
    assert len(s) == 10 and s[-1] == 0.8
    assert all(b >= a for a, b in zip(s, s[1:]))
    for t, v in enumerate(s, start=1):
        assert v == pytest.approx(0.8 + (0.0 - 0.8) * (1 - t / 10) ** 3)
    # fast early, slow late: the first step prunes more than the last
    assert s[0] > s[-1] - s[-2]
    s = cubic_schedule(4, 0.9, initial=0.5)
    assert s[-1] == 0.9 and s[0] == pytest.approx(0.9 - 0.4 * 0.75 ** 3)
    assert cubic_schedule(1, 0.7) == [0.7]
    assert cubic_schedule(3, 0.6, 0.6) == [0.6, 0.6, 0.6]
    for bad in [dict(total_steps_or_rounds=0, final=0.5), dict(total_steps_or_rounds=3, final=1.0),
                dict(total_steps_or_rounds=3, final=0.5, initial=0.7), dict(total_steps_or_rounds=2.5, final=0.5)]:
        with pytest.raises(ValueError, match="cubic_schedule"):
            cubic_schedule(**bad)


def test_geometric_schedule_agrees_with_the_seed_rounds():
    # seed 000, Ex. 5.1: 80% at 20% per round needs ceil(7.213) = 8 rounds; 90%: 11
    s = geometric_schedule(0.8, 0.2)
    assert len(s) == 8 == imp_rounds(0.8, 0.2) and s[-1] == 0.8
    assert len(geometric_schedule(0.9, 0.2)) == 11 == imp_rounds(0.9, 0.2)
    # seed 000, Ex. 5.3: 5 rounds of 20% remove 67.2%
    for k, v in enumerate(s[:-1], start=1):
        assert v == pytest.approx(imp_sparsity(0.2, k))
    assert s[4] == pytest.approx(0.67232)
    for target in (0.3, 0.5, 0.67232, 0.8, 0.85, 0.9, 0.95, 0.99):
        for p in (0.1, 0.2, 0.35, 0.5):
            sch = geometric_schedule(target, p)
            assert len(sch) == imp_rounds(target, p) and sch[-1] == target
            assert all(0 < a < b <= target for a, b in zip(sch, sch[1:]))
    assert geometric_schedule(1 - 0.8 ** 5, 0.2)[-1] == 1 - 0.8 ** 5 and len(geometric_schedule(1 - 0.8 ** 5, 0.2)) == 5
    assert geometric_schedule(0.0, 0.2) == []
    assert geometric_schedule(0.1, 0.2) == [0.1]  # one round, clipped to the target
    for bad in [(1.0, 0.2), (-0.1, 0.2), (0.5, 0.0), (0.5, 1.0), (float("nan"), 0.2)]:
        with pytest.raises(ValueError, match="geometric_schedule"):
            geometric_schedule(*bad)
