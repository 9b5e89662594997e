"""The compression job's memory is checked before any step runs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import shrink.recipe.job as job
from shrink.recipe.memory import available_memory, check_job_fits, job_memory
from shrink.recipe.steps import parse_recipe


def test_estimate_follows_its_derivation():
    m = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    n = 4 * (64 * 32 + 32 + 32 * 10 + 10)
    free = job_memory(m, parse_recipe("w4-rtn"), [torch.randn(8, 64)])
    assert free["bytes"] == 2 * n and f"{2 * n:,} B" in free["derivation"]  # data-free: no activations
    mixed = job_memory(m, parse_recipe("mixed-4.5"), [torch.randn(8, 64), torch.randn(8, 64)])
    # 16 rows x 64 wide x 2 (in + out) x 4 B, and both layers' Hessians held at once
    assert mixed["bytes"] == 2 * n + 2 * 16 * 64 * 4 + 4 * (64 * 64 + 32 * 32)
    assert (available_memory() or 1) > 0


def test_a_job_that_cannot_fit_stops_before_running(monkeypatch, tmp_path):
    monkeypatch.setattr(job, "available_memory", lambda: 1000)
    with pytest.raises(ValueError, match=r"needs about .* GiB .*model .* B \+ working copy.* 0\.00 GiB of memory"):
        job.run_job("digits-mlp", "w4-rtn", tmp_path / "o")
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError):
        check_job_fits({"bytes": 10, "derivation": "x"}, 9)
    check_job_fits({"bytes": 10, "derivation": "x"}, None)  # unknown: no check
