"""The distillation loss against its definition (float64, written out by hand), the T^2
gradient scaling, hidden-state losses and the errors for bad input."""
from __future__ import annotations

import math

import pytest
import torch

from shrink.algos.kd import hidden_loss, kd_loss, soft_kl
from shrink.calc.distill import kl_divergence, softmax_with_temperature
from shrink.train.loop import distill_loss


def _direct(s: torch.Tensor, t: torch.Tensor, y, T: float, alpha: float, ignore: int = -100) -> float:
    """The loss from its definition, row by row in Python floats."""
    s2, t2 = s.reshape(-1, s.shape[-1]).tolist(), t.reshape(-1, t.shape[-1]).tolist()
    kl = [kl_divergence(softmax_with_temperature(tr, T), softmax_with_temperature(sr, T)) for sr, tr in zip(s2, t2)]
    soft = T * T * sum(kl) / len(kl)
    if alpha == 1.0:
        return alpha * soft
    ys = y.reshape(-1).tolist()
    ce = [-math.log(softmax_with_temperature(sr, 1.0)[c]) for sr, c in zip(s2, ys) if c != ignore]
    return alpha * soft + (1 - alpha) * sum(ce) / len(ce)


@pytest.mark.parametrize("T,alpha", [(1.0, 0.5), (4.0, 0.7), (10.0, 1.0), (2.5, 0.0)])
def test_kd_loss_matches_the_definition(T, alpha):
    g = torch.Generator().manual_seed(1)
    s = torch.randn(6, 5, generator=g, dtype=torch.float64) * 3
    t = torch.randn(6, 5, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 5, (6,), generator=g)
    got = float(kd_loss(s, t, y, temperature=T, alpha=alpha))
    assert got == pytest.approx(_direct(s, t, y, T, alpha), rel=1e-12, abs=1e-12)


def test_token_rows_ignore_index_and_mask():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(2, 4, 7, generator=g, dtype=torch.float64)
    t = torch.randn(2, 4, 7, generator=g, dtype=torch.float64)
    y = torch.randint(0, 7, (2, 4), generator=g)
    y[0, 3] = y[1, 0] = -100
    assert float(kd_loss(s, t, y, temperature=2.0, alpha=0.3)) == pytest.approx(_direct(s, t, y, 2.0, 0.3), rel=1e-12)
    # a mask leaves rows out of the KL term: equal to the KL of the kept rows alone
    mask = torch.tensor([[True, True, False, True], [False, True, True, True]])
    kept = soft_kl(s[mask], t[mask], 3.0)
    assert float(soft_kl(s, t, 3.0, mask=mask)) == pytest.approx(float(kept), rel=1e-12)


def test_seed_worked_example():
    """Seed 000, Ex. 6.3: alpha 0.7, T 4, KL_soft 0.05 -> distillation term 0.56."""
    t = torch.tensor([[2.0, 1.0, 0.1]], dtype=torch.float64)
    s = torch.tensor([[1.5, 1.2, 0.3]], dtype=torch.float64)
    kl = kl_divergence(softmax_with_temperature(t[0].tolist(), 4.0), softmax_with_temperature(s[0].tolist(), 4.0))
    assert float(kd_loss(s, t, temperature=4.0, alpha=1.0)) == pytest.approx(16 * kl, rel=1e-12)
    assert 0.7 * 16 * 0.05 == pytest.approx(0.56)


def _grad(s, t, T, scale_t2: bool):
    s = s.clone().requires_grad_(True)
    loss = soft_kl(s, t, T) if scale_t2 else soft_kl(s, t, T) / (T * T)
    loss.backward()
    return s.grad


@pytest.mark.parametrize("T", [1.0, 2.0, 5.0, 20.0])
def test_t_squared_gradient_identity(T):
    """d(T^2 KL)/ds = (softmax(s/T) - softmax(t/T)) * T / rows; without T^2 it is that / T^2."""
    g = torch.Generator().manual_seed(3)
    s = torch.randn(4, 6, generator=g, dtype=torch.float64) * 2
    t = torch.randn(4, 6, generator=g, dtype=torch.float64) * 2
    expect = (torch.softmax(s / T, -1) - torch.softmax(t / T, -1)) * T / s.shape[0]
    torch.testing.assert_close(_grad(s, t, T, True), expect, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(_grad(s, t, T, False), expect / (T * T), rtol=1e-10, atol=1e-14)


def test_without_t_squared_the_soft_gradient_vanishes():
    """For large T the unscaled soft-target gradient falls as 1/T^2 (the explicit 1/T of the
    chain rule times a softened difference that shrinks like 1/T); with T^2 it tends to a
    constant, (s - t - mean) / (classes * rows)."""
    g = torch.Generator().manual_seed(4)
    s = torch.randn(3, 5, generator=g, dtype=torch.float64)
    t = torch.randn(3, 5, generator=g, dtype=torch.float64)
    limit = ((s - s.mean(-1, keepdim=True)) - (t - t.mean(-1, keepdim=True))) / (5 * 3)
    norms_plain, norms_scaled = [], []
    for T in (10.0, 100.0, 1000.0):
        norms_plain.append(float(_grad(s, t, T, False).norm()))
        norms_scaled.append(float(_grad(s, t, T, True).norm()))
        # the 1/T of the chain rule: the unscaled gradient is (q - p) / (T * rows)
        q_p = torch.softmax(s / T, -1) - torch.softmax(t / T, -1)
        torch.testing.assert_close(_grad(s, t, T, False), q_p / (T * 3), rtol=1e-10, atol=1e-16)
    assert norms_plain[1] / norms_plain[0] == pytest.approx(1e-2, rel=0.05)
    assert norms_plain[2] / norms_plain[1] == pytest.approx(1e-2, rel=0.01)
    assert norms_scaled[2] == pytest.approx(norms_scaled[1], rel=0.01)
    torch.testing.assert_close(_grad(s, t, 1000.0, True), limit, rtol=5e-3, atol=1e-6)


def test_hidden_losses_against_torch():
    g = torch.Generator().manual_seed(5)
    s = torch.randn(2, 3, 8, generator=g, dtype=torch.float64)
    t = torch.randn(2, 3, 8, generator=g, dtype=torch.float64)
    cos = torch.nn.functional.cosine_similarity(s.reshape(-1, 8), t.reshape(-1, 8), dim=-1)
    assert float(hidden_loss(s, t, "cosine")) == pytest.approx(float((1 - cos).mean()), rel=1e-12)
    assert float(hidden_loss(s, t, "mse")) == pytest.approx(float(((s - t) ** 2).mean()), rel=1e-12)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert float(hidden_loss(s, t, "mse", mask=mask)) == pytest.approx(
        float(((s - t)[mask.bool()] ** 2).mean()), rel=1e-12)
    assert float(hidden_loss(s, 2.5 * s, "cosine")) == pytest.approx(0.0, abs=1e-12)


def test_loop_distill_loss_is_kd():
    g = torch.Generator().manual_seed(6)
    s, t = torch.randn(2, 3, 9, generator=g), torch.randn(2, 3, 9, generator=g)
    assert float(distill_loss(s, t, 3.0)) == pytest.approx(float(kd_loss(s, t, temperature=3.0, alpha=1.0)), rel=1e-6)
    assert float(distill_loss(s, t, logits=False)) == pytest.approx(float(((s - t) ** 2).mean()), rel=1e-6)


def test_bad_input():
    s, t, y = torch.randn(4, 10), torch.randn(4, 5), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"student's logits have shape \[4, 10\] but the teacher's have \[4, 5\]"):
        kd_loss(s, t, y)
    with pytest.raises(ValueError, match="temperature must be a positive"):
        kd_loss(s, s, y, temperature=0.0)
    with pytest.raises(ValueError, match="temperature must be a positive"):
        kd_loss(s, s, y, temperature=-1)
    with pytest.raises(ValueError, match=r"alpha .* must be in \[0, 1\]"):
        kd_loss(s, s, y, alpha=1.5)
    with pytest.raises(ValueError, match="no labels were given"):
        kd_loss(s, s, None, alpha=0.5)
    with pytest.raises(ValueError, match="labels have shape"):
        kd_loss(s, s, torch.zeros(3, dtype=torch.long), alpha=0.5)
    with pytest.raises(ValueError, match=r"hidden states have shape \[4, 10\] but the teacher's have \[4, 5\]"):
        hidden_loss(s, t)
    with pytest.raises(ValueError, match="kind must be"):
        hidden_loss(s, s, "l1")
    assert float(kd_loss(s, s, None, alpha=1.0)) == pytest.approx(0.0, abs=1e-6)
