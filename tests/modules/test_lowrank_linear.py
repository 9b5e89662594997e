"""LowRankLinear: two matmuls equal the factored product (float64 reference), the state
dict round-trips bit-exactly, a fine-tune trains the factors, sizes and the energy estimate
count r (in + out) weights, and quantized factors (QuantLinear children) compose."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from shrink.algos.svd import truncated_svd
from shrink.eval.energy import energy_estimate
from shrink.modules import LowRankLinear, QuantLinear
from shrink.quant import QuantSpec, dequantize, quantize
from shrink.recipe.records import model_nbytes, model_params


def _layer(out_f=24, in_f=40, r=6, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(out_f, r, generator=g), torch.randn(r, in_f, generator=g)
    bias_t = torch.randn(out_f, generator=g) if bias else None
    return LowRankLinear.from_factors(a, b, bias_t), a, b, bias_t


@pytest.mark.parametrize("bias", [True, False])
def test_forward_is_the_factored_product(bias):
    mod, a, b, bias_t = _layer(bias=bias)
    x = torch.randn(3, 5, 40, generator=torch.Generator().manual_seed(1))
    ref = x.double() @ b.double().T @ a.double().T + (0 if bias_t is None else bias_t.double())
    y = mod(x)
    assert y.shape == (3, 5, 24) and torch.allclose(y.double(), ref, atol=1e-4)
    assert torch.equal(mod.dense_weight(), a @ b)
    assert torch.allclose(nn.functional.linear(x, mod.dense_weight(), mod.bias).double(), ref, atol=1e-4)
    assert (mod.bias is None) == (not bias)
    # the inputs were copied, not aliased
    a.zero_()
    assert mod.up.weight.abs().sum() > 0


def test_from_svd_factors_reconstructs_to_the_truncation_error():
    w = torch.randn(32, 48, generator=torch.Generator().manual_seed(2))
    res = truncated_svd(w, 10)
    mod = LowRankLinear.from_factors(res.a, res.b, None)
    assert float(((mod.dense_weight().detach().double() - w.double()) ** 2).sum()) == pytest.approx(res.discarded, rel=1e-4)


def test_state_dict_round_trips_into_a_shell_bit_exactly():
    mod, *_ = _layer()
    shell = LowRankLinear(40, 24, 6, bias=True)
    shell.load_state_dict(mod.state_dict())
    x = torch.randn(7, 40)
    assert torch.equal(shell(x), mod(x))
    assert set(mod.state_dict()) == {"down.weight", "up.weight", "up.bias"}
    half = LowRankLinear.from_factors(torch.randn(4, 2, dtype=torch.bfloat16), torch.randn(2, 8, dtype=torch.bfloat16))
    assert half.up.weight.dtype == torch.bfloat16 and half(torch.randn(1, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_a_fine_tune_updates_both_factors():
    mod, *_ = _layer()
    target = torch.randn(24, 40, generator=torch.Generator().manual_seed(3))
    x = torch.randn(64, 40, generator=torch.Generator().manual_seed(4))
    a0, b0 = mod.up.weight.detach().clone(), mod.down.weight.detach().clone()
    opt = torch.optim.Adam(mod.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = ((mod(x) - x @ target.T) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0]
    assert not torch.equal(mod.up.weight, a0) and not torch.equal(mod.down.weight, b0)
    assert len(list(mod.parameters())) == 3


def test_sizes_params_and_energy_count_the_factors():
    mod, *_ = _layer(out_f=24, in_f=40, r=6)
    stored = (6 * (24 + 40) + 24) * 4
    assert mod.nbytes == stored
    model = nn.Sequential(mod)
    assert model_nbytes(model) == stored and model_params(model) == 6 * (24 + 40) + 24
    x = torch.randn(5, 40)
    e = energy_estimate(model, x)
    assert e["weight_bytes"] == stored and e["macs"] == {"fp32": 5 * 6 * (24 + 40)} and e["layers"] == 2


def test_quantized_factors_compose():
    mod, *_ = _layer(out_f=32, in_f=64, r=8)
    spec = QuantSpec(bits=8, symmetric=True, granularity="channel")
    qa, qb = quantize(mod.up.weight.detach(), spec), quantize(mod.down.weight.detach(), spec)
    mod.up = QuantLinear.from_qtensor(qa, mod.up.bias.detach())
    mod.down = QuantLinear.from_qtensor(qb, None)
    w = dequantize(qa).float() @ dequantize(qb).float()
    assert torch.allclose(mod.dense_weight(), w, atol=1e-5)
    x = torch.randn(4, 64)
    assert torch.allclose(mod(x), x @ w.T + mod.bias, atol=0.05 * float(w.abs().max()))
    assert mod.nbytes == qa.nbytes + qb.nbytes + 32 * 4
    assert model_nbytes(nn.Sequential(mod)) == mod.nbytes


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"rank 9 is larger than a 4x8 layer allows \(at most min\(out, in\) = 4\)"):
        LowRankLinear(8, 4, 9)
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        LowRankLinear(8, 4, 0)
    with pytest.raises(ValueError, match="their ranks 3 and 2 differ"):
        LowRankLinear.from_factors(torch.randn(4, 3), torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        LowRankLinear.from_factors(torch.randn(4, 2), torch.randn(2, 8), torch.randn(3))
    with pytest.raises(ValueError, match="share dtype"):
        LowRankLinear.from_factors(torch.randn(4, 2), torch.randn(2, 8, dtype=torch.float64))
