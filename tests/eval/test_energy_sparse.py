"""The energy estimate of sparse layers: bytes as stored, MACs as the kernel runs them."""
from __future__ import annotations

import torch
from torch import nn

from shrink.eval.energy import energy_estimate
from shrink.modules import SparseLinear


def test_sparse_layers_count_stored_bytes_and_the_kernels_macs():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    mask = torch.rand(32, 64) > 0.75
    x = torch.randn(5, 64)
    for layout in ("bitmask", "csr"):
        sp = SparseLinear.from_dense(lin.weight.detach() * mask, lin.bias.detach(), mask=mask, layout=layout)
        e = energy_estimate(nn.Sequential(sp), x)
        assert e["weight_bytes"] == sp.nbytes
        macs = sum(e["macs"].values())
        expected = 5 * sp.nnz if sp.kernel.startswith("csr") else 5 * 32 * 64
        assert macs == expected
    dense = energy_estimate(nn.Sequential(lin), x)
    assert dense["weight_bytes"] == (32 * 64 + 32) * 4 > e["weight_bytes"]
