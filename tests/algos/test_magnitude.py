"""magnitude_mask / global_magnitude_masks: exact counts, ties by position, agreement
with shrink.calc.pruning.magnitude_prune (the seeds' worked examples), bad input."""
from __future__ import annotations

import random

import pytest
import torch

from shrink.algos.magnitude import global_magnitude_masks, magnitude_mask
from shrink.calc.pruning import magnitude_prune


def _expected_kept(values, sparsity):
    """calc.pruning's rule spelled out: prune the round(s x n) first by (|w|, index)."""
    order = sorted(range(len(values)), key=lambda i: (abs(values[i]), i))
    gone = set(order[:round(sparsity * len(values))])
    return [i not in gone for i in range(len(values))]


def test_seed_example_50_percent_of_eight():
    # seed 000, Ex. 4.1: 50% of these leaves [0.5, 0.8, -0.7, 0.9], sum 1.5
    w = torch.tensor([0.5, -0.1, 0.8, -0.02, 0.3, -0.7, 0.05, 0.9], dtype=torch.float64)
    mask = magnitude_mask(w, 0.5)
    assert (w * mask).tolist() == magnitude_prune(w.tolist(), 0.5)
    assert w[mask].tolist() == [0.5, 0.8, -0.7, 0.9]
    assert float(w[mask].sum()) == pytest.approx(1.5)


def test_seed_example_half_of_nine_rounds_to_four():
    # seed 001, ch. 3: round(0.5 x 9) = 4 pruned (Python's round, banker's on .5)
    w = torch.arange(1, 10, dtype=torch.float64)
    mask = magnitude_mask(w, 0.5)
    assert int((~mask).sum()) == 4
    assert (w * mask).tolist() == magnitude_prune(w.tolist(), 0.5)


def test_matches_calc_on_random_lists_with_ties():
    rng = random.Random(0)
    pool = [-2.0, -1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0, 2.0, 0.3, -0.3]
    for trial in range(200):
        n = rng.randint(1, 40)
        values = [rng.choice(pool) if trial % 2 else rng.uniform(-3, 3) for _ in range(n)]
        s = rng.choice([0.0, 0.1, 0.25, 0.5, 0.7, 0.999, rng.random() * 0.99])
        mask = magnitude_mask(torch.tensor(values, dtype=torch.float64), s)
        assert mask.tolist() == _expected_kept(values, s), (values, s)
        assert (torch.tensor(values, dtype=torch.float64) * mask).tolist() == magnitude_prune(values, s)


@pytest.mark.parametrize("shape", [(7,), (3, 5), (16, 33), (2, 3, 4)])
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.9, 0.999])
def test_exact_count_and_largest_kept(shape, sparsity):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    mask = magnitude_mask(w, sparsity)
    assert mask.shape == w.shape and mask.dtype == torch.bool
    k = round(sparsity * w.numel())
    assert int((~mask).sum()) == k
    if 0 < k < w.numel():
        assert float(w.abs()[mask].min()) >= float(w.abs()[~mask].max())


def test_all_ties_prune_lowest_flat_indices_first():
    w = torch.full((2, 5), -0.5)
    mask = magnitude_mask(w, 0.4)
    assert mask.reshape(-1).tolist() == [False] * 4 + [True] * 6
    assert magnitude_mask(w, 0.0).all()


def test_high_sparsity_keeps_the_largest_later_tie():
    w = torch.linspace(-1, 1, 1000)  # |w| = 1 at both ends: the lower index is pruned first
    mask = magnitude_mask(w, 0.999)
    assert int(mask.sum()) == 1 and bool(mask[-1])


def test_input_not_modified_and_dtypes():
    w = torch.randn(8, 8, dtype=torch.bfloat16)
    before = w.clone()
    m = magnitude_mask(w, 0.5)
    assert torch.equal(w, before) and int((~m).sum()) == 32


def test_global_exact_count_one_threshold():
    g = torch.Generator().manual_seed(2)
    layers = {"a": torch.randn(30, 40, generator=g) * 0.1, "b": torch.randn(50, generator=g),
              "c": torch.randn(7, 9, generator=g) * 10}
    masks = global_magnitude_masks(layers, 0.6)
    assert list(masks) == ["a", "b", "c"]
    total = sum(w.numel() for w in layers.values())
    pruned = sum(int((~m).sum()) for m in masks.values())
    assert pruned == round(0.6 * total)
    kept_min = min(float(w.abs()[m].min()) for w, m in zip(layers.values(), masks.values()))
    pruned_max = max(float(w.abs()[~m].max()) for w, m in zip(layers.values(), masks.values()) if (~m).any())
    assert kept_min >= pruned_max
    # the small-weight layer loses most: the point (and risk) of a global threshold
    frac = {k: float((~m).float().mean()) for k, m in masks.items()}
    assert frac["a"] > frac["b"] > frac["c"] and frac["c"] < 0.1


def test_global_equals_magnitude_of_the_concatenation_with_ties():
    rng = torch.Generator().manual_seed(3)
    for trial in range(30):
        layers = {f"l{i}": torch.randint(-3, 4, (int(torch.randint(1, 20, (1,), generator=rng)),), generator=rng).float()
                  for i in range(4)}
        s = float(torch.rand((), generator=rng)) * 0.99
        masks = global_magnitude_masks(layers, s)
        joined = magnitude_mask(torch.cat(list(layers.values())), s)
        assert torch.equal(torch.cat(list(masks.values())), joined)


def test_global_mixed_dtypes_and_shapes():
    layers = {"x": torch.ones(4, 4, dtype=torch.bfloat16), "y": torch.ones(3, dtype=torch.float32) * 2}
    masks = global_magnitude_masks(layers, 0.5)
    assert masks["x"].shape == (4, 4) and masks["y"].all()
    # ties in x: the first 10 flat entries of the first layer go
    assert masks["x"].reshape(-1).tolist() == [False] * 10 + [True] * 6


@pytest.mark.parametrize("bad", [1.0, -0.1, float("nan"), float("inf"), True, "0.5", None])
def test_bad_sparsity_names_the_layer(bad):
    with pytest.raises(ValueError, match=r"^fc1: sparsity must be"):
        magnitude_mask(torch.ones(4), bad, name="fc1")
    with pytest.raises(ValueError, match=r"sparsity must be"):
        global_magnitude_masks({"fc1": torch.ones(4)}, bad)


def test_bad_weights():
    w = torch.ones(3, 3)
    w[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"^layer.3: weight .*non-finite.*\(1, 2\)"):
        magnitude_mask(w, 0.5, name="layer.3")
    with pytest.raises(ValueError, match="empty"):
        magnitude_mask(torch.ones(0, 3), 0.5, name="x")
    with pytest.raises(ValueError, match="floating-point"):
        magnitude_mask(torch.ones(3, dtype=torch.int64), 0.5, name="x")
    with pytest.raises(ValueError, match="^up: weight"):
        global_magnitude_masks({"down": torch.ones(2), "up": torch.tensor([float("inf")])}, 0.5)
    with pytest.raises(ValueError, match="non-empty mapping"):
        global_magnitude_masks({}, 0.5)
