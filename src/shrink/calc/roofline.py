"""How fast it can run: bandwidth- and compute-bound latency, FLOP counts,
the roofline, the KV cache and the decode-speed bound.

Units: seconds, bytes, bytes/s, FLOPs and FLOP/s unless a name says otherwise.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from shrink.calc import _check as c

Bound = Literal["memory", "compute"]


# ---- latency and speedup -----------------------------------------------------------

def bandwidth_bound_latency_s(bytes_moved: float, bandwidth_bytes_per_s: float) -> float:
    """time = bytes / bandwidth (seed 000, Ex. 0.4: 14 GB / 2 TB/s = 7.0 ms; seed 001 ch. 4)."""
    b = c.non_negative("bandwidth_bound_latency_s", "bytes_moved", bytes_moved)
    bw = c.positive("bandwidth_bound_latency_s", "bandwidth_bytes_per_s", bandwidth_bytes_per_s)
    return b / bw


def compute_bound_latency_s(flops: float, peak_flops: float) -> float:
    """time = FLOPs / peak FLOP/s (seed 000, Ex. 8.2: 137.4 GFLOP / 312 TFLOP/s = 0.440 ms)."""
    f = c.non_negative("compute_bound_latency_s", "flops", flops)
    p = c.positive("compute_bound_latency_s", "peak_flops", peak_flops)
    return f / p


def roofline_latency_s(flops: float, bytes_moved: float, peak_flops: float,
                       bandwidth_bytes_per_s: float) -> float:
    """time = max(FLOPs / peak, bytes / bandwidth): the slower of the two roofs."""
    return max(compute_bound_latency_s(flops, peak_flops),
               bandwidth_bound_latency_s(bytes_moved, bandwidth_bytes_per_s))


def speedup(time_before: float, time_after: float) -> float:
    """speedup = time_before / time_after (seed 000, Ex. 0.4 and 8.2; seed 004 early exit, adaptive heads)."""
    a = c.positive("speedup", "time_before", time_before)
    b = c.positive("speedup", "time_after", time_after)
    return a / b


def bandwidth_bound_speedup(original_bytes: float, compressed_bytes: float) -> float:
    """When memory-bound, speedup = original_bytes / compressed_bytes = the compression ratio
    (seed 000, Ex. 0.4: 14 GB vs 3.5 GB -> 4.0x)."""
    o = c.positive("bandwidth_bound_speedup", "original_bytes", original_bytes)
    k = c.positive("bandwidth_bound_speedup", "compressed_bytes", compressed_bytes)
    return o / k


def tokens_per_s(latency_s_per_token: float) -> float:
    """tokens/s = 1 / latency per token (seed 000, Ex. 9.3: 5 ms/token -> 200 tokens/s)."""
    return 1.0 / c.positive("tokens_per_s", "latency_s_per_token", latency_s_per_token)


def student_latency(teacher_latency: float, teacher_params: float, student_params: float,
                    precision_speedup: float = 1.0) -> float:
    """Distilled (+ quantized) student latency = teacher latency / (teacher/student params x
    precision speedup), assuming latency proportional to FLOPs (seed 000, Ex. 9.3:
    100 ms / (70B/7B x 2) = 5.0 ms)."""
    fn = "student_latency"
    t = c.positive(fn, "teacher_latency", teacher_latency)
    tp = c.positive(fn, "teacher_params", teacher_params)
    sp = c.positive(fn, "student_params", student_params)
    hw = c.positive(fn, "precision_speedup", precision_speedup)
    return t / (tp / sp * hw)


# ---- FLOPs -------------------------------------------------------------------------

def matmul_flops(m: int, k: int, n: int) -> int:
    """[m, k] x [k, n] costs 2mkn FLOPs (seed 000, Ex. 4.3 and 8.2: 2 x 4096^3 = 137.4 GFLOP)."""
    fn = "matmul_flops"
    return 2 * c.positive_int(fn, "m", m) * c.positive_int(fn, "k", k) * c.positive_int(fn, "n", n)


def decode_flops_per_token(params: float) -> float:
    """~2 FLOPs (one multiply-add) per weight per generated token (seed 000, Ex. 0.5)."""
    return 2.0 * c.positive("decode_flops_per_token", "params", params)


def transformer_layer_flops(seq_len: int, d_model: int) -> int:
    """One layer on n tokens: 24 n d^2 + 2 n^2 d FLOPs (seed 001, ch. 4 "FLOP counting":
    QKV 6nd^2 + scores 2n^2 d + output 2nd^2 + 4d MLP 16nd^2)."""
    n = c.positive_int("transformer_layer_flops", "seq_len", seq_len)
    d = c.positive_int("transformer_layer_flops", "d_model", d_model)
    return 24 * n * d * d + 2 * n * n * d


def transformer_flops(layers: int, seq_len: int, d_model: int) -> int:
    """layers x (24 n d^2 + 2 n^2 d) (seed 001, ch. 4: 7B, d=4096, 32 layers, n=1 -> 12.9 GFLOP)."""
    return c.positive_int("transformer_flops", "layers", layers) * transformer_layer_flops(seq_len, d_model)


# ---- roofline ----------------------------------------------------------------------

def arithmetic_intensity(flops: float, bytes_moved: float) -> float:
    """Intensity = FLOPs / bytes moved, FLOP/byte (seed 001, ch. 4)."""
    f = c.non_negative("arithmetic_intensity", "flops", flops)
    b = c.positive("arithmetic_intensity", "bytes_moved", bytes_moved)
    return f / b


def weight_streaming_intensity(batch: int, bits: float) -> float:
    """Intensity of a batched matrix-vector pass over the weights: each weight (bits/8 bytes)
    feeds one multiply-add (2 FLOPs) per sequence in the batch: 2 x batch / (bits / 8)
    (seed 000, Ex. 0.5: fp16, batch 1 -> 2 / 2 = 1 FLOP/byte)."""
    b = c.positive_int("weight_streaming_intensity", "batch", batch)
    w = c.positive("weight_streaming_intensity", "bits", bits)
    return 2.0 * b / (w / 8)


def ridge_point(peak_flops: float, bandwidth_bytes_per_s: float) -> float:
    """Ridge = peak FLOP/s / bandwidth, FLOP/byte (seed 000, Ex. 0.5: 312 T / 2 T = 156)."""
    p = c.positive("ridge_point", "peak_flops", peak_flops)
    bw = c.positive("ridge_point", "bandwidth_bytes_per_s", bandwidth_bytes_per_s)
    return p / bw


def roofline_bound(intensity: float, peak_flops: float, bandwidth_bytes_per_s: float) -> Bound:
    """'memory' when intensity < ridge point, else 'compute' (seed 001, ch. 4 `roofline_analysis`)."""
    i = c.non_negative("roofline_bound", "intensity", intensity)
    return "memory" if i < ridge_point(peak_flops, bandwidth_bytes_per_s) else "compute"


def attainable_flops(intensity: float, peak_flops: float, bandwidth_bytes_per_s: float) -> float:
    """Attainable FLOP/s = min(peak, intensity x bandwidth) (seed 001, ch. 4 roofline)."""
    i = c.non_negative("attainable_flops", "intensity", intensity)
    p = c.positive("attainable_flops", "peak_flops", peak_flops)
    bw = c.positive("attainable_flops", "bandwidth_bytes_per_s", bandwidth_bytes_per_s)
    return min(p, i * bw)


# ---- KV cache and decode -------------------------------------------------------------

def kv_cache_bytes_per_token(layers: int, kv_heads: int, head_dim: int,
                             bytes_per_element: float = 2) -> float:
    """2 (K and V) x layers x kv_heads x head_dim x bytes_per_element, for one token of one
    sequence. Grouped-query attention: pass the number of KV heads, not query heads."""
    fn = "kv_cache_bytes_per_token"
    l_ = c.positive_int(fn, "layers", layers)
    h = c.positive_int(fn, "kv_heads", kv_heads)
    d = c.positive_int(fn, "head_dim", head_dim)
    e = c.positive(fn, "bytes_per_element", bytes_per_element)
    return 2 * l_ * h * d * e


def kv_cache_bytes(layers: int, kv_heads: int, head_dim: int, context: int, batch: int = 1,
                   bytes_per_element: float = 2) -> float:
    """KV cache = 2 x layers x kv_heads x head_dim x context x batch x bytes_per_element
    (seed 001, ch. 0 and ch. 9: the KV cache stores keys and values of prior tokens)."""
    fn = "kv_cache_bytes"
    for name, v in (("layers", layers), ("kv_heads", kv_heads), ("head_dim", head_dim),
                    ("context", context), ("batch", batch)):
        c.positive_int(fn, name, v)
    e = c.positive(fn, "bytes_per_element", bytes_per_element)
    return 2 * layers * kv_heads * head_dim * context * batch * e


def max_context_tokens(budget_bytes: float, layers: int, kv_heads: int, head_dim: int,
                       batch: int = 1, bytes_per_element: float = 2) -> int:
    """Longest context whose KV cache fits: floor(budget / (per-token KV bytes x batch))
    (seed 001, ch. 9 design challenge: memory left for the KV cache -> context)."""
    b = c.non_negative("max_context_tokens", "budget_bytes", budget_bytes)
    n = c.positive_int("max_context_tokens", "batch", batch)
    per = kv_cache_bytes_per_token(layers, kv_heads, head_dim, bytes_per_element) * n
    return math.floor(b / per)


def decode_tokens_per_s_bound(weight_bytes: float, bandwidth_bytes_per_s: float,
                              kv_bytes: float = 0.0) -> float:
    """Upper bound on decode speed at batch 1: each token reads every weight and the whole
    KV cache once, so tokens/s <= bandwidth / (weight bytes + KV bytes)
    (seed 000, Ex. 0.4; seed 001, ch. 4)."""
    fn = "decode_tokens_per_s_bound"
    w = c.positive(fn, "weight_bytes", weight_bytes)
    bw = c.positive(fn, "bandwidth_bytes_per_s", bandwidth_bytes_per_s)
    kv = c.non_negative(fn, "kv_bytes", kv_bytes)
    return bw / (w + kv)


# ---- adaptive computation (early exit) -------------------------------------------------

def early_exit_expected_layers(exit_layers: Sequence[int], exit_fractions: Sequence[float]) -> float:
    """Expected depth = sum(fraction_i x exit_layer_i); the fractions must sum to 1
    (seed 004, "Dynamic & Adaptive Computation": exits at layers 4/8/12 for 35/45/20%)."""
    fn = "early_exit_expected_layers"
    layers = c.numbers(fn, "exit_layers", exit_layers)
    fracs = c.numbers(fn, "exit_fractions", exit_fractions)
    if len(layers) != len(fracs):
        raise ValueError(f"{fn}: exit_layers and exit_fractions must have the same length, "
                         f"got {len(layers)} and {len(fracs)}")
    for i, v in enumerate(layers):
        if v <= 0:
            raise ValueError(f"{fn}: exit_layers[{i}] must be positive, got {v!r}")
    for i, v in enumerate(fracs):
        if v < 0:
            raise ValueError(f"{fn}: exit_fractions[{i}] must be non-negative, got {v!r}")
    if not math.isclose(sum(fracs), 1.0, abs_tol=1e-9):
        raise ValueError(f"{fn}: exit_fractions must sum to 1, got {sum(fracs)!r}")
    return sum(f * l_ for f, l_ in zip(fracs, layers))


def early_exit_speedup(total_layers: int, exit_layers: Sequence[int],
                       exit_fractions: Sequence[float]) -> float:
    """Speedup = total layers / expected layers, counting layer cost only (exit heads are
    assumed free) (seed 004: 12 layers over the expected depth)."""
    n = c.positive_int("early_exit_speedup", "total_layers", total_layers)
    expected = early_exit_expected_layers(exit_layers, exit_fractions)
    if max(exit_layers) > n:
        raise ValueError(f"early_exit_speedup: exit_layers must not exceed total_layers={n}, "
                         f"got {max(exit_layers)}")
    return n / expected
