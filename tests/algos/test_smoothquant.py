"""SmoothQuant: the scale formula, the balance it creates, and W8A8 error it saves."""
from __future__ import annotations

import pytest
import torch

from shrink.algos.smoothquant import quantize_per_token, smoothquant_scales
from shrink.quant import QuantSpec, dequantize, quantize


def test_scale_formula_against_float64(minilm_activations):
    w, x = minilm_activations["encoder.layer.2.intermediate.dense"]
    a = x.abs().amax(dim=0)
    s = smoothquant_scales(a, w, alpha=0.5)
    ref = a.double().pow(0.5) / w.double().abs().amax(dim=0).pow(0.5)
    assert torch.allclose(s.double(), ref, rtol=1e-5)


def test_alpha_half_balances_activation_and_weight_ranges(minilm_activations):
    w, x = minilm_activations["encoder.layer.2.intermediate.dense"]
    a = x.abs().amax(dim=0)
    s = smoothquant_scales(a, w, alpha=0.5)
    act_after = (x / s).abs().amax(dim=0)
    w_after = (w * s).abs().amax(dim=0)
    assert torch.allclose(act_after, w_after, rtol=1e-4)


def test_quantize_per_token_matches_float64():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, 33, generator=g) * torch.logspace(-2, 2, 33)
    q, s = quantize_per_token(x)
    ref_s = x.double().abs().amax(-1, keepdim=True) / 127
    assert torch.allclose(s.double(), ref_s, rtol=1e-6)
    assert torch.equal(q, torch.round(x / s).clamp(-127, 127).to(torch.int8))
    assert ((q.float() * s - x).abs() <= s / 2 + 1e-6).all()


def w8a8_error(x, w, s=None):
    if s is not None:
        x, w = x / s, w * s
    q, sx = quantize_per_token(x)
    wq = dequantize(quantize(w, QuantSpec(bits=8))).float()
    return float((((q.float() * sx) @ wq.T - x @ w.T) ** 2).mean())


def test_smoothing_lowers_w8a8_error_with_activation_outliers(minilm_activations):
    """LLM activations carry a few channels ~100x the rest (the SmoothQuant paper's motivation):
    real MiniLM inputs with three channels scaled up that way."""
    w, x = minilm_activations["encoder.layer.2.intermediate.dense"]
    x = x.clone()
    x[:, [3, 77, 200]] *= 60.0
    plain = w8a8_error(x, w)
    smoothed = w8a8_error(x, w, smoothquant_scales(x.abs().amax(0), w, 0.5))
    assert smoothed < 0.5 * plain, (smoothed, plain)


def test_bad_input():
    with pytest.raises(ValueError, match="alpha"):
        smoothquant_scales(torch.ones(4), torch.ones(2, 4), alpha=1.5)
    with pytest.raises(ValueError, match="expected"):
        smoothquant_scales(torch.ones(4), torch.ones(2, 5))
