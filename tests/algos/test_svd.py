"""Truncated SVD: Eckart-Young (the squared reconstruction error is the discarded singular
values' energy) against a float64 reference, on random and real (MiniLM) weights; rank
choice by energy on known spectra (the seed's worked example), the parameter budget and
the break-even arithmetic; bad input named."""
from __future__ import annotations

import math

import pytest
import torch

from shrink import calc
from shrink.algos.svd import (energy_curve, pays_off, rank_for_budget, rank_for_energy, spectrum,
                              truncated_svd)


def _matrix_with_spectrum(out_f: int, in_f: int, sigma: list[float], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out_f, len(sigma), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(in_f, len(sigma), generator=g, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(sigma, dtype=torch.float64)) @ v.T


@pytest.mark.parametrize("shape,rank", [((48, 32), 1), ((48, 32), 7), ((32, 48), 20), ((40, 40), 40)])
def test_eckart_young_error_equals_discarded_energy_float64(shape, rank):
    g = torch.Generator().manual_seed(rank)
    w = torch.randn(*shape, generator=g, dtype=torch.float64)
    res = truncated_svd(w, rank)
    ref = torch.linalg.svdvals(w)                          # float64 reference spectrum
    discarded = float((ref[rank:] ** 2).sum())
    direct = float(((w - res.a @ res.b) ** 2).sum())       # the reconstruction, measured directly
    assert res.a.shape == (shape[0], rank) and res.b.shape == (rank, shape[1])
    assert direct == pytest.approx(discarded, rel=1e-9, abs=1e-9)
    assert res.error == pytest.approx(direct, rel=1e-12, abs=1e-12)
    assert res.discarded == pytest.approx(discarded, rel=1e-12, abs=1e-12)
    assert torch.allclose(res.singular_values, ref, rtol=1e-12, atol=1e-12)
    # sqrt(Sigma) split evenly: the two factors carry the same singular values
    assert torch.allclose(torch.linalg.svdvals(res.a), ref[:rank].sqrt(), rtol=1e-9)
    assert torch.allclose(torch.linalg.svdvals(res.b), ref[:rank].sqrt(), rtol=1e-9)


def test_float32_weight_factors_are_float32_and_error_matches_the_bound(minilm_weights):
    w = minilm_weights["encoder.layer.0.intermediate.dense.weight"]   # real [1536, 384]
    res = truncated_svd(w, 96)
    assert res.a.dtype == torch.float32 and res.b.dtype == torch.float32
    ref = torch.linalg.svdvals(w.double())
    bound = float((ref[96:] ** 2).sum())
    # cast to float32 adds rounding of order eps * ||W||^2, far below the discarded energy
    assert res.error == pytest.approx(bound, rel=1e-4)
    assert res.relative_error == pytest.approx(math.sqrt(bound / float((ref ** 2).sum())), rel=1e-4)
    assert res.energy_kept == pytest.approx(1 - bound / float((ref ** 2).sum()), rel=1e-9)
    # higher rank: smaller error (Eckart-Young is monotone)
    assert truncated_svd(w, 192).error < res.error


def test_full_rank_reconstructs_and_spectrum_is_reused():
    w = _matrix_with_spectrum(20, 12, [5, 4, 3, 2, 1, 0.5, 0.25, 0.1, 0.05, 0.01, 0.005, 0.001])
    sp = spectrum(w)
    res = truncated_svd(w, 12, spec=sp)
    assert torch.allclose(res.a @ res.b, w, atol=1e-12)
    assert res.error < 1e-20 and res.energy_kept == pytest.approx(1.0)
    with pytest.raises(ValueError, match="spectrum given is of a 20x12 matrix, the weight is 12x20"):
        truncated_svd(w.T.contiguous(), 3, spec=sp)


def test_energy_curve_and_rank_on_the_seeds_spectrum():
    sigma = [10, 5, 2, 1, 0.5, 0.1, 0.05, 0.01]                 # seed 000, Exercise 7.4
    s = torch.tensor(sigma, dtype=torch.float64)
    curve = energy_curve(s)
    for r in range(1, 9):
        assert float(curve[r - 1]) == pytest.approx(calc.energy_captured(sigma, r), rel=1e-12)
    assert float(curve[3]) == pytest.approx(0.99798, abs=5e-6)
    for e in (0.5, 0.76, 0.77, 0.9, 0.99, 0.998, 0.9999, 1.0):
        assert rank_for_energy(s, e) == calc.rank_for_energy(sigma, e)
    assert rank_for_energy(s, 0.99) == 3 and rank_for_energy(s, 1.0) == 8
    # order of the given values does not matter; a real matrix with that spectrum gives the same ranks
    assert rank_for_energy(s.flip(0), 0.99) == 3
    w = _matrix_with_spectrum(16, 9, sigma)
    assert rank_for_energy(spectrum(w).s, 0.99) == 3
    assert rank_for_energy(torch.zeros(5), 0.9) == 1          # a zero matrix: rank 1 keeps all of nothing


def test_flat_spectrum_needs_most_of_the_rank():
    # an orthogonal matrix: every direction equally important, 90% energy needs 90% of the rank
    q, _ = torch.linalg.qr(torch.randn(50, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    assert rank_for_energy(spectrum(q).s, 0.9) == 45
    assert not pays_off(50, 50, 45)


def test_budget_and_break_even_arithmetic():
    # r (out + in) <= keep * out * in, the largest such r
    for out_f, in_f, keep in [(384, 384, 0.5), (1536, 384, 0.25), (4096, 4096, 0.1), (7, 3, 0.9), (10, 10, 1.0)]:
        r = rank_for_budget(out_f, in_f, keep)
        assert r * (out_f + in_f) <= keep * out_f * in_f
        assert r == min(out_f, in_f) or (r + 1) * (out_f + in_f) > keep * out_f * in_f
    assert rank_for_budget(384, 384, 0.5) == 96                 # 96 * 768 = 73,728 = 0.5 * 147,456 exactly
    assert rank_for_budget(4096, 4096, 1.0) == 2048             # the break-even rank d/2 (seed 000, Ex. 7.1)
    assert rank_for_budget(10, 10, 0.01) == 0                   # 1 * 20 > 0.01 * 100: no rank fits
    assert not pays_off(4096, 4096, 2048) and pays_off(4096, 4096, 2047)
    assert calc.low_rank_params(4096, 4096, 2047) < 4096 * 4096
    assert pays_off(1024, 1024, 64)                             # seed 004: 8x smaller


def test_bad_input_is_named():
    w = torch.randn(8, 6)
    with pytest.raises(ValueError, match=r"layer\.q: rank 7 is larger than a 8x6 matrix allows \(at most min\(out, "
                                         r"in\) = 6\)"):
        truncated_svd(w, 7, name="layer.q")
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        truncated_svd(w, 0)
    with pytest.raises(ValueError, match="2-D"):
        truncated_svd(torch.randn(4, 3, 3), 1)
    bad = w.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="fc: weight has NaN or infinite"):
        truncated_svd(bad, 2, name="fc")
    with pytest.raises(ValueError, match="floating point"):
        truncated_svd(torch.ones(3, 3, dtype=torch.int64), 1)
    for e in (0.0, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"energy must be a fraction in \(0, 1\]"):
            rank_for_energy(torch.ones(3), e)
    with pytest.raises(ValueError, match="keep must be a fraction"):
        rank_for_budget(4, 4, 0.0)
    with pytest.raises(ValueError, match="out_features must be a positive integer"):
        pays_off(0, 4, 1)
