"""AWQ on real activations: never worse than RTN, better where activations are uneven."""
from __future__ import annotations

import pytest
import torch

from shrink.algos.awq import awq
from shrink.quant import QuantSpec, dequantize, quantize

W4 = QuantSpec.from_name("int4-g128")
W3 = QuantSpec.from_name("int3-g128")


FAST = dict(grid=10, clip_grid=10, max_tokens=512)


def out_err(x, w, w_hat):
    return float(((x @ w_hat.T - x @ w.T) ** 2).mean())


@pytest.mark.parametrize("spec", [W4, W3, QuantSpec(bits=4, symmetric=True)], ids=["w4g128", "w3g128", "w4-channel"])
def test_awq_beats_rtn_on_real_minilm_activations(minilm_activations, spec):
    ratios = []
    for name, (w, x) in minilm_activations.items():
        x = x[:512]
        res = awq(w, x, spec, **FAST)
        rtn = out_err(x, w, dequantize(quantize(w, spec)).float())
        assert res.error_rtn == pytest.approx(rtn, rel=1e-5)  # alpha 0 is plain RTN
        (eff,) = res.effective_weights()
        assert res.error == pytest.approx(out_err(x, w, eff), rel=1e-5)
        assert res.error <= rtn  # never worse: alpha 0 and "no clip" are candidates
        ratios.append(res.error / rtn)
    assert min(ratios) < 0.95, ratios  # and it helps on real layers


def test_scales_fold_exactly_in_float64(minilm_activations):
    w, x = minilm_activations["encoder.layer.2.intermediate.dense"]
    res = awq(w, x, W4, clip=False, grid=20, max_tokens=256)
    s = res.scales.double()
    y = x.double() @ w.double().T
    y_folded = (x.double() / s) @ (w.double() * s).T
    assert torch.allclose(y, y_folded, rtol=1e-10, atol=1e-10)
    assert 0.0 <= res.alpha < 1.0 and len(res.errors_by_alpha) == 20


def test_weights_sharing_an_input_share_the_scales(minilm_activations):
    w, x = minilm_activations["encoder.layer.1.attention.self.query"]
    g = torch.Generator().manual_seed(0)
    k = w + 0.01 * torch.randn(w.shape, generator=g)
    x = x[:512]
    res = awq([w, k], x, W4, **FAST)
    assert len(res.qtensors) == 2
    rtn = out_err(x, w, dequantize(quantize(w, W4)).float()) + out_err(x, k, dequantize(quantize(k, W4)).float())
    assert res.error <= rtn * (1 + 1e-6)


def test_clipping_search_never_hurts(minilm_activations):
    w, x = minilm_activations["encoder.layer.4.output.dense"]
    x = x[:512]
    assert awq(w, x, W3, **FAST).error <= awq(w, x, W3, clip=False, **FAST).error * (1 + 1e-6)


def test_inputs_not_modified_and_bad_input(minilm_activations):
    w, x = minilm_activations["encoder.layer.2.intermediate.dense"]
    w0, x0 = w.clone(), x.clone()
    awq(w, x[:64], W4, grid=2, clip_grid=2)
    assert torch.equal(w, w0) and torch.equal(x, x0)
    with pytest.raises(ValueError, match="features"):
        awq(w, x[:, :10], W4)
    with pytest.raises(ValueError, match="integer spec"):
        awq(w, x, QuantSpec(format="nf4", granularity="group", group_size=64))
    bad = w.clone()
    bad[3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"\(3, 5\)"):
        awq(bad, x, W4)


def test_given_scales_skip_the_search_and_reproduce_it(minilm_activations):
    w, x = minilm_activations["encoder.layer.2.intermediate.dense"]
    x = x[:512]
    searched = awq(w, x, W4, **FAST)
    again = awq(w, x, W4, scales=searched.scales, **FAST)
    assert torch.equal(again.qtensors[0].int_codes(), searched.qtensors[0].int_codes())
    assert again.error == pytest.approx(searched.error, rel=1e-6) and again.errors_by_alpha == ()
    # a row-rescaled weight (a fold from the next layer) quantizes to the rescaled grid
    r = torch.rand(w.shape[0], generator=torch.Generator().manual_seed(0)) + 0.5
    scaled = awq(w / r[:, None], x, W4, scales=searched.scales, **FAST)
    ratio = scaled.error / out_err(x, w / r[:, None], dequantize(quantize(w / r[:, None], W4)).float())
    assert ratio <= 1.0 + 1e-6
    with pytest.raises(ValueError, match="finite positive"):
        awq(w, x, W4, scales=-searched.scales)
