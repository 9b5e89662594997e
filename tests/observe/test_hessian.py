"""HessianObserver: H = 2/n sum x x^T, streamed over batches of any leading shape."""
from __future__ import annotations

import pytest
import torch

from shrink.observe import HessianObserver


def _x(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.fixture(scope="module")
def embeddings() -> torch.Tensor:
    """Real vectors: 2,000 rows of MiniLM's pretrained word-embedding table, the
    inputs its first layer sees (before position embeddings and LayerNorm)."""
    from safetensors import safe_open

    from shrink.models import minilm_dir

    with safe_open(str(minilm_dir() / "model.safetensors"), framework="pt") as f:
        table = f.get_slice("embeddings.word_embeddings.weight")
        return table[2000:4000].contiguous()


def _at_once(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1]).to(torch.float64)
    return 2.0 * flat.T @ flat / flat.shape[0]


def test_equals_float64_gram_at_once_independent_of_batching(embeddings):
    """Uneven batches, shaped [tokens, in] and [batch, seq, in], give 2 X^T X / n
    of all rows at once, to float32 product rounding (float64 rounding for float64 inputs)."""
    x = embeddings
    ref = _at_once(x)
    obs = HessianObserver(384)
    cuts = [0, 1, 7, 300, 301, 1500, 2000]
    for a, b in zip(cuts, cuts[1:]):
        part = x[a:b]
        obs.observe(part if (b - a) % 3 else part.reshape(3, (b - a) // 3, 384))
    h = obs.hessian()
    assert obs.samples == 2000 and obs.batches == len(cuts) - 1
    assert h.dtype == torch.float64 and h.shape == (384, 384)
    # float32 products (float32 inputs), float64 sums: errors ~1e-7 of the largest entry
    tol = 1e-6 * float(ref.abs().max())
    torch.testing.assert_close(h, ref, rtol=0, atol=tol)
    one = HessianObserver(384)
    one.observe(x)
    torch.testing.assert_close(one.hessian(), h, rtol=0, atol=tol)
    exact = HessianObserver(384)
    exact.observe(x.double())  # float64 inputs: float64 products
    torch.testing.assert_close(exact.hessian(), ref, rtol=1e-12, atol=1e-15)
    assert torch.equal(h, h.T)  # exactly symmetric, as Cholesky wants
    assert float(torch.linalg.eigvalsh(h).min()) > -1e-12 * float(h.diagonal().max())


def test_float32_accumulation_and_float64_inputs():
    x = _x(4, 50, 32, seed=1) * 3 + 1
    ref = _at_once(x)
    h32 = HessianObserver(32, dtype=torch.float32)
    for chunk in x:
        h32.observe(chunk)
    assert h32.hessian().dtype == torch.float32
    torch.testing.assert_close(h32.hessian().double(), ref, rtol=1e-5, atol=1e-6)
    h64 = HessianObserver(32)
    h64.observe(x.double())
    torch.testing.assert_close(h64.hessian(), ref, rtol=1e-13, atol=0)


def test_merge_equals_one_observer_over_all_data():
    x = _x(900, 16, seed=2)
    a, b, whole = HessianObserver(16), HessianObserver(16), HessianObserver(16)
    a.observe(x[:100])
    b.observe(x[100:500])
    b.observe(x[500:])
    whole.observe(x)
    assert a.merge(b) is a
    assert a.samples == 900 and a.batches == 3
    torch.testing.assert_close(a.hessian(), whole.hessian(), rtol=1e-5, atol=1e-6)
    empty = HessianObserver(16)
    empty.merge(a)  # an empty observer takes the other's H as is
    torch.testing.assert_close(empty.hessian(), a.hessian(), rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match="in_features=16"):
        a.merge(HessianObserver(8))


def test_observe_in_a_forward_hook_returns_input_unchanged():
    lin = torch.nn.Linear(12, 5)
    obs = HessianObserver(12)
    lin.register_forward_pre_hook(lambda m, args: (obs(args[0]),))
    x = _x(3, 7, 12, seed=3)
    y = lin(x)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, lin.weight, lin.bias))
    torch.testing.assert_close(obs.hessian(), _at_once(x), rtol=1e-5, atol=1e-6)
    assert obs.samples == 21


def test_input_is_not_modified():
    x = _x(10, 8, seed=4)
    before = x.clone()
    obs = HessianObserver(8)
    obs.observe(x)
    h = obs.hessian()
    h.add_(1.0)  # hessian() hands out a copy
    assert torch.equal(x, before)
    torch.testing.assert_close(obs.hessian(), _at_once(before), rtol=1e-5, atol=1e-6)


def test_bad_inputs_are_refused_clearly():
    obs = HessianObserver(8)
    with pytest.raises(ValueError, match="no batches observed"):
        obs.hessian()
    bad = _x(4, 8, seed=5)
    bad[2, 5] = float("nan")
    with pytest.raises(ValueError, match=r"batch 0 .*non-finite.*\(2, 5\)"):
        obs.observe(bad)
    bad[2, 5] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        obs.observe(bad)
    with pytest.raises(ValueError, match="holds no tokens"):
        obs.observe(torch.zeros(0, 8))
    with pytest.raises(ValueError, match="last dimension must be in_features=8"):
        obs.observe(_x(4, 7))
    with pytest.raises(TypeError, match="floating-point"):
        obs.observe(torch.ones(4, 8, dtype=torch.int64))
    assert obs.samples == 0 and obs.batches == 0  # nothing half-recorded
    for n in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="in_features"):
            HessianObserver(n)
    with pytest.raises(ValueError, match="dtype"):
        HessianObserver(8, dtype=torch.float16)


def test_gram_matrix_matches_float64_product_and_is_symmetric():
    from shrink.observe import gram_matrix
    g = torch.Generator().manual_seed(3)
    for n in (7, 300, 700):  # below and above the blocked path
        x = torch.randn(50, n, generator=g)
        ref = x.double().T @ x.double()
        got = gram_matrix(x)
        assert torch.equal(got, got.T)
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-9)


def test_gram_cache_reuses_only_for_the_same_unmodified_input():
    from shrink.observe import GramCache
    cache = GramCache()
    x = torch.randn(4, 9, 16)
    a, b = HessianObserver(16, cache=cache), HessianObserver(16, cache=cache)
    a.observe(x.detach())
    assert cache.gram is not None
    first = cache.gram
    b.observe(x.detach())  # same storage, same version: reused
    assert cache.gram is first
    torch.testing.assert_close(a.hessian(), b.hessian(), rtol=0, atol=0)
    x.mul_(2.0)  # in place: version bumps, the cached Gram must not be used
    b.observe(x)
    assert cache.gram is not first
    ref = 2 / (2 * 36) * ((x / 2).double().reshape(-1, 16).T @ (x / 2).double().reshape(-1, 16)
                          + x.double().reshape(-1, 16).T @ x.double().reshape(-1, 16))
    torch.testing.assert_close(b.hessian(), ref, rtol=1e-5, atol=1e-6)


def test_float32_products_summed_in_float64_keep_float32_accuracy():
    from shrink.observe import gram_matrix
    x = torch.randn(5000, 600, generator=torch.Generator().manual_seed(4)) * 3 + 1  # 3 chunks, blocked path
    ref = x.double().T @ x.double()
    got = gram_matrix(x, torch.float64, compute=torch.float32, chunk=2048)
    assert got.dtype == torch.float64 and torch.equal(got, got.T)
    rel = float((got - ref).abs().max() / ref.abs().max())
    assert rel < 1e-6, rel
    obs = HessianObserver(600)
    obs.observe(x)
    torch.testing.assert_close(obs.hessian(), ref * (2 / 5000), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", [40, 600])   # one GEMM; blocks of the upper triangle
def test_float32_sums_in_place_then_float64(monkeypatch, n):
    """Chunks accumulated in place by the GEMMs, flushed to the float64 sum every _FLUSH tokens,
    after small batches gathered in the pending float32 sum: H matches a float64 computation."""
    from shrink.observe import hessian as hmod
    monkeypatch.setattr(hmod, "_CHUNK", 64)
    monkeypatch.setattr(hmod, "_FLUSH", 256)
    g = torch.Generator().manual_seed(n)
    batches = [torch.randn(t, n, generator=g) * 2 + 0.5 for t in (10, 30, 1000, 7, 300)]
    obs = HessianObserver(n)
    for b in batches:
        obs.observe(b)
    x = torch.cat(batches).double()
    want = 2 * x.T @ x / x.shape[0]
    got = obs.hessian()
    assert obs.samples == x.shape[0] and torch.equal(got, got.T)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))
