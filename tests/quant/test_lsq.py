"""LSQ fake quantization: values bit-exact with quantize/dequantize, gradients against the
LSQ paper's formulas computed directly in float64."""
from __future__ import annotations

import math

import pytest
import torch

from shrink.quant import QuantSpec, dequantize, quantize
from shrink.quant.lsq import clamp_scale, lsq_fake_quantize, lsq_grad_scale, observed_params

SPECS = [
    QuantSpec(bits=4, symmetric=True, granularity="channel"),
    QuantSpec(bits=4, symmetric=False, granularity="group", group_size=16),
    QuantSpec(bits=3, symmetric=False, granularity="group", group_size=12),     # ragged: 40 = 3 * 12 + 4
    QuantSpec(bits=2, symmetric=True, granularity="tensor"),
    QuantSpec(bits=8, symmetric=False, granularity="channel"),
]


def _blocks64(x: torch.Tensor, spec: QuantSpec) -> list[tuple[torch.Tensor, tuple]]:
    """[(elements of one block as float64, index of its scale)] by plain Python slicing."""
    if spec.granularity == "tensor":
        return [(x.reshape(-1).double(), ())]
    out = []
    for r in range(x.shape[0]):
        row = x[r].double()
        if spec.granularity == "channel":
            out.append((row, (r,)))
        else:
            g = spec.group_size
            for j in range(math.ceil(row.numel() / g)):
                out.append((row[j * g:(j + 1) * g], (r, j)))
    return out


def _case(spec: QuantSpec, seed: int = 0):
    torch.manual_seed(seed)
    x = torch.randn(6, 40) * 0.7
    scale, zp = observed_params(x, spec)
    # shrink the range a little so that some elements clip, and move off exact grid ties
    scale = (scale.float() * 0.8 * (1 + 0.01 * torch.rand(scale.shape))).to(torch.float32)
    return x, scale, zp


def _paper_grads(x, scale, zp, spec, grad_out, g):
    """d L / d x and d L / d s by the LSQ paper's piecewise formulas, in float64."""
    grid = spec.grid()
    gx = torch.zeros_like(x, dtype=torch.float64)
    gs = torch.zeros_like(scale, dtype=torch.float64)
    go = grad_out.double()
    for (v, idx), (gv, _) in zip(_blocks64(x, spec), _blocks64(go, spec)):
        s = scale[idx].double()
        z = 0.0 if zp is None else zp[idx].double()
        total = 0.0
        for k in range(v.numel()):
            u = v[k] / s + z
            if grid.qmin < u < grid.qmax:
                d_s, d_x = torch.round(u) - u, 1.0
            elif u <= grid.qmin:
                d_s, d_x = grid.qmin - z, 0.0
            else:
                d_s, d_x = grid.qmax - z, 0.0
            total = total + gv[k] * d_s
            # write d_x back at the element's position
            _set(gx, spec, idx, k, gv[k] * d_x)
        gs[idx] = total * g
    return gx, gs


def _set(t, spec, idx, k, value):
    if spec.granularity == "tensor":
        t.view(-1)[k] = value
    elif spec.granularity == "channel":
        t[idx[0], k] = value
    else:
        t[idx[0], idx[1] * spec.group_size + k] = value


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"int{s.bits}-{s.granularity}-{'sym' if s.symmetric else 'asym'}")
def test_forward_is_quantize_then_dequantize(spec):
    x, scale, zp = _case(spec)
    got = lsq_fake_quantize(x, scale, spec, zp)
    stored = scale.to(spec.scale_dtype)
    ref = dequantize(quantize(x, spec, scale=stored, zero_point=zp))
    got_stored = lsq_fake_quantize(x, stored.float(), spec, zp)
    assert torch.equal(got_stored, ref)
    assert got.shape == x.shape and torch.isfinite(got).all()


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"int{s.bits}-{s.granularity}-{'sym' if s.symmetric else 'asym'}")
def test_gradients_match_the_paper_in_float64(spec):
    x, scale, zp = _case(spec, seed=1)
    x = x.clone().requires_grad_(True)
    s = scale.clone().requires_grad_(True)
    grad_out = torch.randn(x.shape)
    lsq_fake_quantize(x, s, spec, zp).backward(grad_out)
    lay_n = {"tensor": x.numel(), "channel": x.shape[1]}.get(spec.granularity, spec.group_size)
    g = 1.0 / math.sqrt(lay_n * spec.grid().qmax)
    gx, gs = _paper_grads(x.detach(), scale, zp, spec, grad_out, g)
    clipped = (gx == 0) & (grad_out != 0)
    assert clipped.any() and (~clipped).any()          # both branches of the STE exercised
    assert torch.equal(x.grad, gx.float())             # STE: the incoming gradient, or 0 outside the range
    torch.testing.assert_close(s.grad.double(), gs, rtol=1e-5, atol=1e-6)


def test_gradients_match_the_papers_reference_code():
    """The paper's own formulation (grad_scale and round_pass tricks through autograd), float64."""
    spec = QuantSpec(bits=4, symmetric=False, granularity="group", group_size=8)
    x, scale, zp = _case(spec, seed=2)
    x = x[:, :32]
    scale, zp = scale[:, :4], zp[:, :4]
    grad_out = torch.randn(x.shape)

    x1, s1 = x.clone().requires_grad_(True), scale.clone().requires_grad_(True)
    lsq_fake_quantize(x1, s1, spec, zp).backward(grad_out)

    g = 1.0 / math.sqrt(8 * 15)
    x2 = x.double().reshape(6, 4, 8).requires_grad_(True)
    s2 = scale.double().reshape(6, 4, 1).requires_grad_(True)
    z = zp.double().reshape(6, 4, 1)
    sg = (s2 - s2 * g).detach() + s2 * g                      # grad_scale(s, g)
    v = torch.clamp(x2 / sg + z, 0, 15)
    vbar = (v.round() - v).detach() + v                       # round_pass(v)
    ((vbar - z) * sg).reshape(6, 32).backward(grad_out.double())
    torch.testing.assert_close(x1.grad.double(), x2.grad.reshape(6, 32))
    torch.testing.assert_close(s1.grad.double(), s2.grad.reshape(6, 4), rtol=1e-5, atol=1e-6)


def test_grad_scale_default_and_override():
    spec = QuantSpec(bits=4, symmetric=True, granularity="channel")
    x, scale, _ = _case(spec)
    s1 = scale.clone().requires_grad_(True)
    lsq_fake_quantize(x, s1, spec).sum().backward()
    s2 = scale.clone().requires_grad_(True)
    lsq_fake_quantize(x, s2, spec, grad_scale=1.0).sum().backward()
    assert lsq_grad_scale(40, 7) == pytest.approx(1 / math.sqrt(280))
    torch.testing.assert_close(s1.grad, s2.grad * lsq_grad_scale(40, 7))


def test_a_single_scale_broadcasts_and_gets_the_summed_gradient():
    spec = QuantSpec(bits=4, symmetric=True, granularity="channel")
    x, scale, _ = _case(spec)
    one = torch.tensor(float(scale.mean()), requires_grad=True)
    many = one.detach().expand(6).clone().requires_grad_(True)
    a = lsq_fake_quantize(x, one, spec, grad_scale=1.0)
    b = lsq_fake_quantize(x, many, spec, grad_scale=1.0)
    assert torch.equal(a, b)
    g = torch.randn(x.shape)
    a.backward(g)
    b.backward(g)
    torch.testing.assert_close(one.grad, many.grad.sum())


def test_clamp_scale_rounds_to_the_stored_dtype_with_a_straight_through_gradient():
    spec = QuantSpec(bits=4)
    s = torch.tensor([0.1234567, 1e-30, 3.0], requires_grad=True)
    out = clamp_scale(s, spec)
    assert torch.equal(out.detach()[[0, 2]], s.detach()[[0, 2]].half().float())
    assert out[1] > 0 and torch.isfinite(1 / out[1])
    out.sum().backward()
    assert torch.equal(s.grad, torch.tensor([1.0, 0.0, 1.0]))   # the clamped entry gets none


@pytest.mark.parametrize("spec", SPECS[:3], ids=str)
def test_observed_params_are_what_quantize_stores(spec):
    x, _, _ = _case(spec)
    s, zp = observed_params(x, spec)
    qt = quantize(x, spec)
    assert torch.equal(s, qt.scale)
    assert (zp is None and qt.zero_point is None) or torch.equal(zp, qt.zero_point)


def test_bad_input():
    x = torch.randn(4, 8)
    spec = QuantSpec(bits=4, symmetric=False, granularity="channel")
    s, zp = observed_params(x, spec)
    with pytest.raises(ValueError, match="integer format"):
        lsq_fake_quantize(x, torch.ones(4), QuantSpec(format="nf4"))
    with pytest.raises(ValueError, match="finite and positive"):
        lsq_fake_quantize(x, -s.float(), spec, zp)
    with pytest.raises(ValueError, match="needs zero_point"):
        lsq_fake_quantize(x, s.float(), spec)
    with pytest.raises(ValueError, match="has 3 values"):
        lsq_fake_quantize(x, torch.ones(3), spec, zp)
    with pytest.raises(ValueError, match="symmetric spec has no zero-point"):
        lsq_fake_quantize(x, s.float(), QuantSpec(bits=4), torch.ones(4))
    with pytest.raises(ValueError, match="empty"):
        lsq_fake_quantize(torch.empty(0, 8), torch.ones(()), QuantSpec(bits=4, granularity="tensor"))
    with pytest.raises(ValueError, match="numel_per_scale"):
        lsq_grad_scale(0, 7)
