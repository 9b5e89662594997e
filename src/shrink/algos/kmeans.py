"""k-means weight sharing (Deep Compression, Han et al. 2016).

All of a tensor's values are clustered in 1-D into K shared values; each weight
is stored as a ceil(log2 K)-bit index into that codebook, and the codebook is
stored beside the indices (fp32 by default): 4K + ceil(n * ceil(log2 K) / 8)
bytes. Optionally the indices are Huffman-coded, the paper's last stage.

The fit runs on the sorted distinct values with their counts. In 1-D every
cluster is a contiguous run of sorted values, so one Lloyd step is a
searchsorted of the K-1 centroid midpoints into the sorted values and K
differences of prefix sums: O(K log n) per iteration after one sort, never an
n x K distance matrix. Midpoint ties go to the lower centroid, as
CodebookFormat.encode does, so the fit and the final encoding agree (up to
the rounding of the table to its stored dtype). Empty clusters are relocated
as scikit-learn does, so the same init walks the same iterates as its KMeans.

The codes themselves come from shrink.quant.quantize with a codebook spec, so
encoding and byte accounting are the code path every other format shares.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from shrink.formats import huffman_nbytes, symbol_counts
from shrink.quant import QTensor, QuantSpec, check_finite, dequantize, quantize

INITS = ("linear", "density", "random", "kmeans++")
# The table must hold its values exactly in fp32, which quantize's codebook spec uses.
TABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True, eq=False)
class KMeansResult:
    """qtensor        the codes and their codebook (dequantize(qtensor) ~ weight)
    codebook       the sorted table as stored, in table_dtype
    loss           mean squared error of the reconstruction over all elements
    iterations     Lloyd steps taken; converged: whether assignments stopped changing
    nbytes         stored bytes: packed indices + codebook table (= qtensor.nbytes)
    huffman_nbytes with huffman=True: Huffman-coded indices + their one-byte-per-entry
                   code-length table + the codebook table; else None
    """

    qtensor: QTensor
    codebook: torch.Tensor
    loss: float
    iterations: int
    converged: bool
    nbytes: int
    huffman_nbytes: int | None = None


def kmeans(
    weight: torch.Tensor,
    bits: int | None = None,
    k: int | None = None,
    *,
    iters: int = 300,
    init: str = "linear",
    seed: int = 0,
    table_dtype: torch.dtype = torch.float32,
    skip_zeros: bool = False,
    huffman: bool = False,
) -> KMeansResult:
    """Cluster `weight`'s values into at most k = 2**bits (or k) shared values.

    init: "linear" (evenly spaced from min to max; Deep Compression found it
    best, since it keeps the rare large weights), "density" (evenly spaced in
    the CDF), "random" (Forgy: k random observations), "kmeans++" (its init
    costs O(k n), the others O(n)). Only the last two use `seed`. skip_zeros: for pruned weights; exact zeros are
    ignored by the fit and keep a reserved table entry 0.0 (counted in k), so
    they stay exactly zero. As every value is coded to its nearest table entry,
    a tiny nonzero weight may also be coded as 0, which only lowers the error.

    The codebook has min(k, distinct values) entries (entries equal after
    rounding to table_dtype are merged): a table slot no weight can use would
    cost bytes for nothing, and with enough entries the result is lossless.
    """
    k = _resolve_k(bits, k)
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"kmeans: iters must be a non-negative integer, got {iters!r}")
    if init not in INITS:
        raise ValueError(f"kmeans: init must be one of {', '.join(INITS)}; got {init!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"kmeans: seed must be an integer, got {seed!r}")
    if table_dtype not in TABLE_DTYPES:
        raise ValueError(f"kmeans: table_dtype must be float32, float16 or bfloat16, got {table_dtype}")
    check_finite(weight, "kmeans: weight")
    if weight.numel() == 0:
        raise ValueError(f"kmeans: weight of shape {tuple(weight.shape)} is empty; nothing to cluster")

    frozen = torch.zeros(1 if skip_zeros else 0, dtype=torch.float64)
    free = k - frozen.numel()
    values, counts = _distinct(weight, skip_zeros)
    iterations, converged = 0, True
    if free == 0:  # k=1 with skip_zeros: the reserved zero is the whole table
        centroids = values[:0]
    elif values.numel() <= free:  # enough entries for every distinct value: exact
        centroids = values
    else:
        gen = torch.Generator().manual_seed(seed)
        start = _init(values, counts, free, init, gen)
        centroids, iterations, converged = _lloyd(values, counts, start, frozen, iters)

    table = torch.cat([centroids, frozen]).to(table_dtype).to(torch.float64).unique(sorted=True)
    spec = QuantSpec(format="codebook", codebook=tuple(table.tolist()), granularity="tensor",
                     codebook_dtype=table_dtype)
    qtensor = quantize(weight, spec)
    codebook = qtensor.grid.stored_values().to(table_dtype)
    err = dequantize(qtensor).to(torch.float64) - weight.detach().to(torch.float64)
    huff = None
    if huffman:
        used = symbol_counts(qtensor.stored_codes(), table.numel())
        huff = huffman_nbytes(used) + qtensor.grid.table_nbytes
    return KMeansResult(
        qtensor=qtensor,
        codebook=codebook,
        loss=float(err.pow(2).mean()),
        iterations=iterations,
        converged=converged,
        nbytes=qtensor.nbytes,
        huffman_nbytes=huff,
    )


def _resolve_k(bits, k) -> int:
    if bits is not None and k is not None:
        raise ValueError(f"kmeans: pass bits= or k=, not both (got bits={bits!r}, k={k!r})")
    if bits is not None:
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
            raise ValueError(f"kmeans: bits must be an integer in 1..8 (codes are at most 8 bits), got {bits!r}")
        return 1 << bits
    if k is None:
        raise ValueError("kmeans: pass bits= (index width) or k= (number of clusters)")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 256:
        raise ValueError(f"kmeans: k must be an integer in 1..256 (codes are at most 8 bits), got {k!r}")
    return k


def _distinct(weight: torch.Tensor, skip_zeros: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted distinct values (float64) and their counts. numpy's sort is used
    because it is several times faster than torch's on CPU (1 s vs 3-6 s for
    16M values here); float32 is exact for fp16/bf16 and sorts faster than float64."""
    x = weight.detach().reshape(-1).cpu()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.to(torch.float32)
    if skip_zeros:
        x = x[x != 0]
    values, counts = torch.unique_consecutive(torch.from_numpy(np.sort(x.numpy())), return_counts=True)
    return values.to(torch.float64), counts


def _init(values: torch.Tensor, counts: torch.Tensor, k: int, init: str, gen: torch.Generator) -> torch.Tensor:
    """k starting centroids (float64, sorted) from the distinct values and their counts."""
    cum = torch.cumsum(counts, 0)  # observations up to and including each distinct value
    n = int(cum[-1])

    def observation(rank: torch.Tensor) -> torch.Tensor:  # rank-th smallest observation
        return values[torch.searchsorted(cum, rank, right=True)]

    if init == "linear":
        return torch.linspace(float(values[0]), float(values[-1]), k, dtype=torch.float64)
    if init == "density":  # evenly spaced in the CDF, at bin centres
        ranks = ((torch.arange(k, dtype=torch.float64) + 0.5) * n / k).long()
        return observation(ranks)
    if init == "random":  # Forgy: k distinct observations
        return torch.sort(observation(torch.randperm(n, generator=gen)[:k])).values
    # kmeans++ (Arthur & Vassilvitskii 2007): D^2 sampling, counts as weights.
    w = counts.to(torch.float64)
    d2 = torch.full_like(values, float("inf"))
    chosen = []
    for i in range(k):
        p = torch.cumsum(w if i == 0 else w * d2, 0)
        j = int(torch.searchsorted(p, torch.rand(1, generator=gen, dtype=torch.float64) * p[-1], right=True).clamp(max=len(p) - 1))
        chosen.append(values[j])
        d2 = torch.minimum(d2, (values - values[j]) ** 2)
    return torch.sort(torch.stack(chosen)).values


def _lloyd(values, counts, start, frozen, iters):
    """Lloyd's algorithm on weighted sorted 1-D data; `frozen` entries never move.

    Returns (free centroids, iterations, converged).
    """
    w = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(counts, 0)])
    s = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(counts * values, 0)])
    table = torch.cat([start, frozen])
    movable = torch.cat([torch.ones_like(start, dtype=torch.bool), torch.zeros_like(frozen, dtype=torch.bool)])
    prev, it = None, 0
    while True:
        order = torch.argsort(table, stable=True)
        table, movable = table[order], movable[order]
        mids = (table[1:] + table[:-1]) / 2
        # Cluster j holds sorted values [bounds[j], bounds[j+1]); a value equal
        # to a midpoint goes to the lower centroid (right=True counts it below).
        inner = torch.searchsorted(values, mids, right=True)
        bounds = torch.cat([inner.new_zeros(1), inner, inner.new_full((1,), len(values))])
        if prev is not None and torch.equal(bounds, prev):  # a fixed point
            return table[movable], it, True
        if it == iters:
            return table[movable], it, False
        n_j = w[bounds[1:]] - w[bounds[:-1]]
        sum_j = s[bounds[1:]] - s[bounds[:-1]]
        empty = movable & (n_j == 0)
        if empty.any():
            n_j, sum_j = _relocate(values, table, bounds, n_j, sum_j, empty.nonzero().reshape(-1))
            prev = None  # the partition changed under us: not a fixed point
        else:
            prev = bounds
        update = movable & (n_j > 0)
        table = torch.where(update, sum_j / n_j.clamp(min=1).to(torch.float64), table)
        it += 1


def _relocate(values, table, bounds, n_j, sum_j, empty):
    """Give each empty cluster one observation of the values farthest from
    their centroid, taking it out of its old cluster: scikit-learn's rule
    (_relocate_empty_clusters_dense), so both walk the same iterates."""
    labels = torch.repeat_interleave(torch.arange(len(table)), bounds[1:] - bounds[:-1])
    dist = (values - table[labels]) ** 2
    far = torch.topk(dist, min(len(empty), len(values))).indices
    far = far[dist[far] > 0]  # more clusters than distinct values: nothing to gain
    empty = empty[: len(far)]
    n_j, sum_j = n_j.clone(), sum_j.clone()
    n_j.index_add_(0, labels[far], torch.full_like(far, -1))
    sum_j.index_add_(0, labels[far], -values[far])
    n_j[empty], sum_j[empty] = 1, values[far]
    return n_j, sum_j
