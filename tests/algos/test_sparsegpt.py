"""sparsegpt: agreement with a plain float64 reimplementation, exact counts and N:M,
sparsegpt <= wanda <= magnitude on MiniLM's real activations, joint prune + quantize
(zeros exact, kept weights on the grid, better than prune-then-RTN), edge cases."""
from __future__ import annotations

import pytest
import torch

from shrink.algos import gptq, rtn
from shrink.algos.magnitude import magnitude_mask
from shrink.algos.nm import check_nm, nm_mask
from shrink.algos.sparsegpt import layer_loss, sparsegpt
from shrink.algos.wanda import act_norms_from_inputs, wanda_mask
from shrink.quant import QuantSpec, dequantize, quantize


def reference_sparsegpt(weight, hessian, sparsity=None, pattern=None, block_size=128, damp=0.01, spec=None):
    """SparseGPT written plainly in float64: every later column updated after each column
    (no lazy blocks), the reference's three-step factor; the unstructured mask of a block
    from its columns when the block starts (pruning exactly the block's share, lowest
    w^2 / U_ii^2 first, ties by row-major position), N:M every m columns. With a spec:
    per-channel scales from the original weight, per-group scales from the group's
    current weights, all through the public quantize(). Returns (W', mask)."""
    W = weight.detach().to(torch.float64, copy=True)
    H = hessian.detach().to(torch.float64, copy=True)
    out, n = W.shape
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * H.diagonal().mean() * torch.eye(n, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    d = U.diagonal()
    keep = torch.ones(out, n, dtype=torch.bool)
    m = pattern[1] if pattern else 1
    step = max(m, block_size // m * m)
    grouped = spec is not None and spec.granularity == "group"
    g = spec.group_size if grouped else n
    fixed = quantize(W, spec) if spec is not None and not grouped else None
    col_spec = spec.with_(granularity="channel", group_size=None) if spec is not None else None
    for i in range(n):
        if sparsity is not None and i % step == 0:
            i2 = min(i + step, n)
            quota = round(sparsity * out * i2) - round(sparsity * out * i)
            score = (W[:, i:i2] / d[i:i2]) ** 2
            order = torch.sort(score.reshape(-1), stable=True).indices[:quota]
            blk = torch.ones(out * (i2 - i), dtype=torch.bool)
            blk[order] = False
            keep[:, i:i2] = blk.reshape(out, i2 - i)
        if pattern and i % m == 0:
            score = (W[:, i:i + m] / d[i:i + m]) ** 2
            top = torch.sort(-score, dim=1, stable=True).indices[:, :pattern[0]]
            keep[:, i:i + m] = torch.zeros(out, m, dtype=torch.bool).scatter_(1, top, True)
        q = W[:, i].clone()
        if spec is not None:
            if grouped and i % g == 0:
                p = quantize(W[:, i:i + g], col_spec)
                s, z = p.scale, p.zero_point
            elif not grouped:
                s, z = fixed.scale, fixed.zero_point
            q = dequantize(quantize(W[:, i:i + 1], col_spec, scale=s, zero_point=z))[:, 0]
        q[~keep[:, i]] = 0
        e = (W[:, i] - q) / U[i, i]
        W[:, i] = q
        W[:, i + 1:] -= e[:, None] * U[i, i + 1:][None, :]
    return W, keep


def _problem(out, n, tokens=400, seed=0, dead=()):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n, generator=g, dtype=torch.float64)
    x = torch.randn(tokens, n, generator=g, dtype=torch.float64) * torch.rand(n, generator=g, dtype=torch.float64) * 3
    x[:, list(dead)] = 0
    return w, x.T @ x * 2 / tokens


@pytest.mark.parametrize("kw", [dict(sparsity=0.5, block_size=16), dict(sparsity=0.3, block_size=128),
                                dict(sparsity=0.7, block_size=7), dict(pattern=(2, 4), block_size=16),
                                dict(pattern=(1, 4), block_size=6), dict(pattern=(3, 8), block_size=128)])
def test_matches_float64_reference(kw):
    w, h = _problem(24, 64, dead=(5, 40))
    res = sparsegpt(w, h, **kw)
    want, keep = reference_sparsegpt(w, h, **kw)
    assert torch.equal(res.mask, keep)
    assert torch.allclose(res.weight.double(), want, atol=1e-5, rtol=0)
    assert res.dead_columns == 2 and not res.mask[:, [5, 40]].any()
    assert res.loss == pytest.approx(layer_loss(w, want, h), rel=1e-6)


@pytest.mark.parametrize("spec", [QuantSpec(bits=4), QuantSpec(bits=3, symmetric=False),
                                  QuantSpec(bits=4, symmetric=False, granularity="group", group_size=16)])
def test_joint_matches_float64_reference(spec):
    w, h = _problem(16, 48, seed=1)
    for kw in (dict(sparsity=0.5, block_size=32), dict(pattern=(2, 4), block_size=8)):
        res = sparsegpt(w, h, spec=spec, **kw)
        want, keep = reference_sparsegpt(w, h, spec=spec, **kw)
        assert torch.equal(res.mask, keep)
        assert torch.allclose(res.weight.double(), want, atol=1e-5, rtol=0)


def test_float32_exact_counts_and_zeros():
    w, h = _problem(40, 96, seed=2)
    w = w.float()
    for s in (0.0, 0.25, 0.5, 0.999):
        res = sparsegpt(w, h, s)
        assert res.weight.dtype == torch.float32 and res.weight.shape == w.shape
        assert int((~res.mask).sum()) == round(s * w.numel())
        assert (res.weight[~res.mask] == 0).all()
        assert res.loss == pytest.approx(layer_loss(w, res.weight, h), rel=1e-4, abs=1e-9)
    res = sparsegpt(w, h, pattern=(2, 4))
    assert check_nm(res.mask, 2, 4) and int(res.mask.sum()) == w.numel() // 2
    assert torch.equal(sparsegpt(w, h, 0.0).weight, w)  # nothing pruned: nothing changes
    assert torch.equal(sparsegpt(w, h, pattern=(4, 4)).weight, w)


@pytest.mark.parametrize("spec", [QuantSpec(bits=4), QuantSpec(bits=4, symmetric=False, granularity="group", group_size=32)])
def test_sparsity_zero_with_spec_is_gptq(spec):
    w, h = _problem(32, 96, seed=3)
    w = w.float()
    res, ref = sparsegpt(w, h, 0.0, spec=spec), gptq(w, h, spec)
    assert torch.equal(res.weight, dequantize(ref.qtensor))
    assert res.loss == pytest.approx(ref.loss, rel=1e-9)


@pytest.fixture(scope="module")
def hessians(minilm_activations):
    """H = 2/n X^T X of each real layer's inputs (a float32 product, kept in float64)."""
    return {name: (x.T @ x).double() * (2 / x.shape[0]) for name, (_, x) in minilm_activations.items()}


@pytest.fixture(scope="module")
def query_layer(minilm_activations, hessians):
    """MiniLM's layer-1 query projection, its real Hessian, and its SparseGPT-pruned weights."""
    name = "encoder.layer.1.attention.self.query"
    w, h = minilm_activations[name][0], hessians[name]
    pruned = {"0.5": sparsegpt(w, h, 0.5), "2:4": sparsegpt(w, h, pattern=(2, 4))}
    return w, h, pruned


_KW = {"0.5": dict(sparsity=0.5), "2:4": dict(pattern=(2, 4))}


@pytest.mark.parametrize("spec", [QuantSpec(bits=4), QuantSpec(bits=4, symmetric=False),
                                  QuantSpec(bits=3, symmetric=False, granularity="group", group_size=64),
                                  QuantSpec(format="nf4")])
def test_joint_on_real_layer(query_layer, spec):
    """Pruned entries dequantize to exactly 0, kept ones lie on the grid, and the joint sweep
    loses less than pruning first (SparseGPT) and rounding after (RTN)."""
    w, h, pruned = query_layer
    for key, kw in _KW.items():
        res = sparsegpt(w, h, spec=spec, **kw)
        deq = dequantize(res.qtensor)
        assert torch.equal(deq, res.weight) and res.qtensor.dtype == w.dtype
        assert (deq[~res.mask] == 0).all()
        requant = dequantize(quantize(res.weight, spec, scale=res.qtensor.scale, zero_point=res.qtensor.zero_point))
        assert torch.equal(requant, res.weight)  # on the grid: rounding again changes nothing
        then_rtn = layer_loss(w, dequantize(rtn(pruned[key].weight, spec).qtensor), h)
        assert res.loss <= then_rtn, (key, res.loss, then_rtn)
        assert res.loss == pytest.approx(layer_loss(w, res.weight, h), rel=1e-4)


def test_joint_int8_costs_almost_nothing_over_pruning(query_layer):
    w, h, pruned = query_layer
    spec = QuantSpec(bits=8, granularity="group", group_size=128)
    for key, kw in _KW.items():
        res = sparsegpt(w, h, spec=spec, **kw)
        assert (dequantize(res.qtensor)[~res.mask] == 0).all()
        assert res.loss <= 1.02 * pruned[key].loss


def test_real_activations_sparsegpt_beats_wanda_beats_magnitude(minilm_activations, hessians):
    for name, (w, x) in minilm_activations.items():
        h = hessians[name]
        norms = act_norms_from_inputs(x)
        for kw in (dict(sparsity=0.5), dict(pattern=(2, 4))):
            if "sparsity" in kw:
                mag, wan = magnitude_mask(w, 0.5), wanda_mask(w, norms, 0.5)
            else:
                mag, wan = nm_mask(w.abs(), 2, 4), wanda_mask(w, norms, pattern=(2, 4))
            res = sparsegpt(w, h, name=name, **kw)
            assert int((~res.mask).sum()) == int((~mag).sum()) == int((~wan).sum())
            l_sg, l_wa, l_mag = layer_loss(w, res.weight, h), layer_loss(w, w * wan, h), layer_loss(w, w * mag, h)
            assert l_sg <= 0.7 * l_wa and l_wa <= 0.9 * l_mag, (name, kw, l_sg, l_wa, l_mag)
            assert res.loss == pytest.approx(l_sg, rel=1e-4)


def test_singular_hessian_retries_and_input_untouched():
    w, _ = _problem(8, 16, seed=4)
    x = torch.randn(3, 16, dtype=torch.float64)  # 3 tokens: rank 3, singular
    h = x.T @ x
    before_w, before_h = w.clone(), h.clone()
    res = sparsegpt(w, h, 0.5, damp=0.0)
    assert res.retries >= 1 and res.damp_used > 0
    assert torch.equal(w, before_w) and torch.equal(h, before_h)


def test_errors_name_the_layer():
    w, h = _problem(8, 16, seed=5)
    with pytest.raises(ValueError, match="^fc1: give exactly one"):
        sparsegpt(w, h, name="fc1")
    with pytest.raises(ValueError, match="^fc1: give exactly one"):
        sparsegpt(w, h, 0.5, pattern=(2, 4), name="fc1")
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"^fc1: sparsity must be in \[0, 1\)"):
            sparsegpt(w, h, bad, name="fc1")
    with pytest.raises(ValueError, match="^fc1: 2:4 needs in_features divisible by 4, got 18"):
        sparsegpt(torch.randn(4, 18), torch.eye(18), pattern=(2, 4), name="fc1")
    with pytest.raises(ValueError, match="^fc1: N > M"):
        sparsegpt(w, h, pattern=(5, 4), name="fc1")
    bad_w = w.clone()
    bad_w[0, 0] = float("nan")
    with pytest.raises(ValueError, match="^fc1: weight .*non-finite"):
        sparsegpt(bad_w, h, 0.5, name="fc1")
    with pytest.raises(ValueError, match=r"^fc1: hessian has shape \(8, 8\)"):
        sparsegpt(w, torch.eye(8), 0.5, name="fc1")
    with pytest.raises(ValueError, match="^fc1: hessian must be"):
        sparsegpt(w, None, 0.5, name="fc1")
    with pytest.raises(ValueError, match="^fc1: block_size"):
        sparsegpt(w, h, 0.5, block_size=0, name="fc1")
    with pytest.raises(ValueError, match="^fc1: observer"):
        sparsegpt(w, h, 0.5, spec=QuantSpec(bits=4), observer="max", name="fc1")
    with pytest.raises(ValueError, match="^fc1: quantization group_size 6 must be a multiple of M=4"):
        sparsegpt(w, h, pattern=(2, 4), spec=QuantSpec(bits=4, granularity="group", group_size=6), name="fc1")
    with pytest.raises(ValueError, match="^fc1: the quantization grid .* no exact 0"):
        sparsegpt(w, h, 0.5, spec=QuantSpec(format="codebook", granularity="tensor", codebook=(-1.0, 1.0)), name="fc1")
    indefinite = torch.eye(16, dtype=torch.float64)
    indefinite[0, 1] = indefinite[1, 0] = 5.0
    with pytest.raises(ValueError, match="^fc1: sparsegpt: the Hessian is not positive definite"):
        sparsegpt(w, indefinite, 0.5, max_retries=1, name="fc1")
