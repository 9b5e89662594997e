"""LoRALinear: the initial output is exactly the base's, forward and merge against a float64
reference, unmerge exact, QLoRA bases frozen while A and B train, Conv1D layouts, sizes,
the initialization's spread, and clear errors."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from shrink.modules import LoRALinear, QuantLinear
from shrink.quant import QuantSpec

NF4 = QuantSpec(format="nf4", granularity="group", group_size=64)


def _linear(i=64, o=48, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(i, o, bias=bias)


def _conv1d(i=64, o=48, seed=0):
    torch.manual_seed(seed)
    c = Conv1D(o, i)
    with torch.no_grad():
        c.bias.normal_()
    return c


def _quant(i=64, o=48, spec=NF4, seed=0):
    return QuantLinear.from_linear(_linear(i, o, seed=seed), spec)


def _x(i=64, rows=(3, 5), seed=1):
    return torch.randn(*rows, i, generator=torch.Generator().manual_seed(seed))


def _randomize_b(m: LoRALinear, seed=2):
    with torch.no_grad():
        m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=torch.Generator().manual_seed(seed)) * 0.1)


def _reference(m: LoRALinear, base_w: torch.Tensor, bias, x) -> torch.Tensor:
    """y = x W^T + b + (alpha/r) x A^T B^T in float64."""
    xd = x.double()
    y = xd @ base_w.double().t() + m.scaling * (xd @ m.lora_A.detach().double().t()) @ m.lora_B.detach().double().t()
    return y + (0 if bias is None else bias.detach().double())


@pytest.mark.parametrize("make", [_linear, _conv1d, _quant])
def test_initial_output_is_exactly_the_base(make):
    base = make()
    ref = copy.deepcopy(base)
    m = LoRALinear(base, rank=4, alpha=8)
    x = _x()
    with torch.no_grad():
        assert torch.equal(m(x), ref(x))
    assert torch.equal(m.lora_B, torch.zeros(48, 4)) and m.lora_A.shape == (4, 64)
    assert m.scaling == 2.0 and not m.merged


@pytest.mark.parametrize("make", [_linear, _conv1d, _quant])
def test_forward_merge_and_unmerge_against_float64(make):
    m = LoRALinear(make(), rank=4, alpha=12)
    _randomize_b(m)
    x = _x()
    w = m.base.dequantized_weight() if isinstance(m.base, QuantLinear) else (
        m.base.weight.t() if isinstance(m.base, Conv1D) else m.base.weight)
    ref = _reference(m, w.detach(), m.bias, x)
    with torch.no_grad():
        y = m(x)
    assert torch.allclose(y.double(), ref, atol=1e-5, rtol=1e-5)
    base_state = {k: v.clone() for k, v in m.base.state_dict().items()}
    m.merge()
    assert m.merged
    merged_w = (w.detach().double() + 3.0 * m.lora_B.detach().double() @ m.lora_A.detach().double()).float()
    assert torch.equal(m.merged_weight, merged_w)                    # W' = W + (alpha/r) B A, float64 sum
    with torch.no_grad():
        ym = m(x)
    assert torch.allclose(ym, y, atol=1e-5, rtol=1e-5)               # fp32 tolerance
    assert torch.allclose(ym.double(), ref, atol=1e-5, rtol=1e-5)
    m.unmerge()
    with torch.no_grad():
        assert torch.equal(m(x), y)                                  # exact
    for k, v in m.base.state_dict().items():
        assert torch.equal(v, base_state[k])                         # the base was never touched
    assert set(m.state_dict()) == {f"base.{k}" for k in base_state} | {"lora_A", "lora_B"}


def test_merge_keeps_the_state_dict_unmerged():
    m = LoRALinear(_linear(), rank=4)
    _randomize_b(m)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.merge()
    after = m.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_quantized_base_is_frozen_and_only_a_b_train():
    q = _quant()
    codes, scales = q.codes.clone(), q.scales.clone()
    m = LoRALinear(q, rank=4, alpha=8)
    assert [n for n, p in m.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    x = _x()
    for _ in range(2):
        opt.zero_grad()
        m(x).pow(2).mean().backward()
        assert q.bias.grad is None
        opt.step()
    assert m.lora_A.grad is not None and m.lora_B.grad is not None
    assert m.lora_A.grad.abs().sum() > 0 and m.lora_B.abs().sum() > 0   # B moved off zero, then A got a gradient
    assert torch.equal(q.codes, codes) and torch.equal(q.scales, scales)


def test_gradient_of_b_at_init_matches_the_definition():
    # with B = 0: dL/dB = scaling * G^T (x A^T) where G = dL/dy; dL/dA = 0
    m = LoRALinear(_linear(), rank=3, alpha=6)
    x = _x(rows=(7,))
    g = torch.randn(7, 48, generator=torch.Generator().manual_seed(5))
    (m(x) * g).sum().backward()
    expect = 2.0 * g.double().t() @ (x.double() @ m.lora_A.detach().double().t())
    assert torch.allclose(m.lora_B.grad.double(), expect, atol=1e-5)
    assert torch.equal(m.lora_A.grad, torch.zeros_like(m.lora_A))


def test_merged_module_is_a_plain_layer_in_the_source_layout():
    for base, cls in ((_linear(), nn.Linear), (_conv1d(), Conv1D), (_quant(), nn.Linear)):
        m = LoRALinear(base, rank=4)
        _randomize_b(m)
        plain = m.merged_module()
        assert type(plain) is cls and all(p.requires_grad for p in plain.parameters())
        x = _x()
        with torch.no_grad():
            assert torch.allclose(plain(x), m(x), atol=1e-5)
    m = LoRALinear(_quant(), rank=4, source="conv1d")            # a quantized Conv1D goes back to a Conv1D
    assert type(m.merged_module()) is Conv1D


def test_sizes():
    m = LoRALinear(_linear(), rank=4)
    assert m.adapter_nbytes == 4 * 4 * (64 + 48)
    assert m.nbytes == 64 * 48 * 4 + m.adapter_nbytes
    q = _quant()
    assert LoRALinear(q, rank=4).nbytes == q.nbytes + 4 * 4 * (64 + 48)


def test_a_is_gaussian_with_sigma_one_over_rank():
    m = LoRALinear(nn.Linear(4096, 64), rank=8, generator=torch.Generator().manual_seed(0))
    a = m.lora_A.detach().double()
    assert abs(float(a.std()) - 1 / 8) < 0.003 and abs(float(a.mean())) < 0.002
    again = LoRALinear(nn.Linear(4096, 64), rank=8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.lora_A, m.lora_A)


def test_dropout_only_in_training():
    m = LoRALinear(_linear(), rank=4, dropout=0.5)
    _randomize_b(m)
    x = _x()
    m.eval()
    with torch.no_grad():
        a, b = m(x), m(x)
        m.train()
        c = m(x)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_errors_name_the_layer():
    with pytest.raises(ValueError, match=r"blocks\.0\.fc.*rank 49 .*\[48, 64\].*at most 48"):
        LoRALinear(_linear(), rank=49, name="blocks.0.fc")
    LoRALinear(_linear(), rank=48)                               # a full-rank update is allowed
    with pytest.raises(TypeError, match="Conv2d"):
        LoRALinear(nn.Conv2d(3, 4, 3), rank=2)
    with pytest.raises(ValueError, match="alpha"):
        LoRALinear(_linear(), rank=2, alpha=0)
    with pytest.raises(ValueError, match="dropout"):
        LoRALinear(_linear(), rank=2, dropout=1.0)
    with pytest.raises(ValueError, match="rank must be a positive"):
        LoRALinear(_linear(), rank=0)


def test_shell_loads_a_state_dict_bit_exactly():
    for base, kind in ((_linear(), "linear"), (_conv1d(), "conv1d")):
        m = LoRALinear(base, rank=4, alpha=8)
        _randomize_b(m)
        shell = LoRALinear.shell(64, 48, 4, 8.0, base=kind, source=kind)
        shell.load_state_dict(m.state_dict())
        x = _x()
        with torch.no_grad():
            assert torch.equal(shell(x), m(x))
