"""Seed 000 (000_4771dc3858ea71b2.txt, the compression workbook), chapters 0 and 3-9:
every numeric worked example ("Exercise", "Show derivation", key formulas) through
shrink.calc, with the seed's own numbers at the seed's rounding. Chapters 1-2 are
tested with the quant layer (tests/quant); only chapter 2's metadata byte counts,
which calc also computes, are repeated here. Where the seed's number is off, the test asserts what
is right and a comment says so.
"""
from __future__ import annotations

import math

import pytest

from shrink import calc

approx = pytest.approx
GB = 1e9
A100_FP16 = 312e12
A100_FP32 = 156e12
A100_BW = 2e12  # "2 TB/s" = 2000 GB/s


# ---- Chapter 0: Compression Arithmetic ------------------------------------------------

def test_ex0_1_model_size_13b_fp16():
    """Seed 000, Exercise 0.1: 13B params in FP16 = 26 GB; rule of thumb 7B -> 14, 70B -> 140."""
    assert calc.model_size_gb(13e9, 16) == approx(26.0)
    assert calc.model_size_bytes(13e9, 16) == approx(26e9)
    assert calc.model_size_gb(7e9, 16) == approx(14.0)
    assert calc.model_size_gb(70e9, 16) == approx(140.0)


def test_ex0_2_compression_ratio():
    """Seed 000, Exercise 0.2: 14 GB -> 3.5 GB is 4.0x, the same as 16 bits -> 4 bits."""
    assert calc.compression_ratio(14, 3.5) == approx(4.0)
    assert calc.compression_ratio(calc.model_size_gb(7e9, 16), calc.model_size_gb(7e9, 4)) == approx(16 / 4)


def test_ex0_3_fewer_bytes_means_proportional_speedup():
    """Seed 000, Exercise 0.3 (explanation): shrinking the weights 4x moves 4x fewer bytes,
    so bandwidth-bound inference speeds up by up to 4x."""
    assert calc.bandwidth_bound_speedup(14 * GB, 14 * GB / 4) == approx(4.0)


def test_ex0_4_bandwidth_bound_speedup():
    """Seed 000, Exercise 0.4: on 2 TB/s, 14 GB takes 7.0 ms, 3.5 GB takes 1.75 ms: 4.0x."""
    t_fp16 = calc.bandwidth_bound_latency_s(14 * GB, A100_BW)
    t_int4 = calc.bandwidth_bound_latency_s(3.5 * GB, A100_BW)
    assert t_fp16 * 1e3 == approx(7.0)
    assert t_int4 * 1e3 == approx(1.75)
    assert calc.speedup(t_fp16, t_int4) == approx(4.0)
    assert calc.bandwidth_bound_speedup(14 * GB, 3.5 * GB) == approx(calc.compression_ratio(14, 3.5))


def test_ex0_5_batch1_is_memory_bound():
    """Seed 000, Exercise 0.5: one multiply-add (2 FLOPs) per 2-byte weight = 1 FLOP/byte;
    A100 ratio 312 TFLOPS / 2 TB/s = 156 FLOP/byte, so the GPU waits on memory ~99% of the time."""
    intensity = calc.weight_streaming_intensity(batch=1, bits=16)
    assert intensity == approx(1.0)
    assert calc.arithmetic_intensity(calc.decode_flops_per_token(7e9), calc.model_size_bytes(7e9, 16)) == approx(1.0)
    assert calc.ridge_point(A100_FP16, A100_BW) == approx(156.0)
    assert calc.roofline_bound(intensity, A100_FP16, A100_BW) == "memory"
    busy = calc.attainable_flops(intensity, A100_FP16, A100_BW) / A100_FP16
    assert 1 - busy == approx(0.99, abs=0.01)
    # The seed says batches of "64+" are compute-bound. In this simple model intensity is
    # the batch size (fp16), so batch 64 (64 FLOP/byte) is still under the 156 ridge;
    # the crossover is batch 156.
    assert calc.roofline_bound(calc.weight_streaming_intensity(64, 16), A100_FP16, A100_BW) == "memory"
    assert calc.roofline_bound(calc.weight_streaming_intensity(156, 16), A100_FP16, A100_BW) == "compute"


def test_ex0_6_model_size_gb_function():
    """Seed 000, Exercise 0.6: modelSizeGB = params x bits / 8 / 1e9; FP16 = 2 bytes, INT4 = 0.5 byte."""
    assert calc.model_size_gb(1e9, 16) == approx(2.0)
    assert calc.model_size_gb(1e9, 4) == approx(0.5)
    assert calc.model_size_gb(7e9, 4) == approx(3.5)


def test_ex0_7_compression_ratio_direction():
    """Seed 000, Exercise 0.7: the bug divides compressed / original = 0.25; right is 14 / 3.5 = 4.0."""
    assert calc.compression_ratio(original=14, compressed=3.5) == approx(4.0)
    assert calc.compression_ratio(original=3.5, compressed=14) == approx(0.25)  # the buggy line's value


# ---- Chapter 2, metadata arithmetic only (the quantizers themselves are tested in tests/quant) --

def test_ex2_1_per_channel_overhead():
    """Seed 000, Exercise 2.1: [4096, 4096] per channel: 4096 scales + 4096 zero-points = 8,192
    values = 0.049% of 16,777,216."""
    assert calc.per_channel_overhead_values(4096) == 8192
    assert calc.per_channel_overhead_fraction(4096, 4096) * 100 == approx(0.049, abs=5e-4)


def test_ex2_3_group_overhead():
    """Seed 000, Exercise 2.3: int4, g=128 on [4096, 4096]: 32 groups per row, 131,072 groups,
    524,288 B (0.5 MB) of metadata + 8,388,608 B (8.0 MB) of codes = 8.5 MB; overhead 5.9%.
    Chapter 2 key formula: 2 x ceil(K / G) values per channel."""
    assert calc.group_count(4096, 4096, 128) == 131_072
    total = calc.quantized_matrix_bytes(4096, 4096, 4, "group", 128)
    assert total == 8_388_608 + 524_288
    assert total / 2**20 == approx(8.5)
    assert calc.quantization_overhead_fraction(4096, 4096, 4, "group", 128) * 100 == approx(5.9, abs=0.05)
    assert calc.group_count(1, 4096, 128) * 2 == 2 * math.ceil(4096 / 128)


# ---- Chapter 3: Quantization-Aware Training ---------------------------------------------

def test_ex3_1_ste_gradient():
    """Seed 000, Exercise 3.1: dL/dy = 0.05 with x in range -> dL/dx = 0.05 x 1 = 0.05; out of range -> 0."""
    assert calc.ste_gradient(0.05, x=0.3, clip_min=-1.0, clip_max=1.0) == approx(0.05)
    assert calc.ste_gradient(0.05, x=1.3, clip_min=-1.0, clip_max=1.0) == 0.0


def test_ex3_3_qat_training_cost():
    """Seed 000, Exercise 3.3: 10% of 100 epochs x 1M samples at 1000/1.3 = 769.2 samples/s
    = 13,001 s = 3.61 h; the original 100 epochs take ~28 h."""
    assert 1000 / 1.3 == approx(769.2, abs=0.05)
    hours = calc.qat_hours(100, 1_000_000, 1000, epoch_fraction=0.10, overhead=0.30)
    assert hours * 3600 == approx(13_001, abs=1)  # seed rounds 13,000.0 s up via 769.2
    assert hours == approx(3.61, abs=0.005)
    assert calc.training_hours(100, 1_000_000, 1000) == approx(28, abs=0.5)


def test_ex3_4_fake_quantize_clamps():
    """Seed 000, Exercise 3.4: x=1.6, scale 0.01, zp 100: round(260) clamps to 255 -> (255-100) x 0.01 = 1.55."""
    assert calc.fake_quantize_value(1.6, 0.01, 100, 0, 255) == approx(1.55)
    assert calc.fake_quantize_value(0.5, 0.01, 100, 0, 255) == approx(0.5)  # in range: round-trips


def test_ex3_5_ste_multiplies_by_mask():
    """Seed 000, Exercise 3.5: the gradient is gated by multiplying by the mask: in range -> grad
    (not grad + 1), out of range -> 0 (not grad)."""
    assert calc.ste_gradient(0.2, x=0.0, clip_min=-1, clip_max=1) == approx(0.2)
    assert calc.ste_gradient(0.2, x=-2.0, clip_min=-1, clip_max=1) == 0.0


# ---- Chapter 4: Pruning -------------------------------------------------------------------

EX4_1 = [0.5, -0.1, 0.8, -0.02, 0.3, -0.7, 0.05, 0.9]


def test_ex4_1_magnitude_pruning_by_hand():
    """Seed 000, Exercise 4.1: 50% pruning zeroes -0.1, -0.02, 0.3, 0.05; survivors 0.5, 0.8,
    -0.7, 0.9 sum to 1.5; the pruned ones summed to 0.23."""
    pruned = calc.magnitude_prune(EX4_1, 0.5)
    assert pruned == [0.5, 0.0, 0.8, 0.0, 0.0, -0.7, 0.0, 0.9]
    assert sum(pruned) == approx(1.5)
    assert sum(w for w, p in zip(EX4_1, pruned) if p == 0) == approx(0.23)


def test_ex4_2_structured_rows_cut_flops():
    """Seed 000, Exercise 4.2 (explanation): a [3072, 4096] matmul instead of [4096, 4096] does 25% less work."""
    ratio = calc.matmul_flops(3072, 4096, 1) / calc.matmul_flops(4096, 4096, 1)
    assert 1 - ratio == approx(0.25)


def test_ex4_3_sparse_flops_speedup():
    """Seed 000, Exercise 4.3: dense 2 x 4096^3 = 137.4 GFLOP, 90% sparse 13.74 GFLOP, 10.0x;
    chapter key formula: speedup = 1 / (1 - sparsity); 2:4 (50%) -> ~2x."""
    dense = calc.matmul_flops(4096, 4096, 4096)
    sparse = calc.sparse_matmul_flops(4096, 4096, 4096, 0.9)
    assert dense / 1e9 == approx(137.4, abs=0.05)
    assert sparse / 1e9 == approx(13.74, abs=0.005)
    assert dense / sparse == approx(10.0)
    assert calc.sparse_speedup_bound(0.9) == approx(10.0)
    assert calc.sparse_speedup_bound(0.5) == approx(2.0)


def test_ex4_5_magnitude_prune_ties():
    """Seed 000, Exercise 4.5: ties at the threshold prune only enough to reach the sparsity."""
    pruned = calc.magnitude_prune([0.1, -0.1, 0.1, 0.1, 0.5, 0.6], 0.5)
    assert pruned.count(0.0) == 3
    assert pruned[4:] == [0.5, 0.6]
    assert calc.sparsity_of(pruned) == approx(0.5)


# ---- Chapter 5: Lottery Ticket Hypothesis ----------------------------------------------------

def test_ex5_1_lottery_ticket_search_cost():
    """Seed 000, Exercise 5.1: N = log(0.2)/log(0.8) = 7.213 -> 8 rounds; 8 x 100 = 800 epochs = 8.0x."""
    assert math.log(0.2) / math.log(0.8) == approx(7.213, abs=5e-4)
    assert calc.imp_rounds(0.8, 0.2) == 8
    assert calc.imp_cost(0.8, 0.2, run_cost=100) == approx(800)
    assert calc.imp_cost(0.8, 0.2) == approx(8.0)


def test_ex5_1_key_formula_90_percent():
    """Seed 000, chapter 5 key formula: at 20% per round, 90% sparsity takes 11 rounds = 11x."""
    assert calc.imp_rounds(0.9, 0.2) == 11
    assert calc.imp_cost(0.9, 0.2) == approx(11.0)


def test_ex5_3_ticket_density_after_pruning():
    """Seed 000, Exercise 5.3: 100M, 5 rounds of 20%: 80, 64, 51.2, 40.96, 32.768M;
    about 67% removed; 20M go in round 1 vs 8.2M in round 5."""
    remaining = calc.imp_remaining(100e6, 0.2, 5)
    assert [r / 1e6 for r in remaining] == approx([80.0, 64.0, 51.2, 40.96, 32.768])
    assert calc.imp_sparsity(0.2, 5) == approx(0.67, abs=0.005)
    assert (100e6 - remaining[0]) / 1e6 == approx(20.0)
    assert (remaining[3] - remaining[4]) / 1e6 == approx(8.2, abs=0.05)


def test_ex5_5_iterative_prune_function():
    """Seed 000, Exercise 5.5: iterativePrune returns the remaining count after each of `rounds` rounds."""
    assert calc.imp_remaining(1000, 0.5, 3) == approx([500, 250, 125])


# ---- Chapter 6: Knowledge Distillation --------------------------------------------------------

def test_ex6_1_temperature_and_entropy():
    """Seed 000, Exercise 6.1: z = [2.0, 1.0, 0.1]: T=1 -> [0.659, 0.242, 0.099], T=5 ->
    [0.400, 0.327, 0.273]; H(T=1) = 0.847, H(T=5) = 1.087, difference 0.24 nats; ln 3 = 1.099."""
    p1 = calc.softmax_with_temperature([2.0, 1.0, 0.1], 1)
    p5 = calc.softmax_with_temperature([2.0, 1.0, 0.1], 5)
    assert p1 == approx([0.659, 0.242, 0.099], abs=5e-4)
    assert p5 == approx([0.400, 0.327, 0.273], abs=5e-4)
    assert calc.entropy(p1) == approx(0.847, abs=5e-4)
    assert calc.entropy(p5) == approx(1.087, abs=5e-4)
    assert calc.entropy(p5) - calc.entropy(p1) == approx(0.24, abs=5e-3)
    assert calc.entropy([1 / 3] * 3) == approx(1.099, abs=5e-4)


def test_ex6_3_distillation_loss():
    """Seed 000, Exercise 6.3: 0.7 x 4^2 x 0.05 + 0.3 x 2.3 = 0.56 + 0.69 = 1.25."""
    assert calc.distillation_loss_from_terms(0.05, 2.3, alpha=0.7, temperature=4) == approx(1.25)
    soft = calc.distillation_loss_from_terms(0.05, 2.3, alpha=1.0, temperature=4)  # T^2 KL = 0.8
    hard = calc.distillation_loss_from_terms(0.05, 2.3, alpha=0.0, temperature=4)  # CE = 2.3
    assert 0.7 * soft == approx(0.56)
    assert 0.3 * hard == approx(0.69)


def test_ex6_3_loss_from_logits_matches_terms():
    """Seed 000, chapter 6 formula L = a T^2 KL(p_t^T || p_s^T) + (1 - a) CE(y, p_s^1), from logits."""
    s, t = [0.5, 1.0, 0.2], [2.0, 1.0, 0.1]
    kl = calc.kl_divergence(calc.softmax_with_temperature(t, 3), calc.softmax_with_temperature(s, 3))
    ce = calc.cross_entropy(calc.softmax_with_temperature(s, 1), 0)
    expected = calc.distillation_loss_from_terms(kl, ce, alpha=0.7, temperature=3)
    assert calc.distillation_loss(s, t, label=0, alpha=0.7, temperature=3) == approx(expected)
    assert expected == approx(0.566540, abs=1e-5)  # torch: kl_div(batchmean) x T^2 and cross_entropy


def test_ex6_4_and_6_6_t_squared_correction():
    """Seed 000, Exercises 6.4 and 6.6: softening scales gradients by 1/T^2; at T=10, without the
    T^2 factor the distillation signal is 100x weaker."""
    assert calc.distillation_gradient_factor(10) == approx(1 / 100)
    assert calc.distillation_gradient_factor(4) * 4**2 == approx(1.0)


def test_ex6_5_stable_softmax_with_temperature():
    """Seed 000, Exercise 6.5: divide by T, subtract the max, exp, normalize; no overflow on big logits."""
    assert calc.softmax_with_temperature([1000.0, 999.0], 1) == approx([1 / (1 + math.e**-1), 1 / (1 + math.e)])
    assert calc.softmax_with_temperature([4.0, 2.0], 2) == approx(calc.softmax_with_temperature([2.0, 1.0], 1))


# ---- Chapter 7: Low-Rank Factorization & LoRA -------------------------------------------------

def test_ch7_intro_rank16_factorization():
    """Seed 000, chapter 7 intro: [4096 x 16] x [16 x 4096] = 131K params instead of 16.8M, 128x;
    compression d / (2r)."""
    assert calc.low_rank_params(4096, 4096, 16) == 131_072
    assert calc.lora_compression_ratio(4096, 16) == approx(128.0)
    assert calc.low_rank_compression_ratio(4096, 4096, 16) == approx(128.0)


def test_ex7_1_svd_break_even_rank():
    """Seed 000, Exercise 7.1: 2 x 4096 x r = 4096^2 at r = 2048 = d/2."""
    assert calc.break_even_rank(4096, 4096) == approx(2048)
    assert calc.low_rank_params(4096, 4096, 2048) == 4096 * 4096


def test_ex7_2_lora_savings_7b():
    """Seed 000, Exercise 7.2: 2 x 4096 x 16 = 131,072 per matrix; 4 x 32 = 128 matrices;
    16,777,216 ~ 16.8M trainable = 0.24% of 7B."""
    assert calc.lora_params(4096, 4096, 16) == 131_072
    total = calc.lora_params(4096, 4096, 16, matrices=4 * 32)
    assert total == 16_777_216
    assert calc.lora_trainable_fraction(total, 7e9) * 100 == approx(0.24, abs=0.005)


def test_ex7_4_energy_at_rank_4():
    """Seed 000, Exercise 7.4: sigma = [10, 5, 2, 1, 0.5, 0.1, 0.05, 0.01], energy at rank 4.

    The seed sums the sigma^2 to 130.2726 and gets 99.79%; the sum is 130.2626
    (100 + 25 + 4 + 1 + 0.25 + 0.01 + 0.0025 + 0.0001), so 130 / 130.2626 = 99.80%.
    """
    sigma = [10, 5, 2, 1, 0.5, 0.1, 0.05, 0.01]
    assert sum(s * s for s in sigma) == approx(130.2626)
    assert calc.energy_captured(sigma, 4) == approx(0.99798, abs=5e-6)
    assert calc.energy_captured(sigma, 4) * 100 == approx(99.79, abs=0.015)  # the seed's figure, nearly
    assert calc.rank_for_energy(sigma, 0.99) == 3


def test_ex7_5_lora_params_function():
    """Seed 000, Exercise 7.5 and chapter 7 key formula: 2 x d x r x num_matrices."""
    assert calc.lora_params(512, 512, 8, matrices=3) == 2 * 512 * 8 * 3


# ---- Chapter 8: Mixed Precision & Hardware ----------------------------------------------------

def test_ch8_bytes_per_format_and_peak_ratios():
    """Seed 000, chapter 8 intro: FP32 4, FP16/BF16 2, INT8 1, INT4 0.5 bytes; A100 312 vs 156
    and H100 990 vs 495 TFLOPS are both 2x; key formula: INT4 is 8x over FP32."""
    assert [calc.model_size_bytes(1, b) for b in (32, 16, 8, 4)] == approx([4, 2, 1, 0.5])
    flops = 1e12
    assert calc.speedup(calc.compute_bound_latency_s(flops, A100_FP32),
                        calc.compute_bound_latency_s(flops, A100_FP16)) == approx(2.0)
    assert calc.speedup(calc.compute_bound_latency_s(flops, 495e12),
                        calc.compute_bound_latency_s(flops, 990e12)) == approx(2.0)
    assert calc.compression_ratio(calc.model_size_bytes(7e9, 32), calc.model_size_bytes(7e9, 4)) == approx(8.0)


def test_ex8_1_activation_memory_savings():
    """Seed 000, Exercise 8.1: 60 GB of FP32 activations -> 30 GB in FP16: 30 GB saved; the FP32
    master weights and optimizer states do not shrink."""
    assert 60 - calc.bytes_at_precision(60, 32, 16) == approx(30.0)
    fp32 = calc.training_memory(7e9, activation_bytes=60 * GB)
    mixed = calc.training_memory(7e9, mixed_precision=True, activation_bytes=30 * GB)
    assert mixed.master_weights + mixed.optimizer == fp32.weights + fp32.optimizer
    assert (fp32.activations - mixed.activations) / GB == approx(30.0)


def test_ex8_2_tensor_core_speedup():
    """Seed 000, Exercise 8.2: 2 x 4096^3 = 137.4 GFLOP: 0.440 ms at 312 TFLOPS, 0.881 ms at 156: 2.0x."""
    flops = calc.matmul_flops(4096, 4096, 4096)
    assert flops / 1e9 == approx(137.4, abs=0.05)
    t16 = calc.compute_bound_latency_s(flops, A100_FP16)
    t32 = calc.compute_bound_latency_s(flops, A100_FP32)
    # 137,438,953,472 / 312e12 = 0.4405 ms; the seed's 0.440 divides the rounded 137.4 GFLOP.
    assert t16 * 1e3 == approx(0.4405, abs=5e-5)
    assert t16 * 1e3 == approx(0.440, abs=1e-3)
    assert t32 * 1e3 == approx(0.881, abs=5e-4)
    assert calc.speedup(t32, t16) == approx(2.0)


def test_ex8_4_fp8_compression():
    """Seed 000, Exercise 8.4: 70B: FP16 140 GB, FP8 70 GB, 2.0x."""
    assert calc.model_size_gb(70e9, 16) == approx(140)
    assert calc.model_size_gb(70e9, 8) == approx(70)
    assert calc.compression_ratio(calc.model_size_gb(70e9, 16), calc.model_size_gb(70e9, 8)) == approx(2.0)


def test_ex8_5_loss_scaling_unscale():
    """Seed 000, Exercise 8.5: gradients of loss x S are S x too large; divide by S before the
    update, else the effective learning rate is multiplied by S (e.g. 1024x)."""
    true_grads = [0.001, -0.25, 3e-6]
    scaled = [g * 1024 for g in true_grads]
    assert calc.unscale_gradients(scaled, 1024) == approx(true_grads)
    assert scaled[1] / calc.unscale_gradients(scaled, 1024)[1] == approx(1024)


# ---- Chapter 9: Capstone ---------------------------------------------------------------------

def test_ch9_intro_gap():
    """Seed 000, chapter 9 intro: 13B FP16 = 26 GB against an 8 GB GPU is a 3.25x gap."""
    assert calc.compression_ratio(calc.model_size_gb(13e9, 16), 8) == approx(3.25)
    assert not calc.fits_in_memory(calc.model_size_bytes(13e9, 16), 8 * GB)


def test_ex9_1_prune_then_quantize():
    """Seed 000, Exercise 9.1: 13B FP16 = 26 GB; 50% structured -> 6.5B; INT4 -> 3.25 GB; 8.0x = 2x x 4x."""
    original = calc.model_size_bytes(13e9, 16)
    final = calc.pipeline_size_bytes(13e9, 0.5, 4, structured=True)
    assert original / GB == approx(26.0)
    assert final / GB == approx(3.25)
    assert calc.compression_ratio(original, final) == approx(8.0)
    assert calc.fits_in_memory(final, 8 * GB)


def test_ex9_3_distillation_plus_quantization_latency():
    """Seed 000, Exercise 9.3: 70B FP16 teacher at 100 ms/token; 7B INT8 student: 10x fewer FLOPs
    x 2x INT8 = 20x -> 5.0 ms/token, i.e. 200 tokens/s."""
    latency = calc.student_latency(0.100, 70e9, 7e9, precision_speedup=2.0)
    assert latency * 1e3 == approx(5.0)
    assert calc.speedup(0.100, latency) == approx(20.0)
    assert calc.tokens_per_s(latency) == approx(200.0)


def test_ex9_4_compression_pipeline_function():
    """Seed 000, Exercise 9.4: size = params x (1 - prune) x quant_bits / 8 / 1e9; the original
    bits only set the ratio."""
    size = calc.pipeline_size_bytes(7e9, 0.3, 8, structured=True)
    assert size / GB == approx(7e9 * 0.7 * 8 / 8 / 1e9)
    assert calc.compression_ratio(calc.model_size_bytes(7e9, 16), size) == approx(16 / (0.7 * 8))
