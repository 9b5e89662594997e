"""QAT layers: fake-quantized forward, STE gradients, observers that freeze, LSQ scales,
starting from a PTQ layer, and conversion to QuantLinear / QuantConv2d that computes what
the training forward computed."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shrink.modules.quant_conv2d import QuantConv2d
from shrink.modules.quant_linear import QuantLinear
from shrink.quant import QuantSpec, dequantize, fake_quantize, quantize
from shrink.quant.core import in_range_mask
from shrink.quant.lsq import clamp_scale
from shrink.surgery import select_modules
from shrink.train.engine import TrainOptions, train
from shrink.train.qat import (ActFakeQuant, QATLayer, convert_qat, freeze_qat, prepare_qat, qat_layers,
                              wrap_target)

G32 = QuantSpec(bits=4, symmetric=False, granularity="group", group_size=32)
CH2 = QuantSpec(bits=2, symmetric=True, granularity="channel")


def _net(seed: int = 0) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(seed)
    return nn.Sequential(nn.Unflatten(1, (2, 8, 8)), nn.Conv2d(2, 16, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(1024, 64), nn.ReLU(), Conv1D(32, 64), nn.ReLU(), nn.Linear(32, 16)).eval()


def _targets(model, **kw):
    return list(select_modules(model, types=("linear", "conv1d", "conv2d", "quant_linear", "quant_conv2d"),
                               **kw).targets)


def test_forward_is_the_layer_on_its_fake_quantized_weight():
    lin = nn.Linear(64, 16)
    t = _targets(nn.Sequential(lin))[0]
    layer = wrap_target(t, G32)
    x = torch.randn(5, 64)
    qt = quantize(lin.weight.detach(), G32)
    assert torch.equal(layer(x), F.linear(x, dequantize(qt), lin.bias))
    assert not torch.equal(layer(x), lin(x))


def test_weight_gradient_is_straight_through_masked_outside_the_range():
    torch.manual_seed(0)
    lin = nn.Linear(64, 16)
    layer = wrap_target(_targets(nn.Sequential(lin))[0], G32)
    with torch.no_grad():   # ranges from the first weights, then push some weights outside them
        layer.freeze()
        layer.weight[0, :5] *= 3.0
    x, g = torch.randn(7, 64), torch.randn(7, 16)
    layer(x).backward(g)
    lay_mask = in_range_mask(layer.weight.detach().reshape(16, 2, 32), layer.scale.reshape(16, 2, 1),
                             layer.zero_point.reshape(16, 2, 1), G32.grid()).reshape(16, 64)
    assert (~lay_mask).any()
    expected = (g.t().double() @ x.double()) * lay_mask
    torch.testing.assert_close(layer.weight.grad.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.bias.grad, g.sum(0))


def test_weight_ranges_follow_the_weights_until_frozen():
    layer = wrap_target(_targets(nn.Sequential(nn.Linear(64, 16)))[0], G32)
    layer(torch.randn(2, 64))
    with torch.no_grad():
        layer.weight.mul_(2.0)
    layer(torch.randn(2, 64))
    s_live = layer.scale.clone()
    assert torch.equal(s_live, quantize(layer.weight.detach(), G32).scale)     # followed the weights
    layer.freeze()
    with torch.no_grad():
        layer.weight.mul_(2.0)
    layer(torch.randn(2, 64))
    assert torch.equal(layer.scale, s_live) and bool(layer.frozen)             # fixed from now on


def test_activation_observer_is_an_ema_that_freezes():
    act = ActFakeQuant(8, momentum=0.5).train()
    x1 = torch.linspace(-1.0, 3.0, 50).reshape(5, 10)
    x2 = torch.linspace(-3.0, 1.0, 50).reshape(5, 10)
    act(x1)
    assert float(act.lo) == -1.0 and float(act.hi) == 3.0                      # the first batch sets the range
    act(x2)
    assert float(act.lo) == pytest.approx(-2.0) and float(act.hi) == pytest.approx(2.0)
    act.eval()(torch.full((2, 10), 100.0))                                     # eval mode never observes
    assert float(act.hi) == pytest.approx(2.0)
    act.train().freeze()
    out = act(torch.full((2, 10), 100.0))
    assert float(act.hi) == pytest.approx(2.0) and int(act.observed) == 2
    s, zp = act.observed_params()
    assert torch.equal(out, fake_quantize(torch.full((2, 10), 100.0), act.spec, scale=s, zero_point=zp))
    assert float(out.max()) == pytest.approx(2.0, abs=float(s))               # clipped to the frozen range
    assert torch.equal(ActFakeQuant(4).eval()(x1), x1)                             # nothing observed: identity


def test_lsq_scales_learn_and_conversion_keeps_them():
    model = _net()
    prepare_qat(model, _targets(model), G32, lsq=True)
    before = {n: m.scale.detach().clone() for n, m in qat_layers(model).items()}
    x, y = torch.rand(32, 128), torch.randint(0, 16, (32,))
    tr = train(model, [(x, y)], lambda m, b: F.cross_entropy(m(b[0]), b[1]), TrainOptions(steps=5, lr=1e-2))
    assert tr.losses[-1] < tr.losses[0]
    layers = qat_layers(model)
    assert all(not torch.equal(before[n], m.scale) for n, m in layers.items())
    fq = model(x)
    wanted = {n: clamp_scale(m.scale, m.spec).detach().half() for n, m in layers.items()}
    new = convert_qat(model)
    for n, q in new.items():
        assert torch.equal(q.scales, wanted[n].reshape(q.scales.shape))
    torch.testing.assert_close(model(x), fq, rtol=0.02, atol=0.02)


@pytest.mark.parametrize("lsq", [False, True])
@pytest.mark.parametrize("act_bits", [None, 8])
def test_converted_model_computes_what_the_fake_quantized_forward_did(lsq, act_bits):
    model = _net(1)
    x, y = torch.rand(16, 128), torch.randint(0, 16, (16,))
    prepare_qat(model, _targets(model), G32, lsq=lsq, act_bits=act_bits)
    train(model, [(x, y)], lambda m, b: F.cross_entropy(m(b[0]), b[1]), TrainOptions(steps=4, lr=1e-2),
          callback=lambda d, m: freeze_qat(m) if d == 2 else None)
    layers = qat_layers(model)
    weights = {n: m.fake_weight().detach() for n, m in layers.items()}
    for m in layers.values():   # the converted layers do not quantize activations: compare like with like
        m.act = None
    fq = model(x).detach()
    new = convert_qat(model)
    assert not qat_layers(model)
    assert isinstance(new["1"], QuantConv2d) and isinstance(new["6"], QuantLinear)   # the Conv1D too
    for n, q in new.items():
        assert torch.equal(q.dequantized_weight().reshape(weights[n].shape), weights[n])
    assert new["4"].kernel == "int4pack_cpu"
    torch.testing.assert_close(model(x), fq, rtol=0.02, atol=0.03)                     # the kernel's bf16
    xr = x.clone().requires_grad_(True)                                                 # the reference path
    assert torch.equal(model(xr), fq)


def test_starting_from_a_ptq_layer_reproduces_it_exactly():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    ql = QuantLinear.from_linear(lin, G32, kernel="reference")
    model = nn.Sequential(ql, nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(6, 64)
    ref = model(x)
    t = _targets(model)
    assert [u.kind for u in t] == ["quant_linear", "linear"]
    layers = prepare_qat(model, t[:1], G32)
    assert bool(layers["0"].frozen)
    assert torch.equal(layers["0"].scale, ql.scales) and torch.equal(layers["0"].zero_point, ql.zeros)
    assert torch.equal(model(x), ref)   # step 0: the PTQ layer's computation, bit for bit
    assert not bool(prepare_qat(model, t[1:], G32)["2"].frozen)   # a float layer: observed until frozen
    other = prepare_qat(nn.Sequential(QuantLinear.from_linear(lin, CH2)), _targets(nn.Sequential(
        QuantLinear.from_linear(lin, CH2))), G32)["0"]
    assert not bool(other.frozen)       # a different grid: ranges observed afresh on the dequantized weight


def test_sparse_layer_keeps_its_zeros_through_training_and_conversion():
    from shrink.modules.sparse_linear import SparseLinear

    torch.manual_seed(0)
    lin = nn.Linear(64, 16)
    mask = torch.rand(16, 64) > 0.5
    model = nn.Sequential(SparseLinear.from_linear(lin, mask), nn.Linear(16, 4))
    layers = prepare_qat(model, list(select_modules(model).targets), G32)
    x, y = torch.randn(32, 64), torch.randint(0, 4, (32,))
    train(model, [(x, y)], lambda m, b: F.cross_entropy(m(b[0]), b[1]), TrainOptions(steps=5, lr=1e-2),
          masks={layers["0"].weight: layers["0"].mask})
    new = convert_qat(model)
    w = new["0"].dequantized_weight()
    assert torch.equal(w[~mask], torch.zeros(int((~mask).sum())))
    assert (w[mask] != 0).sum() > 0.8 * mask.sum()


def test_bad_input():
    model = nn.Sequential(nn.Embedding(10, 4))
    with pytest.raises(ValueError, match="no layer to train"):
        prepare_qat(model, _targets(model), G32)
    lin = nn.Sequential(nn.Linear(8, 4))
    with pytest.raises(TypeError, match="QuantSpec"):
        prepare_qat(lin, _targets(lin), "int4")
    with pytest.raises(ValueError, match="integer formats"):
        prepare_qat(lin, _targets(lin), QuantSpec(format="nf4"))
    with pytest.raises(ValueError, match="act_bits must be in 2..8"):
        ActFakeQuant(12)
    with pytest.raises(ValueError, match="kind must be linear or conv2d"):
        QATLayer("embedding", torch.zeros(4, 4), None, G32)
    circ = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="circular"))
    with pytest.raises(ValueError, match="circular"):
        prepare_qat(circ, _targets(circ), QuantSpec(bits=4))


def test_quantized_layers_are_targets_only_when_asked_for_even_without_a_bias():
    ql = QuantLinear.from_linear(nn.Linear(64, 16, bias=False), G32)
    model = nn.Sequential(ql, nn.Linear(16, 4))
    assert [t.name for t in select_modules(model).targets] == ["1"]
    (t,) = select_modules(model, types=("quant_linear",), include=["0"]).targets
    assert t.kind == "quant_linear" and (t.out_features, t.in_features) == (16, 64)
    assert torch.equal(t.weight_view(), ql.dequantized_weight())
    with pytest.raises(ValueError, match="stored compressed"):
        t.set_weight(torch.zeros(16, 64))
