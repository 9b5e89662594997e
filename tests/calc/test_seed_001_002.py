"""Seeds 001 and 002 (lessons; 003 and 004 are in test_seed_003_004.py): their memory,
FLOP, size, ratio and rank examples through shrink.calc, with the seeds' own numbers. These lessons round freely and sometimes err;
each such place asserts what is right and says so in a comment.

001 = 001_08d49fa14d221e12.txt (ML Systems lesson), 002 = 002_ec216c43eeaacac4.txt (CS 229s).
"""
from __future__ import annotations

import pytest

from shrink import calc

approx = pytest.approx
GB = 1e9
A100_BYTES = 80 * GB

# ============================== seed 001 ===============================================

TABLE_001 = {  # model: (params, FP32, FP16, INT8, INT4 in GB)
    "GPT-2": (1.5e9, 6, 3, 1.5, 0.75),
    "LLaMA-7B": (7e9, 28, 14, 7, 3.5),
    "LLaMA-13B": (13e9, 52, 26, 13, 6.5),
    "LLaMA-70B": (70e9, 280, 140, 70, 35),
    "GPT-4 (est.)": (175e9, 700, 350, 175, 87.5),
}


@pytest.mark.parametrize("model", sorted(TABLE_001))
def test_001_ch0_memory_table(model):
    """Seed 001, chapter 0 memory table: Memory = params x bytes per param at FP32/FP16/INT8/INT4."""
    params, *sizes = TABLE_001[model]
    assert [calc.model_size_gb(params, b) for b in (32, 16, 8, 4)] == approx(sizes)


def test_001_ch0_deployment_gap():
    """Seed 001, chapter 0: 70B x 4 bytes = 280 GB, more than an 80 GB A100 (at least 4 GPUs);
    7B FP32 = 28 GB fits an A100 but not a 24 GB RTX 4090; 70B INT4 = 35 GB fits one A100."""
    fp32_70b = calc.model_size_bytes(70e9, 32)
    assert fp32_70b / GB == approx(280)
    assert not calc.fits_in_memory(fp32_70b, A100_BYTES)
    assert calc.devices_needed(fp32_70b, A100_BYTES) == 4
    assert calc.fits_in_memory(calc.model_size_bytes(7e9, 32), A100_BYTES)
    assert not calc.fits_in_memory(calc.model_size_bytes(7e9, 32), 24 * GB)
    assert calc.fits_in_memory(calc.model_size_bytes(70e9, 4), A100_BYTES)
    assert calc.compression_ratio(calc.model_size_bytes(1, 32), calc.model_size_bytes(1, 8)) == approx(4)


def test_001_ch0_model_memory_gib():
    """Seed 001, chapter 0 `model_memory_gb` (GiB, 2^30): 70B at 32/16/8/4 bits =
    260.8 / 130.4 / 65.2 / 32.6."""
    got = [calc.model_size_gib(70e9, b) for b in (32, 16, 8, 4)]
    assert got == approx([260.8, 130.4, 65.2, 32.6], abs=0.05)


def test_001_ch0_quiz_13b_fp16():
    """Seed 001, chapter 0 quiz: 13B in FP16 needs about 26 GB (24.2 GiB)."""
    assert calc.model_size_gb(13e9, 16) == approx(26)
    assert calc.model_size_gib(13e9, 16) == approx(24.2, abs=0.05)


def test_001_ch2_group_metadata_bits():
    """Seed 001, chapter 2: per-group G=128 has N x K / 128 scales; fp16 scales add ~0.125 bits per
    weight. With the zero-point the API also stores, it is 0.25 bits."""
    assert calc.group_count(4096, 4096, 128) == 4096 * 4096 // 128
    assert calc.metadata_bits_per_weight(128, symmetric=True) == approx(0.125)
    assert calc.metadata_bits_per_weight(128, symmetric=False) == approx(0.25)
    w = calc.quantized_matrix_bytes(4096, 4096, 4, "group", 128, symmetric=True)
    assert 8 * w / (4096 * 4096) == approx(4.125)


def test_001_ch3_magnitude_prune_3x3():
    """Seed 001, chapter 3: 50% of 9 = 4.5 rounds to 4; pruning 0.02, 0.03, 0.04, -0.1 leaves
    [[0.5, 0, 0.8], [0, -0.9, 0], [-0.7, 0, 0.6]], 44% zeros."""
    w = [0.5, -0.1, 0.8, 0.02, -0.9, 0.03, -0.7, 0.04, 0.6]
    pruned = calc.magnitude_prune(w, 0.5)
    assert pruned == [0.5, 0, 0.8, 0, -0.9, 0, -0.7, 0, 0.6]
    assert calc.sparsity_of(pruned) == approx(0.44, abs=0.005)


def test_001_ch3_quiz_unstructured_saves_nothing():
    """Seed 001, chapter 3 quiz: 75% unstructured pruning of a 4096 x 4096 FP16 matrix stored
    densely saves no memory; a bitmask layout would."""
    dense = calc.model_size_bytes(4096 * 4096, 16)
    assert calc.sparse_storage_bytes(4096 * 4096, 0.75, 16, layout="dense") == approx(dense)
    assert calc.sparse_storage_bytes(4096 * 4096, 0.75, 16, layout="bitmask") < dense


def test_001_ch4_matvec_intensity():
    """Seed 001, chapter 4: W x for W [M, K] in FP16: FLOPs 2MK, bytes 2MK -> ~1 FLOP/byte,
    ~0.3% of a GPU with ~300 FLOP/byte."""
    m = k = 4096
    assert calc.arithmetic_intensity(2 * m * k, 2 * m * k) == approx(1.0)
    bw = 3.35e12
    used = calc.attainable_flops(1.0, 300 * bw, bw) / (300 * bw)
    assert used * 100 == approx(0.3, abs=0.05)


def test_001_ch4_transformer_flops_7b():
    """Seed 001, chapter 4 "FLOP counting": 6nd^2 + 2n^2 d + 2nd^2 + 16nd^2 = 24nd^2 + 2n^2 d;
    7B (d=4096, 32 layers), one token: 24 x 4096^2 x 32 ~ 12.9 G FLOP.

    The seed writes "12.9 TFLOP"; the product is 12.9e9 (GFLOP) — its own next line
    (12.9 "TFLOP" at 312 TFLOP/s = 0.04 ms) and printed intensity 0.9 only hold for 12.9e9.
    """
    n, d = 1, 4096
    assert calc.transformer_layer_flops(n, d) == 6 * n * d * d + 2 * n * n * d + 2 * n * d * d + 16 * n * d * d
    flops = calc.transformer_flops(32, 1, 4096)
    assert flops == approx(12.9e9, rel=0.01)  # 24 x 4096^2 x 32 = 12.88e9, plus 2n^2 d per layer


def test_001_ch4_memory_vs_compute_time_7b():
    """Seed 001, chapter 4: 14 GB at 2 TB/s = 7 ms; 12.9 GFLOP at 312 TFLOP/s = 0.04 ms;
    memory takes ~175x longer. Unrounded it is 7 / 0.0413 = 169x (the seed divides by 0.04)."""
    t_mem = calc.bandwidth_bound_latency_s(14 * GB, 2e12)
    t_cmp = calc.compute_bound_latency_s(calc.transformer_flops(32, 1, 4096), 312e12)
    assert t_mem * 1e3 == approx(7.0)
    assert t_cmp * 1e3 == approx(0.04, abs=0.005)
    assert t_mem / t_cmp == approx(169.5, abs=0.5)
    assert 7.0 / 0.04 == approx(175)  # the seed's rounded quotient


def test_001_ch4_roofline_analysis_7b():
    """Seed 001, chapter 4 `roofline_analysis`: 7B, 1 token, 14 GB read on an A100 (312 TFLOP/s,
    2 TB/s): MEMORY-BOUND, intensity 0.9 FLOP/byte (with the 12.9e9 FLOPs; the code passes 12.9e12,
    which would give 921 and compute-bound — the printed output matches 12.9e9)."""
    ai = calc.arithmetic_intensity(12.9e9, 14e9)
    assert ai == approx(0.9, abs=0.05)
    assert calc.roofline_bound(ai, 312e12, 2e12) == "memory"
    assert calc.attainable_flops(ai, 312e12, 2e12) == approx(ai * 2e12)
    assert calc.roofline_bound(calc.arithmetic_intensity(12.9e12, 14e9), 312e12, 2e12) == "compute"


def test_001_ch4_quiz_compute_bound():
    """Seed 001, chapter 4 quiz: 10 TFLOP over 5 GB = 2000 FLOP/byte > ridge 156: compute-bound."""
    ai = calc.arithmetic_intensity(10e12, 5e9)
    assert ai == approx(2000)
    assert calc.ridge_point(312e12, 2e12) == approx(156)
    assert calc.roofline_bound(ai, 312e12, 2e12) == "compute"
    assert calc.attainable_flops(ai, 312e12, 2e12) == approx(312e12)


def test_001_ch6_ste_worked_example():
    """Seed 001, chapter 6 "STE in action": w=0.37, s=0.1 -> FakeQuant = 4 x 0.1 = 0.4; the
    gradient -0.05 passes straight through. (The seed's update line then writes
    0.37 - lr x (-0.05) as 0.36975; it is 0.37025 — a sign slip, not calc arithmetic.)"""
    assert calc.fake_quantize_value(0.37, 0.1, 0, -8, 7) == approx(0.4)
    assert calc.ste_gradient(-0.05, 0.37, -0.8, 0.7) == approx(-0.05)


def test_001_ch7_70b_pipeline_table():
    """Seed 001, chapter 7 table, LLaMA-70B: FP16 140 GB, INT8 70 GB, INT4 35 GB "+ 5 GB scales",
    20% head pruning -> "32 GB"; 80 - 40 = 40 GB headroom.

    By the API's rule (fp16 scale + zero-point per group of 128) the metadata is
    70e9 / 128 x 4 B = 2.19 GB, not 5 GB; then 20% pruning of all weights gives 29.75 GB
    (the seed's 32 = 0.8 x (35 + 5)).
    """
    assert calc.model_size_gb(70e9, 16) == approx(140)
    assert calc.model_size_gb(70e9, 8) == approx(70)
    assert calc.model_size_gb(70e9, 4) == approx(35)
    int4_g128 = calc.quantized_model_bytes(70e9, 4, group_size=128)
    assert (int4_g128 - calc.model_size_bytes(70e9, 4)) / GB == approx(2.19, abs=0.005)
    pruned = calc.pipeline_size_bytes(70e9, 0.2, 4, structured=True, group_size=128)
    assert pruned / GB == approx(29.75)
    assert (A100_BYTES - 40 * GB) / GB == approx(40)
    assert calc.fits_in_memory(pruned, A100_BYTES)


def test_001_ch7_phi3_and_13b_quiz():
    """Seed 001, chapter 7: Phi-3 Mini 3.8B at INT4 = 1.9 GB; quiz: 13B (26 GB FP16) on a 24 GB
    RTX 4090 needs quantization: INT8 13 GB or INT4 6.5 GB fit with room for the KV cache."""
    assert calc.model_size_gb(3.8e9, 4) == approx(1.9)
    assert not calc.fits_in_memory(calc.model_size_bytes(13e9, 16), 24 * GB)
    assert calc.model_size_gb(13e9, 8) == approx(13)
    assert calc.model_size_gb(13e9, 4) == approx(6.5)


def test_001_ch9_design_challenge_13b_on_4090():
    """Seed 001, chapter 9 design challenge: LLaMA-2-13B AWQ INT4 g128 on a 24 GB RTX 4090,
    weights <= 16 GB and >= 8 GB free: "~7.5 GB weights + ~1 GB scales = 8.5 GB, leaves 15.5 GB,
    ~8K context at FP16 or ~16K at INT8 KV cache".

    Exact: 13e9 x 0.5 B = 6.5 GB codes + 13e9/128 x 4 B = 0.41 GB scales and zero-points = 6.91 GB
    (the seed's 7.5 and 1 are generous roundings). The KV cache uses LLaMA-2-13B's shape
    (40 layers, 40 KV heads of dim 128, from the LLaMA-2 paper; the seed gives no shape):
    819,200 B per token at FP16, so the seed's 15.5 GB holds 18,920 tokens (8K fits) and twice
    that at INT8 (16K fits).
    """
    weights = calc.quantized_model_bytes(13e9, 4, group_size=128)
    assert calc.model_size_gb(13e9, 4) == approx(6.5)
    assert (weights - calc.model_size_bytes(13e9, 4)) / GB == approx(0.41, abs=0.005)
    assert weights / GB == approx(6.91, abs=0.005)
    assert weights <= 16 * GB and 24 * GB - weights >= 8 * GB
    assert 24 - 8.5 == approx(15.5)
    per_token = calc.kv_cache_bytes_per_token(40, 40, 128, bytes_per_element=2)
    assert per_token == 819_200
    fp16_ctx = calc.max_context_tokens(15.5 * GB, 40, 40, 128, bytes_per_element=2)
    int8_ctx = calc.max_context_tokens(15.5 * GB, 40, 40, 128, bytes_per_element=1)
    assert fp16_ctx == 18_920 and fp16_ctx >= 8192
    assert int8_ctx >= 16384 and int8_ctx == approx(2 * fp16_ctx, abs=1)
    assert calc.kv_cache_bytes(40, 40, 128, 8192) / GB == approx(6.71, abs=0.005)


def test_001_ch9_quiz_70b_plus_kv_on_a100():
    """Seed 001, chapter 9 final quiz: 70B weights + ~25 GB KV cache in 80 GB: INT4 fits
    (35 + 25 = 60 GB, 62.2 with g128 metadata), INT8 does not (70 + 25 = 95 GB)."""
    kv = 25 * GB
    assert calc.fits_in_memory(calc.model_size_bytes(70e9, 4) + kv, A100_BYTES)
    assert calc.fits_in_memory(calc.quantized_model_bytes(70e9, 4, group_size=128) + kv, A100_BYTES)
    assert not calc.fits_in_memory(calc.model_size_bytes(70e9, 8) + kv, A100_BYTES)


# ============================== seed 002 ===============================================

def test_002_ch0_memory_problem():
    """Seed 002, chapter 0: GPT-3 175B x 2 B = 350 GB (an 80 GB GPU holds less than a quarter);
    7B FP16 = 14 GB, 70B = 140 GB; quiz: 13B FP16 = 26 GB."""
    gpt3 = calc.model_size_bytes(175e9, 16)
    assert gpt3 / GB == approx(350)
    assert 80 * GB / gpt3 < 0.25
    assert calc.model_size_gb(7e9, 16) == approx(14)
    assert calc.model_size_gb(70e9, 16) == approx(140)
    assert calc.model_size_gb(13e9, 16) == approx(26)


def test_002_ch0_training_memory_adam_fp32():
    """Seed 002, chapter 0: 7B in FP32 with Adam = 7B x (4 + 4 + 4 + 4) = 112 GB
    (weights, gradients, two moment buffers)."""
    mem = calc.training_memory(7e9)
    assert (mem.weights, mem.gradients, mem.optimizer) == (28e9, 28e9, 56e9)
    assert mem.total / GB == approx(112)


def test_002_ch1_keep_top_3():
    """Seed 002, chapter 1: W = [5.0, 0.3, -0.4, -2.1, 0.01, 1.7], T = 3 -> [5.0, 0, 0, -2.1, 0, 1.7]."""
    w = [5.0, 0.3, -0.4, -2.1, 0.01, 1.7]
    assert calc.keep_top_k(w, 3) == [5.0, 0, 0, -2.1, 0, 1.7]
    assert calc.magnitude_prune(w, 0.5) == [5.0, 0, 0, -2.1, 0, 1.7]


def test_002_ch2_two_four_sparsity_storage():
    """Seed 002, chapter 2: 2:4 keeps 2 of every 4 values plus a 2-bit position index each:
    the values halve (the "50% compression"); with the indices an FP16 matrix takes 56.25%.
    Chapter 0: a 90% sparse network stores only 10% of the parameters (values alone)."""
    n = 4096 * 4096
    dense = calc.model_size_bytes(n, 16)
    assert calc.sparse_storage_bytes(n, 0.5, 16, layout="values") / dense == approx(0.5)
    nm = calc.sparse_storage_bytes(n, 0.5, 16, layout="nm", m=4)
    assert nm / dense == approx((16 + 2) / 2 / 16)
    assert calc.sparse_storage_bytes(n, 0.9, 16, layout="values") / dense == approx(0.10)


def test_002_ch3_format_ratios():
    """Seed 002, chapter 3: FP32 4 B, FP16/BF16 2 B, INT8 1 B, INT4 0.5 B; FP32 -> INT8 is 4x,
    -> INT4 8x; quiz: FP16 -> INT4 is 4x."""
    assert [calc.model_size_bytes(1, b) for b in (32, 16, 8, 4)] == approx([4, 2, 1, 0.5])
    assert calc.compression_ratio(32, 8) == approx(4)
    assert calc.compression_ratio(32, 4) == approx(8)
    assert calc.compression_ratio(calc.model_size_bytes(7e9, 16), calc.model_size_bytes(7e9, 4)) == approx(4)


def test_002_ch4_kmeans_storage():
    """Seed 002, chapter 4: D=512, K=16: FP32 = 32 x D^2 = 8,388,608 bits; k-means
    = 4 x 262,144 + 16 x 32 = 1,049,088 bits: 8x (7.996)."""
    n = 512 * 512
    assert calc.model_size_bytes(n, 32) * 8 == 8_388_608
    assert calc.kmeans_storage_bytes(n, 16) * 8 == 1_049_088
    assert calc.kmeans_compression_ratio(n, 16) == approx(8, abs=0.005)


def test_002_ch4_7b_size_table():
    """Seed 002, chapter 4 model size table, 7B: FP32 28.0, FP16 14.0, INT8 7.0, INT4 3.5, INT2 1.75 GB."""
    assert [calc.model_size_gb(7e9, b) for b in (32, 16, 8, 4, 2)] == approx([28, 14, 7, 3.5, 1.75])


def test_002_ch7_temperature_softmax():
    """Seed 002, chapter 7: logits [5, 1, 0.5] at T = 1, 5, 20.

    The seed's rows ([0.935, 0.017, 0.010], [0.506, 0.264, 0.230], [0.361, 0.325, 0.314]) do not
    sum to 1 and are not this softmax; the right values are below. Its point stands: higher T
    flattens the distribution (entropy rises with T)."""
    z = [5, 1, 0.5]
    p1, p5, p20 = (calc.softmax_with_temperature(z, t) for t in (1, 5, 20))
    assert p1 == approx([0.971, 0.018, 0.011], abs=5e-4)
    assert p5 == approx([0.539, 0.242, 0.219], abs=5e-4)
    assert p20 == approx([0.382, 0.313, 0.305], abs=5e-4)
    assert calc.entropy(p1) < calc.entropy(p5) < calc.entropy(p20)


def test_002_ch7_distilbert_size():
    """Seed 002, chapter 7: BERT-base 110M -> DistilBERT 66M: 60% of the size (seed 003: 40% smaller)."""
    assert calc.size_reduction(110e6, 66e6) == approx(0.40)
    assert calc.compression_ratio(110e6, 66e6) == approx(1 / 0.6)
