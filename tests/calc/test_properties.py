"""Properties of the calc formulas that must hold for every input, not just the seeds' examples."""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shrink import calc

approx = pytest.approx
FAST = settings(max_examples=60, deadline=None)  # per test: never touch the global profile

params_st = st.floats(min_value=1e3, max_value=1e12, allow_nan=False)
bits_st = st.floats(min_value=1, max_value=32, allow_nan=False)
frac_st = st.floats(min_value=0.01, max_value=0.99)


@FAST
@given(params_st, bits_st, bits_st)
def test_size_is_linear_in_bits(params, a, b):
    assert calc.model_size_bytes(params, a + b) == approx(calc.model_size_bytes(params, a)
                                                          + calc.model_size_bytes(params, b))
    assert calc.model_size_bytes(params, 2 * a) == approx(2 * calc.model_size_bytes(params, a))
    assert calc.model_size_gib(params, a) * 2**30 == approx(calc.model_size_gb(params, a) * 1e9)


@FAST
@given(params_st, bits_st, bits_st, st.floats(min_value=1e9, max_value=1e13))
def test_bandwidth_bound_speedup_equals_compression_ratio(params, hi, lo, bandwidth):
    orig, comp = calc.model_size_bytes(params, hi), calc.model_size_bytes(params, lo)
    t0 = calc.bandwidth_bound_latency_s(orig, bandwidth)
    t1 = calc.bandwidth_bound_latency_s(comp, bandwidth)
    assert calc.speedup(t0, t1) == approx(calc.compression_ratio(orig, comp))
    assert calc.bandwidth_bound_speedup(orig, comp) == approx(calc.compression_ratio(orig, comp))
    assert calc.decode_tokens_per_s_bound(comp, bandwidth) == approx(1 / t1)


@FAST
@given(st.integers(1, 96), st.integers(1, 64), st.sampled_from([64, 80, 128]),
       st.integers(1, 32768), st.integers(1, 16), st.sampled_from([0.5, 1, 2, 4]))
def test_kv_cache_mha_and_gqa(layers, heads, head_dim, context, batch, elem):
    """kv_heads == heads gives the MHA formula 2 x layers x d_model x context x batch x bytes;
    grouping g query heads per KV head divides it by g."""
    d_model = heads * head_dim
    mha = calc.kv_cache_bytes(layers, heads, head_dim, context, batch, elem)
    assert mha == approx(2 * layers * d_model * context * batch * elem)
    assert mha == approx(calc.kv_cache_bytes_per_token(layers, heads, head_dim, elem) * context * batch)
    for g in (d for d in (2, 4, 8) if heads % d == 0):
        assert calc.kv_cache_bytes(layers, heads // g, head_dim, context, batch, elem) == approx(mha / g)


@FAST
@given(st.integers(1, 96), st.integers(1, 64), st.sampled_from([64, 128]), st.floats(1e6, 1e11))
def test_max_context_is_the_largest_that_fits(layers, kv_heads, head_dim, budget):
    n = calc.max_context_tokens(budget, layers, kv_heads, head_dim)
    if n:
        assert calc.kv_cache_bytes(layers, kv_heads, head_dim, n) <= budget
    assert calc.kv_cache_bytes(layers, kv_heads, head_dim, n + 1) > budget


@FAST
@given(frac_st, frac_st)
def test_imp_rounds_bracket_the_target(s, p):
    """(1-p)^N <= 1-s < (1-p)^(N-1): N rounds reach the target and N-1 do not."""
    n = calc.imp_rounds(s, p)
    assert n >= 1
    assert (1 - p) ** n <= (1 - s) * (1 + 1e-9)
    assert 1 - s < (1 - p) ** (n - 1)


@pytest.mark.parametrize("p, n", [(0.2, 1), (0.2, 2), (0.2, 7), (0.5, 3), (0.1, 10)])
def test_imp_rounds_exact_powers(p, n):
    """A target hit exactly after N rounds needs N rounds, not N + 1 from log rounding."""
    assert calc.imp_rounds(1 - (1 - p) ** n, p) == n
    assert calc.imp_sparsity(p, n) == approx(1 - (1 - p) ** n)


@FAST
@given(st.floats(0, 1e4), st.floats(1e12, 1e16), st.floats(1e10, 1e13))
def test_roofline_consistency(intensity, peak, bandwidth):
    att = calc.attainable_flops(intensity, peak, bandwidth)
    assert att <= peak and att <= intensity * bandwidth * (1 + 1e-12)
    bound = calc.roofline_bound(intensity, peak, bandwidth)
    assert bound == ("memory" if intensity < calc.ridge_point(peak, bandwidth) else "compute")
    if bound == "memory":
        assert att == approx(intensity * bandwidth)
    else:
        assert att == peak


@FAST
@given(st.integers(1, 8192), st.integers(1, 8192), st.integers(1, 4096))
def test_low_rank_saves_below_break_even(m, n, r):
    be = calc.break_even_rank(m, n)
    saves = calc.low_rank_params(m, n, r) < m * n
    assert saves == (r < be)
    assert calc.low_rank_compression_ratio(m, n, r) == approx(m * n / (r * (m + n)))


@FAST
@given(st.integers(1, 512), st.integers(1, 1024), st.integers(2, 8), st.sampled_from([32, 64, 128]))
def test_quantized_matrix_bytes_rules(rows, cols, bits, g):
    codes = math.ceil(rows * cols * bits / 8)
    asym = calc.quantized_matrix_bytes(rows, cols, bits, "group", g)
    sym = calc.quantized_matrix_bytes(rows, cols, bits, "group", g, symmetric=True)
    groups = calc.group_count(rows, cols, g)
    assert asym == codes + 4 * groups and sym == codes + 2 * groups
    assert calc.quantized_matrix_bytes(rows, cols, bits, "channel") == codes + 4 * rows
    assert calc.quantized_matrix_bytes(rows, cols, bits, "tensor") == codes + 4
    if cols % g == 0:
        # bits_per_weight = bits + 32 / g exactly when the groups tile the rows (and codes are whole bytes)
        assert 8 * asym / (rows * cols) == approx(8 * codes / (rows * cols) + 32 / g)


@FAST
@given(st.lists(st.floats(-20, 20), min_size=2, max_size=10), st.floats(0.1, 50))
def test_softmax_and_kl(logits, t):
    p = calc.softmax_with_temperature(logits, t)
    assert sum(p) == approx(1.0)
    assert all(v >= 0 for v in p)
    assert calc.kl_divergence(p, p) == approx(0.0, abs=1e-12)
    q = calc.softmax_with_temperature(logits, t * 2)
    assert calc.kl_divergence(p, q) >= -1e-12
    assert calc.entropy(p) <= math.log(len(p)) + 1e-9


@FAST
@given(st.lists(st.floats(-10, 10).filter(lambda v: v != 0), min_size=1, max_size=40), st.floats(0, 1))
def test_magnitude_prune_keeps_the_largest(values, s):
    pruned = calc.magnitude_prune(values, s)
    zeros = [abs(v) for v, q in zip(values, pruned) if q == 0]
    kept = [abs(v) for v, q in zip(values, pruned) if q != 0]
    assert len(zeros) == round(s * len(values))
    if zeros and kept:
        assert max(zeros) <= min(kept)
    assert all(q in (0.0, v) for v, q in zip(values, pruned))


@FAST
@given(params_st, frac_st, st.sampled_from([2, 3, 4, 8]))
def test_structured_pipeline_ratio_multiplies(params, prune, bits):
    """Pruning and quantization compose multiplicatively: ratio = 1/(1-p) x 16/bits."""
    final = calc.pipeline_size_bytes(params, prune, bits, structured=True)
    ratio = calc.compression_ratio(calc.model_size_bytes(params, 16), final)
    assert ratio == approx(1 / (1 - prune) * 16 / bits)


@FAST
@given(st.integers(1, 10**7), st.integers(1, 2**16))
def test_kmeans_index_bits_is_ceil_log2(n, k):
    b = calc.kmeans_index_bits(k)
    assert 2**b >= k and (b == 0 or 2 ** (b - 1) < k)
    assert calc.kmeans_storage_bytes(n, k) == approx(4 * k + n * b / 8)
