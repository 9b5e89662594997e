"""Structured-pruning scores and the choice of kept units (rows, hidden neurons, heads)."""
from __future__ import annotations

import pytest
import torch

from shrink.algos.structured import group_scores, keep_indices, neuron_scores, row_scores


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_seed_example_removes_the_tiny_neuron():
    # seed 001, ch. 3: removing 25% of these 4 neurons by L2 norm drops the all-tiny row 3
    w = torch.tensor([[0.5, -0.1, 0.8, -0.3], [0.02, -0.9, 0.03, 0.01],
                      [-0.7, 0.04, 0.6, -0.5], [0.01, 0.02, -0.01, 0.03]])
    assert keep_indices(row_scores(w, "l2"), 0.25).tolist() == [0, 1, 2]
    assert keep_indices(row_scores(w, "l1"), 0.25).tolist() == [0, 1, 2]
    assert torch.allclose(row_scores(w, "l2"), w.norm(dim=1))
    assert torch.allclose(row_scores(w, "l1"), w.abs().sum(1))


def test_neuron_scores_magnitude_sums_every_removed_slice():
    gate, up, down = _randn(6, 5, seed=1), _randn(6, 5, seed=2), _randn(3, 6, seed=3)
    got = neuron_scores([gate, up], down, "l1")
    assert torch.allclose(got, gate.abs().sum(1) + up.abs().sum(1) + down.abs().sum(0))
    got = neuron_scores([up], down, "l2")
    assert torch.allclose(got, up.norm(dim=1) + down.norm(dim=0))
    assert torch.allclose(neuron_scores([up]), up.abs().sum(1))
    assert torch.allclose(neuron_scores([], down, "l2"), down.norm(dim=0))


def test_activation_score_sees_a_dead_neuron():
    up, down = _randn(8, 4, seed=4), _randn(5, 8, seed=5)
    up[2] *= 10  # the largest weights, but the neuron never fires on the calibration data
    act = torch.rand(8, generator=torch.Generator().manual_seed(6)) + 0.5
    act[2] = 0.0
    s = neuron_scores([up], down, "activation", act)
    assert torch.allclose(s, act * down.norm(dim=0))
    assert 2 not in keep_indices(s, count=1).tolist()
    assert 2 in keep_indices(neuron_scores([up], down, "l2"), count=1).tolist()


def test_neuron_score_errors():
    up, down = torch.randn(8, 4), torch.randn(5, 8)
    with pytest.raises(ValueError, match="^mlp.0: producer 1 has 7 rows"):
        neuron_scores([up, torch.randn(7, 4)], name="mlp.0")
    with pytest.raises(ValueError, match="^mlp.0: consumer has 9 input columns"):
        neuron_scores([up], torch.randn(5, 9), name="mlp.0")
    with pytest.raises(ValueError, match="^mlp.0: score='activation' needs"):
        neuron_scores([up], down, "activation", name="mlp.0")
    with pytest.raises(ValueError, match="^mlp.0: act_norm must be 8"):
        neuron_scores([up], down, "activation", torch.rand(7), name="mlp.0")
    with pytest.raises(ValueError, match="^mlp.0: score must be one of"):
        neuron_scores([up], down, "l3", name="mlp.0")
    with pytest.raises(ValueError, match="^mlp.0: producers must be a sequence"):
        neuron_scores(up, name="mlp.0")
    with pytest.raises(ValueError, match="^mlp.0: give at least one"):
        neuron_scores([], name="mlp.0")
    with pytest.raises(ValueError, match="^fc: score must be one of l1, l2"):
        row_scores(up, "activation", name="fc")


def test_group_scores_per_head():
    s = torch.arange(12.0)
    assert group_scores(s, 4).tolist() == [6.0, 22.0, 38.0]
    assert torch.equal(group_scores(s, 1), s)
    with pytest.raises(ValueError, match="^attn: 12 scores do not split into groups of 5"):
        group_scores(s, 5, name="attn")
    with pytest.raises(ValueError, match="group_size must be a positive integer"):
        group_scores(s, 0)


def test_keep_indices_counts_and_ties():
    s = torch.tensor([3.0, 1.0, 1.0, 2.0, 1.0, 5.0])
    assert keep_indices(s, 0.5).tolist() == [0, 3, 5]
    assert keep_indices(s, count=1).tolist() == [0, 2, 3, 4, 5]  # tie at 1.0: index 1 goes first
    assert keep_indices(s, count=2).tolist() == [0, 3, 4, 5]
    assert keep_indices(s, 0.0).tolist() == list(range(6))
    assert keep_indices(s, 0.05).tolist() == list(range(6))  # round(0.3) = 0 removed
    assert keep_indices(s, 0.1).tolist() == [0, 2, 3, 4, 5]  # round(0.6) = 1 removed
    g = torch.Generator().manual_seed(7)
    for trial in range(20):
        n = int(torch.randint(2, 50, (1,), generator=g))
        scores = torch.randint(0, 4, (n,), generator=g).float()
        frac = float(torch.rand((), generator=g)) * 0.9
        kept = keep_indices(scores, frac)
        r = round(frac * n)
        assert len(kept) == n - r and kept.tolist() == sorted(kept.tolist())
        gone = sorted(range(n), key=lambda i: (float(scores[i]), i))[:r]
        assert set(kept.tolist()) == set(range(n)) - set(gone)


def test_keep_indices_multiple_of():
    s = torch.arange(64.0)
    assert len(keep_indices(s, 0.25, multiple_of=8)) == 48  # 48 already a multiple
    assert len(keep_indices(s, 0.3, multiple_of=8)) == 48  # remove 19 -> keep 45 -> nearest multiple 48
    assert len(keep_indices(s, 0.2, multiple_of=8)) == 48  # remove 13 -> keep 51 -> 48
    assert len(keep_indices(s, 0.05, multiple_of=8)) == 64  # remove 3 -> keep 61 -> 64: nothing removed
    assert keep_indices(s, 0.3, multiple_of=8).tolist() == list(range(16, 64))
    assert len(keep_indices(torch.arange(60.0), count=6, multiple_of=8)) == 56  # keep 54 -> nearest multiple 56
    assert len(keep_indices(torch.arange(60.0), count=2, multiple_of=8)) == 60  # keep 58: 56 and 60 (all) tie, keep more
    assert len(keep_indices(torch.arange(60.0), count=4, multiple_of=8)) == 56  # 56 exactly
    assert len(keep_indices(torch.arange(12.0), count=10, multiple_of=8)) == 8  # never fewer than one multiple
    assert len(keep_indices(torch.arange(6.0), count=3, multiple_of=8)) == 6  # no multiple fits: nothing removed
    with pytest.raises(ValueError, match="multiple_of must be a positive integer"):
        keep_indices(s, 0.5, multiple_of=0)


def test_keep_indices_errors_name_the_layer():
    s = torch.rand(8)
    with pytest.raises(ValueError, match="^heads: removing every unit of heads"):
        keep_indices(s, 1.0, name="heads")
    with pytest.raises(ValueError, match="^heads: removing every unit of heads"):
        keep_indices(s, 0.97, name="heads")  # round(7.76) = 8
    with pytest.raises(ValueError, match="^heads: removing every unit"):
        keep_indices(s, count=8, name="heads")
    with pytest.raises(ValueError, match="^heads: count must be"):
        keep_indices(s, count=9, name="heads")
    for bad in (-0.1, 1.5, float("nan"), "x"):
        with pytest.raises(ValueError, match="^heads: fraction must be"):
            keep_indices(s, bad, name="heads")
    with pytest.raises(ValueError, match="^heads: give exactly one"):
        keep_indices(s, name="heads")
    with pytest.raises(ValueError, match="^heads: give exactly one"):
        keep_indices(s, 0.5, count=2, name="heads")
    bad = s.clone()
    bad[3] = float("nan")
    with pytest.raises(ValueError, match="^heads: scores .*non-finite"):
        keep_indices(bad, 0.5, name="heads")
