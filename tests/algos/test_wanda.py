"""Wanda: activation norms (one shot and streamed), per-row exact counts, N:M, and
on MiniLM's real activations an output error no worse than magnitude pruning."""
from __future__ import annotations

import pytest
import torch

from shrink.algos.magnitude import magnitude_mask
from shrink.algos.nm import check_nm, nm_mask
from shrink.algos.wanda import ActNorm, act_norms_from_inputs, wanda_mask, wanda_scores


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_act_norms_one_shot_and_streamed():
    x = _randn(3, 50, 16) * torch.linspace(0.1, 10, 16)
    want = torch.linalg.vector_norm(x.reshape(-1, 16).double(), dim=0)
    assert torch.allclose(act_norms_from_inputs(x.reshape(-1, 16)), want, rtol=1e-12)
    acc = ActNorm()
    acc.update(x[0])
    acc.update(x[1:].reshape(2, 5, 10, 16))  # any leading shape
    acc.update(x[:0])  # an empty batch adds nothing
    assert acc.tokens == 150 and acc.norm().dtype == torch.float64
    assert torch.allclose(acc.norm(), want, rtol=1e-12)


def test_act_norm_errors():
    acc = ActNorm(8)
    with pytest.raises(ValueError, match="no tokens"):
        acc.norm()
    with pytest.raises(ValueError, match="expected 8"):
        acc.update(torch.ones(4, 7))
    bad = torch.ones(2, 8)
    bad[1, 1] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        acc.update(bad)


def test_scores_are_abs_weight_times_norm():
    w, n = _randn(5, 6), torch.rand(6, dtype=torch.float64)
    assert torch.allclose(wanda_scores(w, n), w.abs() * n.float()[None, :])


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.999])
def test_exact_count_per_row(sparsity):
    w, n = _randn(12, 37, seed=1), torch.rand(37, generator=torch.Generator().manual_seed(2))
    mask = wanda_mask(w, n, sparsity)
    k = round(sparsity * 37)
    assert ((~mask).sum(1) == k).all()
    s = wanda_scores(w, n)
    if 0 < k < 37:  # in every row the kept scores dominate the pruned ones
        kept_min = torch.where(mask, s, torch.inf).amin(1)
        pruned_max = torch.where(mask, -torch.inf, s).amax(1)
        assert (kept_min >= pruned_max).all()


def test_ties_lower_index_pruned_first_and_uniform_norms_are_magnitude_per_row():
    mask = wanda_mask(torch.ones(2, 6), torch.ones(6), 0.5)
    assert mask[0].tolist() == [False, False, False, True, True, True]
    w = _randn(8, 20, seed=3)
    mask = wanda_mask(w, torch.full((20,), 3.0), 0.25)
    for r in range(8):  # equal norms: Wanda is magnitude pruning inside each row
        assert torch.equal(mask[r], magnitude_mask(w[r], 0.25))


def test_outlier_feature_protects_its_weights():
    w = torch.ones(4, 8) * 0.5
    w[:, 0] = 0.1  # small weights on a feature with huge activations
    norms = torch.ones(8)
    norms[0] = 100.0
    assert wanda_mask(w, norms, 0.5)[:, 0].all()
    assert not magnitude_mask(w, 0.5)[:, 0].any()


def test_pattern():
    w, n = _randn(6, 32, seed=4), torch.rand(32, generator=torch.Generator().manual_seed(5))
    mask = wanda_mask(w, n, pattern=(2, 4))
    assert check_nm(mask, 2, 4) and int(mask.sum()) == 6 * 16
    assert torch.equal(mask, nm_mask(wanda_scores(w, n), 2, 4))


def test_errors_name_the_layer():
    w, n = torch.randn(4, 8), torch.rand(8)
    with pytest.raises(ValueError, match="^q_proj: give exactly one"):
        wanda_mask(w, n, name="q_proj")
    with pytest.raises(ValueError, match="^q_proj: give exactly one"):
        wanda_mask(w, n, 0.5, pattern=(2, 4), name="q_proj")
    with pytest.raises(ValueError, match=r"^q_proj: sparsity must be in \[0, 1\)"):
        wanda_mask(w, n, 1.0, name="q_proj")
    with pytest.raises(ValueError, match="^q_proj: sparsity"):
        wanda_mask(w, n, float("nan"), name="q_proj")
    with pytest.raises(ValueError, match="^q_proj: act_norm has 7 entries"):
        wanda_mask(w, torch.rand(7), 0.5, name="q_proj")
    with pytest.raises(ValueError, match="^q_proj: act_norm has negative"):
        wanda_mask(w, -torch.rand(8), 0.5, name="q_proj")
    with pytest.raises(ValueError, match="^q_proj: 2:4 needs in_features divisible by 4, got 10"):
        wanda_mask(torch.randn(4, 10), torch.rand(10), pattern=(2, 4), name="q_proj")
    with pytest.raises(ValueError, match="^q_proj: N > M"):
        wanda_mask(w, n, pattern=(4, 2), name="q_proj")
    with pytest.raises(ValueError, match="^q_proj: pattern must be"):
        wanda_mask(w, n, pattern="2:4", name="q_proj")


def test_real_activations_output_error_at_most_magnitudes(minilm_activations):
    """||W X - W' X|| on MiniLM's real inputs: Wanda <= magnitude at 50% and at 2:4."""
    for name, (w, x) in minilm_activations.items():
        norms = act_norms_from_inputs(x)
        xd, wd = x.double(), w.double()

        def out_err(mask):
            return float(torch.linalg.matrix_norm(xd @ (wd * ~mask).T))

        wa, ma = wanda_mask(w, norms, 0.5, name=name), magnitude_mask(w, 0.5, name=name)
        assert int((~wa).sum()) == int((~ma).sum()) == w.numel() // 2
        assert out_err(wa) <= 0.95 * out_err(ma), name
        wa, ma = wanda_mask(w, norms, pattern=(2, 4), name=name), nm_mask(w.abs(), 2, 4, name=name)
        assert out_err(wa) <= 0.95 * out_err(ma), name
