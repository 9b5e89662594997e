"""fake_quantize: forward = dequantize(quantize(x)); backward = straight-through
inside the clipping range, zero outside. References: torch.fake_quantize_per_tensor_affine
and torch.fake_quantize_per_channel_affine (forward values and gradients)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shrink.quant import QuantSpec, dequantize, fake_quantize, quantize

PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _rows(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """x as [blocks, block_len] (zero-padded ragged group), independent of shrink's layout code."""
    if spec.granularity == "tensor":
        return x.reshape(1, -1), x.numel()
    axis = spec.axis % x.dim()
    r = x.movedim(axis, 0).reshape(x.shape[axis], -1)
    if spec.granularity == "channel":
        return r, r.shape[1]
    c, k = r.shape
    g = spec.group_size
    pad = -k % g
    return torch.nn.functional.pad(r, (0, pad)).reshape(-1, g), k


def _unrows(r: torch.Tensor, x: torch.Tensor, spec: QuantSpec, k: int) -> torch.Tensor:
    if spec.granularity == "tensor":
        return r.reshape(x.shape)
    axis = spec.axis % x.dim()
    c = x.shape[axis]
    flat = r.reshape(c, -1)[:, :k]
    moved = [c] + [s for i, s in enumerate(x.shape) if i != axis]
    return flat.reshape(moved).movedim(0, axis)


def torch_fake_quant(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor, zp: torch.Tensor | None):
    """torch.fake_quantize_per_channel_affine with one channel per block."""
    grid = spec.grid()
    rows, k = _rows(x, spec)
    n = rows.shape[0]
    s = scale.to(torch.float32).reshape(-1).expand(n).contiguous()
    z = (zp.to(torch.int32).reshape(-1) if zp is not None else torch.zeros(1, dtype=torch.int32)).expand(n).contiguous()
    out = torch.fake_quantize_per_channel_affine(rows, s, z, 0, grid.qmin, grid.qmax)
    return _unrows(out, x, spec, k)


@st.composite
def cases(draw):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim)))
    gran = draw(st.sampled_from(["tensor", "channel", "group"]))
    spec = QuantSpec(
        bits=draw(st.integers(2, 8)),
        symmetric=draw(st.booleans()),
        granularity=gran,
        group_size=draw(st.integers(1, 8)) if gran == "group" else None,
        axis=draw(st.integers(-ndim, ndim - 1)),
    )
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(shape, generator=g) * draw(st.sampled_from([0.01, 1.0, 20.0])) + draw(st.sampled_from([0.0, 0.5]))
    observer = draw(st.sampled_from(["minmax", "mse", "percentile"]))
    return x, spec, observer


@PROPS
@given(cases())
def test_forward_and_gradient_equal_torch_fake_quantize(case):
    x, spec, observer = case
    kw = {"percentile": 90.0} if observer == "percentile" else {}
    qt = quantize(x, spec, observer=observer, **kw)  # the same parameters fake_quantize will choose
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    before = x.clone()
    ya = fake_quantize(a, spec, observer=observer, **kw)
    yb = torch_fake_quant(b, spec, qt.scale, qt.zero_point)
    assert torch.equal(ya, yb)
    assert torch.equal(ya, dequantize(qt))
    g = torch.randn(x.shape)
    ya.backward(g)
    yb.backward(g)
    assert torch.equal(a.grad, b.grad)
    assert torch.equal(a.detach(), before)


@pytest.mark.parametrize("symmetric", [True, False])
def test_per_tensor_matches_fake_quantize_per_tensor_affine_with_clipping(symmetric):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(40, 30, generator=g) * 2).requires_grad_()
    scale = 0.01  # clips most of x
    spec = QuantSpec(bits=8, symmetric=symmetric, granularity="tensor")
    zp, qmin, qmax = (0, -127, 127) if symmetric else (100, 0, 255)
    y = fake_quantize(x, spec, scale=torch.tensor(scale), zero_point=None if symmetric else torch.tensor(float(zp)))
    x2 = x.detach().clone().requires_grad_()
    y2 = torch.fake_quantize_per_tensor_affine(x2, scale, zp, qmin, qmax)
    assert torch.equal(y, y2)
    upstream = torch.randn(40, 30, generator=g)
    y.backward(upstream)
    y2.backward(upstream)
    assert torch.equal(x.grad, x2.grad)
    inside = (x.grad != 0)
    assert 0.05 < inside.float().mean() < 0.95          # both regions are exercised
    assert torch.equal(x.grad[inside], upstream[inside])  # straight through inside
    assert (x.grad[~inside] == 0).all()                   # zero outside


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_per_channel_matches_fake_quantize_per_channel_affine(axis):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 5, 4, generator=g).requires_grad_()
    c = x.shape[axis]
    scale = torch.rand(c, generator=g) * 0.02 + 0.004
    zp = torch.randint(0, 16, (c,), generator=g)
    spec = QuantSpec(bits=4, symmetric=False, granularity="channel", axis=axis)
    y = fake_quantize(x, spec, scale=scale, zero_point=zp.float())
    x2 = x.detach().clone().requires_grad_()
    y2 = torch.fake_quantize_per_channel_affine(x2, scale, zp.to(torch.int32), axis % 3, 0, 15)
    assert torch.equal(y, y2)
    y.sum().backward()
    y2.sum().backward()
    assert torch.equal(x.grad, x2.grad)


def test_minmax_passes_every_gradient_through():
    g = torch.Generator().manual_seed(2)
    for spec in (QuantSpec(bits=4), QuantSpec(bits=3, symmetric=False, granularity="group", group_size=5),
                 QuantSpec(format="nf4"), QuantSpec(format="fp8-e4m3"), QuantSpec(format="fp8-e5m2")):
        x = torch.randn(7, 23, generator=g).requires_grad_()
        upstream = torch.randn(7, 23, generator=g)
        fake_quantize(x, spec).backward(upstream)
        assert torch.equal(x.grad, upstream), spec


def test_mse_observer_clips_and_zeroes_gradients_outside(heavy_tailed):
    x = heavy_tailed[:32].clone().requires_grad_()
    spec = QuantSpec(bits=3, granularity="tensor")
    y = fake_quantize(x, spec, observer="mse")
    y.sum().backward()
    qt = quantize(heavy_tailed[:32], spec, observer="mse")
    s = qt.scale.float()
    outside = (heavy_tailed[:32] / s).round().abs() > 3   # int3 restricted: codes -3..3
    assert outside.any() and (~outside).any()
    assert torch.equal(x.grad == 0, outside)


@pytest.mark.parametrize("fmt", ["nf4", "fp8-e4m3"])
def test_float_and_table_formats_forward_and_gradient_mask(fmt):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 64, generator=g)
    spec = QuantSpec(format=fmt)
    scale = torch.full((4,), x.abs().max().item() / (2.0 if fmt == "nf4" else 1000.0))
    xr = x.clone().requires_grad_()
    y = fake_quantize(xr, spec, scale=scale)
    assert torch.equal(y, dequantize(quantize(x, spec, scale=scale)))
    y.sum().backward()
    limit = 1.0 if fmt == "nf4" else 448.0
    inside = (x * (1.0 / scale[:, None])).abs() <= limit
    assert (~inside).any()
    assert torch.equal(xr.grad, inside.float())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtype_is_kept_and_input_untouched(dtype):
    x = torch.randn(8, 16).to(dtype)
    before = x.clone()
    xr = x.clone().requires_grad_()
    y = fake_quantize(xr, QuantSpec(bits=4))
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y, dequantize(quantize(x, QuantSpec(bits=4))))
    y.sum().backward()
    assert xr.grad.dtype == dtype
    assert torch.equal(x, before) and torch.equal(xr.detach(), before)


def test_unscaled_float_format_fake_quantize_is_the_cast():
    x = torch.randn(5, 7) * 1000
    y = fake_quantize(x, QuantSpec.from_name("fp16"))
    assert torch.equal(y, x.half().float())


def test_non_finite_input_raises_naming_the_index():
    x = torch.randn(3, 4)
    x[1, 2] = math.nan
    with pytest.raises(ValueError, match=r"fake_quantize.*index \(1, 2\)"):
        fake_quantize(x.requires_grad_(), QuantSpec())


def test_bad_arguments():
    with pytest.raises(TypeError, match="QuantSpec"):
        fake_quantize(torch.randn(3), "int8")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="observer"):
        fake_quantize(torch.randn(3, 3), QuantSpec(), observer="histogram")
    with pytest.raises(ValueError, match="scale"):
        fake_quantize(torch.randn(3, 3), QuantSpec(), scale=torch.ones(2))



def test_empty_input_gives_empty_output_or_a_clear_error():
    try:
        y = fake_quantize(torch.zeros(0, 4), QuantSpec())
    except ValueError as e:
        assert "empty" in str(e)
    else:
        assert y.shape == (0, 4)


def test_seed_style_ste_with_a_loss():
    """Gradients of a loss through a fake-quantized weight are the float gradients, masked."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(8, 16, generator=g).requires_grad_()
    x = torch.randn(32, 16, generator=g)
    spec = QuantSpec(bits=4)
    y = x @ fake_quantize(w, spec).t()
    y.pow(2).mean().backward()
    w_hat = dequantize(quantize(w.detach(), spec)).requires_grad_()
    (x @ w_hat.t()).pow(2).mean().backward()
    assert torch.allclose(w.grad, w_hat.grad, rtol=0, atol=0)
