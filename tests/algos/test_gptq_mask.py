"""GPTQ on a pruned weight (mask=): the pruned zeros stay exactly zero after quantization,
and the error still beats rounding the pruned weight to nearest."""
from __future__ import annotations

import pytest
import torch

from shrink.algos import gptq
from shrink.quant import QuantSpec, dequantize, quantize


@pytest.mark.parametrize("spec", [QuantSpec(bits=4, symmetric=False, granularity="group", group_size=128),
                                  QuantSpec(bits=4, symmetric=True, granularity="channel"),
                                  QuantSpec(bits=3, symmetric=False, granularity="channel")])
def test_masked_gptq_keeps_zeros_and_beats_rtn(minilm_activations, spec):
    w, x = minilm_activations["encoder.layer.2.intermediate.dense"]
    x = x.double()
    h = 2 * x.T @ x / x.shape[0]
    mask = w.abs() > w.abs().median()                 # half of the weights pruned
    pruned = w * mask
    res = gptq(pruned, h, spec, mask=mask, act_order=spec.granularity == "channel")
    q = dequantize(res.qtensor).float()
    assert torch.all(q[~mask] == 0)
    d_gptq = (pruned - q).double()
    d_rtn = (pruned - dequantize(quantize(pruned, spec)).float()).double()
    err = float(torch.einsum("oi,ij,oj->", d_gptq, h, d_gptq))
    err_rtn = float(torch.einsum("oi,ij,oj->", d_rtn, h, d_rtn))
    assert err < err_rtn
    unmasked = dequantize(gptq(pruned, h, spec).qtensor)   # without the mask the zeros are revived
    assert int((unmasked[~mask] != 0).sum()) > 0


def test_mask_must_match_the_weight():
    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        gptq(w, torch.eye(8, dtype=torch.float64), QuantSpec(bits=4, granularity="channel"), mask=torch.ones(4, 9) > 0)
