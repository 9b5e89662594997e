"""nm_mask / check_nm / parse_pattern: N kept of every M along the input dimension."""
from __future__ import annotations

import pytest
import torch

from shrink.algos.nm import check_nm, nm_mask, parse_pattern


def _reference_nm(scores, n, m):
    """Per row, per run of m columns: keep the n largest, ties to the lower index (Python sort)."""
    out = []
    for row in scores.tolist():
        kept = []
        for g0 in range(0, len(row), m):
            idx = sorted(range(g0, g0 + m), key=lambda i: (-row[i], i))[:n]
            kept.extend(i in idx for i in range(g0, g0 + m))
        out.append(kept)
    return torch.tensor(out, dtype=torch.bool)


@pytest.mark.parametrize("n,m", [(1, 2), (2, 4), (1, 4), (3, 4), (4, 8), (2, 8)])
def test_valid_over_random_shapes(n, m):
    g = torch.Generator().manual_seed(n * 10 + m)
    for trial in range(6):
        rows = int(torch.randint(1, 9, (1,), generator=g))
        cols = m * int(torch.randint(1, 7, (1,), generator=g))
        s = torch.randn(rows, cols, generator=g)
        if trial % 2:  # heavy ties
            s = torch.randint(0, 3, (rows, cols), generator=g).float()
        mask = nm_mask(s, n, m)
        assert mask.shape == s.shape and mask.dtype == torch.bool
        assert check_nm(mask, n, m)
        assert (mask.reshape(rows, -1, m).sum(-1) == n).all()  # exactly n, not just at most
        assert torch.equal(mask, _reference_nm(s, n, m))


def test_ties_keep_lower_index():
    mask = nm_mask(torch.ones(2, 8), 2, 4)
    assert mask[0].tolist() == [True, True, False, False] * 2
    s = torch.tensor([[1.0, 3.0, 3.0, 3.0]])
    assert nm_mask(s, 2, 4)[0].tolist() == [False, True, True, False]


def test_keeps_largest_scores_not_magnitudes():
    s = torch.tensor([[0.1, 5.0, 0.2, 4.0, 9.0, 1.0, 2.0, 3.0]])
    assert nm_mask(s, 2, 4)[0].tolist() == [False, True, False, True, True, False, False, True]


def test_n_equal_m_keeps_everything():
    assert nm_mask(torch.randn(3, 8), 4, 4).all()


def test_errors_name_the_layer():
    s = torch.randn(4, 130)
    with pytest.raises(ValueError, match=r"^fc2: 2:4 needs in_features divisible by 4, got 130"):
        nm_mask(s, 2, 4, name="fc2")
    with pytest.raises(ValueError, match=r"^fc2: N > M"):
        nm_mask(torch.randn(4, 8), 5, 4, name="fc2")
    with pytest.raises(ValueError, match=r"^fc2: N:M needs N >= 1"):
        nm_mask(torch.randn(4, 8), 0, 4, name="fc2")
    with pytest.raises(ValueError, match=r"^fc2: N:M needs integers"):
        nm_mask(torch.randn(4, 8), 2.0, 4, name="fc2")
    with pytest.raises(ValueError, match=r"^fc2: scores must be a \[out, in\]"):
        nm_mask(torch.randn(8), 2, 4, name="fc2")
    bad = torch.randn(2, 8)
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"^fc2: scores .*non-finite"):
        nm_mask(bad, 2, 4, name="fc2")


def test_check_nm():
    ok = torch.tensor([[1, 1, 0, 0, 0, 1, 0, 1]], dtype=torch.bool)
    assert check_nm(ok, 2, 4)
    assert check_nm(torch.zeros(3, 8, dtype=torch.bool), 2, 4)  # at most n: fewer is fine
    bad = ok.clone()
    bad[0, 2] = True
    assert not check_nm(bad, 2, 4)
    assert check_nm(bad, 3, 4)
    assert not check_nm(torch.zeros(2, 6, dtype=torch.bool), 2, 4)  # not a multiple of 4: not N:M
    with pytest.raises(ValueError, match="N > M"):
        check_nm(ok, 5, 4)


def test_parse_pattern():
    assert parse_pattern("2:4") == (2, 4)
    assert parse_pattern(" 4 : 8 ") == (4, 8)
    assert parse_pattern("1:1") == (1, 1)
    for bad in ["2/4", "2:", "a:b", "2:4:8", "", "-2:4"]:
        with pytest.raises(ValueError, match="not of the form 'N:M'"):
            parse_pattern(bad)
    with pytest.raises(ValueError, match="N > M"):
        parse_pattern("4:2")
    with pytest.raises(ValueError, match="N >= 1"):
        parse_pattern("0:4")
    with pytest.raises(ValueError, match="must be a string"):
        parse_pattern((2, 4))
