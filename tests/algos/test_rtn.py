"""rtn: round-to-nearest through shrink.quant.quantize, with an honest loss."""
from __future__ import annotations

import pytest
import torch

from shrink.algos import QuantResult, rtn
from shrink.observe import HessianObserver
from shrink.quant import QuantSpec, dequantize, quantize


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def query_weight() -> torch.Tensor:
    """MiniLM's pretrained layer-0 query projection [384, 384]."""
    from safetensors import safe_open

    from shrink.models import minilm_dir

    with safe_open(str(minilm_dir() / "model.safetensors"), framework="pt") as f:
        return f.get_tensor("encoder.layer.0.attention.self.query.weight")


SPECS = [
    QuantSpec(bits=4),
    QuantSpec(bits=3, symmetric=False),
    QuantSpec.from_name("int4-g128"),
    QuantSpec(bits=2, symmetric=False, granularity="group", group_size=100),  # ragged last group
    QuantSpec(bits=8, granularity="tensor"),
    QuantSpec.from_name("nf4-g64"),
    QuantSpec(format="fp8-e4m3"),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.format}{s.bits}-{s.granularity}{s.group_size or ''}")
def test_same_codes_as_quantize_and_weight_mse(query_weight, spec):
    w = query_weight
    r = rtn(w, spec)
    ref = quantize(w, spec)
    assert isinstance(r, QuantResult)
    assert torch.equal(r.qtensor.int_codes(), ref.int_codes())
    assert torch.equal(r.qtensor.scale, ref.scale)
    assert torch.equal(r.dequantize(), dequantize(ref))
    mse = float((w.double() - dequantize(ref).double()).square().mean())
    assert r.loss == pytest.approx(mse, rel=1e-12)
    assert (r.retries, r.dead_columns, r.perm, r.damp_used, r.static_groups) == (0, 0, None, 0.0, False)
    assert r.seconds >= 0


def test_observer_options_reach_quantize(query_weight):
    w = query_weight
    spec = QuantSpec(bits=4, symmetric=False)
    mm, mse = rtn(w, spec), rtn(w, spec, observer="mse", grid_points=50)
    assert torch.equal(mse.qtensor.scale, quantize(w, spec, observer="mse", grid_points=50).scale)
    assert mse.loss < mm.loss  # an MSE-searched range beats min/max on real weights
    pct = rtn(w, spec, observer="percentile", percentile=99.0)
    assert torch.equal(pct.qtensor.scale, quantize(w, spec, observer="percentile", percentile=99.0).scale)
    with pytest.raises(ValueError, match="observer"):
        rtn(w, spec, observer="minmax", percentile=99.0)


def test_loss_with_hessian_is_the_output_error(query_weight):
    """loss = tr((W - Q) H (W - Q)^T) = 2/n ||W X - Q X||_F^2 for H from the observer."""
    w = query_weight
    x = _randn(600, 384, seed=1) @ (torch.eye(384) + 0.3 * _randn(384, 384, seed=2) / 384 ** 0.5)
    obs = HessianObserver(384)
    obs.observe(x.double())  # float64 inputs: float64 products, so the identity holds to 1e-10
    r = rtn(w, QuantSpec.from_name("int4-g128"), hessian=obs.hessian())
    d = (w.double() - r.dequantize().double())
    assert r.loss == pytest.approx(2.0 / 600 * float((d @ x.double().T).square().sum()), rel=1e-10)
    # the loss is in output units: it grows with the inputs' scale, unlike the weight MSE
    r2 = rtn(w, QuantSpec.from_name("int4-g128"), hessian=4 * obs.hessian())
    assert r2.loss == pytest.approx(4 * r.loss, rel=1e-12)


def test_inputs_not_modified_and_dtype_kept(query_weight):
    w = query_weight.to(torch.bfloat16)
    before = w.clone()
    h = torch.eye(384, dtype=torch.float64)
    h_before = h.clone()
    r = rtn(w, QuantSpec(bits=4), hessian=h)
    assert torch.equal(w, before) and torch.equal(h, h_before)
    assert r.dequantize().dtype == torch.bfloat16


def test_bad_inputs():
    w = _randn(16, 32)
    spec = QuantSpec(bits=4)
    with pytest.raises(ValueError, match=r"2-D \[out, in\]"):
        rtn(_randn(32), spec)
    with pytest.raises(ValueError, match="axis=1"):
        rtn(w, QuantSpec(bits=4, axis=1))
    with pytest.raises(TypeError, match="QuantSpec"):
        rtn(w, "int4")
    bad = w.clone()
    bad[3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"rtn: weight .*\(3, 5\)"):
        rtn(bad, spec)
    with pytest.raises(ValueError, match=r"hessian has shape \(16, 16\).*\[32, 32\]"):
        rtn(w, spec, hessian=torch.eye(16))
    with pytest.raises(ValueError, match="empty"):
        rtn(torch.zeros(0, 4), spec)
