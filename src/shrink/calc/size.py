"""How many bytes a model takes: bit widths, quantization metadata, k-means
codebooks, sparse storage and pruning + quantization pipelines.

Units: bytes unless the name says GB (10^9 bytes) or GiB (2^30 bytes).
Whole-model formulas take `params` as a real number (7e9) and return float
bytes; the exact per-matrix formulas (`quantized_matrix_bytes`,
`group_count`) take integer shapes and return int.
"""
from __future__ import annotations

import math
from typing import Literal

from shrink.calc import _check as c

GB = 1e9
GIB = float(2**30)
FP16_BYTES = 2  # one scale or zero-point, as the API stores them

Granularity = Literal["tensor", "channel", "group"]
SparseLayout = Literal["values", "dense", "bitmask", "index", "nm"]


def model_size_bytes(params: float, bits: float) -> float:
    """Size = params x bits / 8 (seed 000, ch. 0 "Model size formula"; seed 001 ch. 0)."""
    p = c.positive("model_size_bytes", "params", params)
    b = c.positive("model_size_bytes", "bits", bits)
    return p * b / 8


def model_size_gb(params: float, bits: float) -> float:
    """Size (GB) = params x bits / 8 / 1e9 (seed 000, Exercises 0.1 and 0.6)."""
    return model_size_bytes(params, bits) / GB


def model_size_gib(params: float, bits: float) -> float:
    """Size (GiB) = params x bits / 8 / 2^30 (seed 001, ch. 0 `model_memory_gb`, which uses GiB)."""
    return model_size_bytes(params, bits) / GIB


def compression_ratio(original: float, compressed: float) -> float:
    """ratio = original / compressed, >= 1 when it shrank (seed 000, Exercises 0.2 and 0.7)."""
    o = c.positive("compression_ratio", "original", original)
    k = c.positive("compression_ratio", "compressed", compressed)
    return o / k


def size_reduction(original: float, compressed: float) -> float:
    """Fraction of the size removed: 1 - compressed / original (seed 004, "75% size reduction")."""
    o = c.positive("size_reduction", "original", original)
    k = c.non_negative("size_reduction", "compressed", compressed)
    return 1.0 - k / o


def devices_needed(total_bytes: float, device_bytes: float) -> int:
    """ceil(total / per-device memory): 280 GB on 80 GB A100s -> 4 (seed 001 ch. 0; seed 003 §1)."""
    t = c.non_negative("devices_needed", "total_bytes", total_bytes)
    d = c.positive("devices_needed", "device_bytes", device_bytes)
    return max(1, math.ceil(t / d))


def fits_in_memory(total_bytes: float, capacity_bytes: float) -> bool:
    """total <= capacity (seed 001 ch. 9: 70B weights + 25 GB KV cache on one 80 GB A100)."""
    t = c.non_negative("fits_in_memory", "total_bytes", total_bytes)
    cap = c.positive("fits_in_memory", "capacity_bytes", capacity_bytes)
    return t <= cap


# ---- quantization metadata (API: fp16 scale + fp16 zero-point per channel/group;
#      symmetric formats store only the scale) -------------------------------------

def _values_per_group(symmetric: bool) -> int:
    return 1 if symmetric else 2


def per_channel_overhead_values(channels: int, symmetric: bool = False) -> int:
    """channels x (scale + zero-point), or channels x scale when symmetric (seed 000, Ex. 2.1)."""
    n = c.positive_int("per_channel_overhead_values", "channels", channels)
    return n * _values_per_group(symmetric)


def per_channel_overhead_fraction(out_channels: int, in_features: int,
                                  symmetric: bool = False) -> float:
    """Extra values / weights = 2 x out / (out x in) (seed 000, Ex. 2.1: 8,192 / 16.8M = 0.049%)."""
    extra = per_channel_overhead_values(out_channels, symmetric)
    k = c.positive_int("per_channel_overhead_fraction", "in_features", in_features)
    return extra / (out_channels * k)


def group_count(rows: int, cols: int, group_size: int) -> int:
    """rows x ceil(cols / group_size): groups run along the input dimension (seed 000, Ex. 2.3)."""
    r = c.positive_int("group_count", "rows", rows)
    k = c.positive_int("group_count", "cols", cols)
    g = c.positive_int("group_count", "group_size", group_size)
    return r * math.ceil(k / g)


def metadata_bits_per_weight(group_size: int, symmetric: bool = False,
                             param_bits: int = 16) -> float:
    """Metadata bits per weight = param_bits x (1 or 2) / group_size.

    Seed 001 ch. 2: fp16 scales at G=128 add ~0.125 bits per weight (scale only);
    with the zero-point the API stores it is 0.25.
    """
    g = c.positive_int("metadata_bits_per_weight", "group_size", group_size)
    pb = c.positive_int("metadata_bits_per_weight", "param_bits", param_bits)
    return pb * _values_per_group(symmetric) / g


def quantized_matrix_bytes(rows: int, cols: int, bits: int,
                           granularity: Granularity = "channel",
                           group_size: int | None = None, symmetric: bool = False) -> int:
    """Stored bytes of a quantized [rows, cols] weight, by the API's rule.

    ceil(rows x cols x bits / 8) densely packed code bytes
    + n_params x 2 bytes, n_params = (1 or 2) x {1 | rows | rows x ceil(cols/group_size)}
    for granularity tensor | channel | group (2 with a zero-point, 1 when symmetric).
    Seed 000, Ex. 2.3: [4096, 4096] int4 g128 -> 8,388,608 + 524,288 bytes.
    """
    fn = "quantized_matrix_bytes"
    r = c.positive_int(fn, "rows", rows)
    k = c.positive_int(fn, "cols", cols)
    b = c.positive_int(fn, "bits", bits)
    c.choice(fn, "granularity", granularity, ("tensor", "channel", "group"))
    if granularity == "group":
        if group_size is None:
            raise ValueError(f"{fn}: group_size is required when granularity is 'group', got None")
        groups = group_count(r, k, group_size)
    else:
        if group_size is not None:
            raise ValueError(f"{fn}: group_size is only meaningful with granularity 'group', "
                             f"got group_size={group_size!r} with {granularity!r}")
        groups = 1 if granularity == "tensor" else r
    codes = (r * k * b + 7) // 8
    return codes + groups * _values_per_group(symmetric) * FP16_BYTES


def quantization_overhead_fraction(rows: int, cols: int, bits: int,
                                   granularity: Granularity = "channel",
                                   group_size: int | None = None,
                                   symmetric: bool = False) -> float:
    """metadata bytes / total stored bytes (seed 000, Ex. 2.3: 0.5 MB / 8.5 MB = 5.9%)."""
    total = quantized_matrix_bytes(rows, cols, bits, granularity, group_size, symmetric)
    codes = (rows * cols * bits + 7) // 8
    return (total - codes) / total


def quantized_model_bytes(params: float, bits: float, group_size: int | None = None,
                          symmetric: bool = False) -> float:
    """Whole-model weight bytes: params x bits / 8 + (params / group_size) x (2 or 4) bytes.

    Without group_size only the codes are counted (the seeds' plain "INT4 = 0.5 byte").
    Seed 001 ch. 7 ("35 GB + scales") and ch. 9 design challenge (13B AWQ int4 g128).
    """
    size = model_size_bytes(params, bits)
    if group_size is None:
        return size
    g = c.positive_int("quantized_model_bytes", "group_size", group_size)
    return size + params / g * _values_per_group(symmetric) * FP16_BYTES


# ---- k-means weight sharing ----------------------------------------------------

def kmeans_index_bits(k: int) -> int:
    """ceil(log2 k) bits per index (seed 004, "Weight Sharing (Detailed Implementation)")."""
    kk = c.positive_int("kmeans_index_bits", "k", k)
    return (kk - 1).bit_length()  # exact ceil(log2 k) for integers


def kmeans_storage_bytes(n: int, k: int, centroid_bits: int = 32) -> float:
    """Codebook + indices = k x centroid_bits/8 + n x ceil(log2 k) / 8 bytes.

    Seed 004 (4k + n ceil(log2 k)/8 with fp32 centroids); seed 002 ch. 4
    (log2(K) x D^2 + K x 32 bits). Fractional when n x bits is not a multiple of 8.
    """
    nn = c.positive_int("kmeans_storage_bytes", "n", n)
    kk = c.positive_int("kmeans_storage_bytes", "k", k)
    cb = c.positive_int("kmeans_storage_bytes", "centroid_bits", centroid_bits)
    return kk * cb / 8 + nn * kmeans_index_bits(kk) / 8


def kmeans_compression_ratio(n: int, k: int, original_bits: int = 32,
                             centroid_bits: int = 32) -> float:
    """Ratio = n x original_bits/8 / (k x centroid_bits/8 + n ceil(log2 k)/8) (seed 004; seed 002 ch. 4)."""
    ob = c.positive_int("kmeans_compression_ratio", "original_bits", original_bits)
    stored = kmeans_storage_bytes(n, k, centroid_bits)
    return n * ob / 8 / stored


# ---- sparsity and pipelines -------------------------------------------------------

def sparse_storage_bytes(params: float, sparsity: float, value_bits: float,
                         layout: SparseLayout = "bitmask", index_bits: int = 32,
                         m: int = 4) -> float:
    """Bytes of a pruned weight in a given storage layout.

    nnz = params x (1 - sparsity); then
      values:  nnz x value_bits / 8   (the nonzeros alone: a lower bound, no positions;
               "a 90% sparse network stores only 10% of the parameters", seed 002 ch. 0)
      dense:   params x value_bits / 8   (zeros stored: pruning saves nothing, seed 001 ch. 3 quiz)
      bitmask: nnz x value_bits / 8 + params / 8   (one presence bit per position)
      index:   nnz x (value_bits + index_bits) / 8 (COO-style index per nonzero)
      nm:      nnz x (value_bits + ceil(log2 m)) / 8 (N:M, a position index within each group
               of m per kept value: 2:4 keeps 2 values + 2-bit indices, seed 002 ch. 2)
    """
    fn = "sparse_storage_bytes"
    p = c.positive(fn, "params", params)
    s = c.fraction(fn, "sparsity", sparsity)
    vb = c.positive(fn, "value_bits", value_bits)
    c.choice(fn, "layout", layout, ("values", "dense", "bitmask", "index", "nm"))
    nnz = p * (1.0 - s)
    if layout == "values":
        return nnz * vb / 8
    if layout == "dense":
        return p * vb / 8
    if layout == "bitmask":
        return nnz * vb / 8 + p / 8
    if layout == "index":
        ib = c.positive_int(fn, "index_bits", index_bits)
        return nnz * (vb + ib) / 8
    mm = c.positive_int(fn, "m", m)
    return nnz * (vb + kmeans_index_bits(mm)) / 8


def pipeline_size_bytes(params: float, prune_fraction: float, bits: float,
                        structured: bool = True, group_size: int | None = None,
                        symmetric: bool = False, sparse_layout: SparseLayout = "bitmask") -> float:
    """Bytes after pruning then quantizing.

    remaining = params x (1 - prune_fraction).
    structured: the remaining weights are a smaller dense model,
        bytes = quantized_model_bytes(remaining, bits, group_size)
        (seed 000, Ex. 9.1 and 9.4: 13B -> 6.5B at int4 = 3.25 GB).
    unstructured: the zeros stay in place, stored sparsely:
        sparse_storage_bytes(params, prune_fraction, bits, sparse_layout)
        + group metadata over the remaining values.
    """
    fn = "pipeline_size_bytes"
    p = c.positive(fn, "params", params)
    s = c.fraction(fn, "prune_fraction", prune_fraction)
    remaining = p * (1.0 - s)
    if structured:
        return quantized_model_bytes(remaining, bits, group_size, symmetric)
    values = sparse_storage_bytes(p, s, bits, sparse_layout)
    meta = quantized_model_bytes(remaining, bits, group_size, symmetric) - model_size_bytes(remaining, bits)
    return values + meta
