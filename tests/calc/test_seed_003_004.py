"""Seeds 003 and 004 (lessons): their memory, FLOP, size, ratio and rank examples through
shrink.calc, with the seeds' own numbers. Both round freely and sometimes err; each such
place asserts what is right and says so in a comment.

003 = 003_70fa84ec92a4636d.txt (Lesson 39), 004 = 004_569dad11434c389c.txt (Week 11 slides).
"""
from __future__ import annotations

import pytest

from shrink import calc

approx = pytest.approx
GB, MB = 1e9, 1e6
KIB, MIB = 2**10, 2**20

# ============================== seed 003 ===============================================


def test_003_s1_70b_on_gpus():
    """Seed 003 §1: LLaMA-70B in FP32 needs four A100 GPUs (280 GB / 80 GB -> 4). The seed adds
    "in INT4 it fits on a single 24GB card": 70B x 0.5 B = 35 GB does not fit 24 GB (it needs 2)."""
    assert calc.devices_needed(calc.model_size_bytes(70e9, 32), 80 * GB) == 4
    int4 = calc.model_size_bytes(70e9, 4)
    assert not calc.fits_in_memory(int4, 24 * GB)
    assert calc.devices_needed(int4, 24 * GB) == 2


def test_003_s2_int8_int4_ratios():
    """Seed 003 §2 and Quick Reference: FP32 -> FP16 2x, -> INT8 4x, -> INT4 8x."""
    fp32 = calc.model_size_bytes(1e6, 32)
    assert [calc.compression_ratio(fp32, calc.model_size_bytes(1e6, b)) for b in (16, 8, 4)] == approx([2, 4, 8])


def test_003_s2_quantize_dynamic_mlp_size():
    """Seed 003 §2: Linear(512, 512) + Linear(512, 10): FP32 state dict 1.07 MB, INT8 ~0.28 MB.

    267,786 params x 4 B = 1.071 MB. INT8 weights (one per-tensor scale each) with FP32 biases
    = 269,356 B = 0.269 MB; the seed's "0.28 (approximate)" includes torch.save's own overhead.
    """
    weights = 512 * 512 + 10 * 512
    biases = 512 + 10
    assert calc.model_size_bytes(weights + biases, 32) / MB == approx(1.07, abs=0.005)
    int8 = (calc.quantized_matrix_bytes(512, 512, 8, "tensor", symmetric=True)
            + calc.quantized_matrix_bytes(10, 512, 8, "tensor", symmetric=True)
            + calc.model_size_bytes(biases, 32))
    assert int8 == 269_356
    assert int8 / MB == approx(0.28, abs=0.015)
    assert calc.compression_ratio(calc.model_size_bytes(weights, 32), calc.model_size_bytes(weights, 8)) == approx(4)


def test_003_your_turn_2_threshold_prune():
    """Seed 003, Your Turn #2: threshold 0.1 on [0.9, -0.05, 0.4, 0.02, -0.7, 0.01, 0.6, -0.03]:
    half the weights fall away, 4 survive."""
    pruned = calc.threshold_prune([0.9, -0.05, 0.4, 0.02, -0.7, 0.01, 0.6, -0.03], 0.1)
    assert sum(1 for w in pruned if w != 0) == 4
    assert calc.sparsity_of(pruned) == approx(0.5)


def test_003_mini_challenge_prune_report():
    """Seed 003, Mini-Challenge: |w| < 0.1 pruned from [0.7, -0.02, 0.5, 0.08, -0.9, 0.03, 0.6, -0.4]:
    5 remain, sparsity 37.5%."""
    pruned = calc.threshold_prune([0.7, -0.02, 0.5, 0.08, -0.9, 0.03, 0.6, -0.4], 0.1)
    assert [w for w in pruned if w != 0] == [0.7, 0.5, -0.9, 0.6, -0.4]
    assert calc.sparsity_of(pruned) * 100 == approx(37.5)


def test_003_s4_distillation_loss_example():
    """Seed 003 §4: T=4, teacher [5.0, 2.0, 0.5, 0.1, -1.0], student [4.2, 2.3, 0.4, 0.2, -0.8].

    The seed's "expected output (approximate)" — teacher soft [0.63, 0.298, 0.205, ...] and loss
    0.0009 — is wrong: softmax(teacher / 4) = [0.432, 0.204, 0.140, 0.127, 0.096] and
    KL(batchmean) x T^2 = 0.1145 (what PyTorch prints for that code)."""
    teacher, student = [5.0, 2.0, 0.5, 0.1, -1.0], [4.2, 2.3, 0.4, 0.2, -0.8]
    assert calc.softmax_with_temperature(teacher, 4) == approx([0.432, 0.204, 0.140, 0.127, 0.096], abs=5e-4)
    assert calc.soft_distillation_loss(student, teacher, 4) == approx(0.1145, abs=5e-5)


def test_003_s4_distilbert_40_percent_smaller():
    """Seed 003 §4 and FAQ: DistilBERT (66M) is 40% smaller than BERT-base (110M)."""
    assert calc.size_reduction(110e6, 66e6) == approx(0.40)


def test_003_s5_low_rank_1000():
    """Seed 003 §5: 1000 x 1000 = 1,000,000 numbers; rank 50: 1000x50 + 50x1000 = 100,000; 10x."""
    assert calc.low_rank_params(1000, 1000, 50) == 100_000
    assert calc.low_rank_compression_ratio(1000, 1000, 50) == approx(10)


def test_003_quick_reference_magnitude_pruning_file():
    """Seed 003, Quick Reference: magnitude pruning gives "~2x (file)": at 50% sparsity the values
    alone halve; with a presence bitmask an FP32 file shrinks 1.88x."""
    n = 1e6
    fp32 = calc.model_size_bytes(n, 32)
    assert calc.compression_ratio(fp32, calc.sparse_storage_bytes(n, 0.5, 32, "values")) == approx(2)
    assert calc.compression_ratio(fp32, calc.sparse_storage_bytes(n, 0.5, 32, "bitmask")) == approx(32 / 17)


# ============================== seed 004 ===============================================

def test_004_gpt3_sizes_and_gaps():
    """Seed 004, "The 350GB Problem" / "700GB Challenge": 175B x 4 = 700 GB FP32, 350 FP16,
    175 INT8, 87.5 INT4 (the seed writes 87); 350 GB is 22x a 16 GB laptop, 700 GB is 44x;
    servers of 64-256 GB are 3-11x over."""
    assert [calc.model_size_gb(175e9, b) for b in (32, 16, 8, 4)] == approx([700, 350, 175, 87.5])
    assert calc.model_size_gb(175e9, 4) == approx(87, abs=0.5)
    assert calc.compression_ratio(350, 16) == approx(22, abs=0.5)
    assert calc.compression_ratio(700, 16) == approx(44, abs=0.5)
    assert calc.compression_ratio(700, 256) == approx(3, abs=0.5)
    assert calc.compression_ratio(700, 64) == approx(11, abs=0.5)


def test_004_size_reductions():
    """Seed 004, "Compression Spectrum": INT8 removes 75% of FP32, INT4 87.5%; 4-bit removes 75% of FP16."""
    assert calc.size_reduction(calc.model_size_bytes(1, 32), calc.model_size_bytes(1, 8)) == approx(0.75)
    assert calc.size_reduction(calc.model_size_bytes(1, 32), calc.model_size_bytes(1, 4)) == approx(0.875)
    assert calc.size_reduction(calc.model_size_bytes(175e9, 16), calc.model_size_bytes(175e9, 4)) == approx(0.75)


@pytest.mark.parametrize("params, seed_size, rounding", [
    (110e6, 440 * MB, 0.0),      # BERT-Base 440MB
    (340e6, 1.4 * GB, 0.05),     # BERT-Large: 1.36 GB, written 1.4GB (and 1.3 GB on one slide)
    (1.5e9, 6 * GB, 0.0),        # GPT-2 6GB
    (175e9, 700 * GB, 0.0),      # GPT-3 700GB
    (540e9, 2.1e12, 0.06),       # PaLM: 2.16 TB, written 2.1TB
    (117e6, 500 * MB, 0.07),     # small GPT-2: 468 MB, written 500MB
    (7e9, 28 * GB, 0.0),         # LLaMA-2 7B 28GB
    (3e9, 12 * GB, 0.0),         # Apple's 3B LLM 12GB
    (14e6, 55 * MB, 0.02),       # BERT-Tiny: 56 MB, written 55 MB
    (66e6, 260 * MB, 0.02),      # DistilBERT: 264 MB, written 260MB
])
def test_004_fp32_size_table(params, seed_size, rounding):
    """Seed 004, "Model Size Evolution", distillation and deployment slides: FP32 size = params x 4 B."""
    assert calc.model_size_bytes(params, 32) == approx(seed_size, rel=rounding or 1e-12)


def test_004_low_bit_deployments():
    """Seed 004 deployment slides: LLaMA-2 7B 28 GB -> 3.5 GB (4-bit; also on a Raspberry Pi);
    GPT-J 6B INT8 = 6 GB (Jetson); BERT-Base FP16 220 / INT8 110 / INT4 55 MB.

    Gemini Nano "1.8B, 900MB (INT8)": 1.8B at INT8 is 1.8 GB; 900 MB is its 4-bit size.
    Apple "3B, 12GB -> 1.5GB (INT4 + 50% pruning)": INT4 alone is 1.5 GB; with 50% of the
    weights removed as well it would be 0.75 GB.
    """
    assert calc.model_size_gb(7e9, 4) == approx(3.5)
    assert calc.model_size_gb(6e9, 8) == approx(6)
    assert [calc.model_size_bytes(110e6, b) / MB for b in (16, 8, 4)] == approx([220, 110, 55])
    assert calc.model_size_gb(1.8e9, 8) == approx(1.8)
    assert calc.model_size_gb(1.8e9, 4) == approx(0.9)
    assert calc.model_size_gb(3e9, 4) == approx(1.5)
    assert calc.pipeline_size_bytes(3e9, 0.5, 4) / GB == approx(0.75)


def test_004_bert_on_arduino():
    """Seed 004: BERT 440 MB -> "2 MB" with 95% pruning + INT8, "200x" (440/2 is 220x).

    95% pruning + INT8 leaves 110M x 5% x 1 B = 5.5 MB of values alone (80x), 19.25 MB with a
    presence bitmask; 2 MB is not reachable by those two steps (distillation must do the rest,
    as the MCU slide's "Prune + distill + INT8" says)."""
    values = calc.pipeline_size_bytes(110e6, 0.95, 8, structured=True)
    assert values / MB == approx(5.5)
    assert calc.compression_ratio(440 * MB, values) == approx(80)
    bitmask = calc.pipeline_size_bytes(110e6, 0.95, 8, structured=False, sparse_layout="bitmask")
    assert bitmask / MB == approx(19.25)
    assert calc.compression_ratio(440, 2) == approx(220)


def test_004_bert_attention_layer_int8():
    """Seed 004, "BERT Layer Quantization": shape 768 x 768, "590,592 weights", 2.36 MB FP32,
    590 KB INT8, 4x. 768 x 768 is 589,824; 590,592 = 768 x 769 counts the bias too."""
    assert 768 * 768 == 589_824 and 768 * 769 == 590_592
    assert calc.model_size_bytes(590_592, 32) / MB == approx(2.36, abs=0.005)
    assert calc.model_size_bytes(590_592, 8) / 1e3 == approx(590, abs=1)
    assert calc.compression_ratio(calc.model_size_bytes(590_592, 32), calc.model_size_bytes(590_592, 8)) == approx(4)


def test_004_distillation_ratios():
    """Seed 004, Method 2: BERT-Large 340M -> BERT-Tiny 14M is 24x smaller; -> DistilBERT 66M
    is "5x" (5.15); inference 120 ms -> 60 ms is 2x; lab: GPT-2 1.5B -> 300M is 5x;
    GPT-3 -> GPT-2 "reduce size 100x" (175B / 1.5B = 117x)."""
    assert calc.compression_ratio(340e6, 14e6) == approx(24, abs=0.5)
    assert calc.compression_ratio(340e6, 66e6) == approx(5, abs=0.2)
    assert calc.speedup(0.120, 0.060) == approx(2)
    assert calc.compression_ratio(1.5e9, 300e6) == approx(5)
    assert calc.compression_ratio(175e9, 1.5e9) == approx(116.7, abs=0.05)


def test_004_low_rank_examples():
    """Seed 004, Method 4: 1024 x 1024 = 1,048,576 params (4 MB FP32); r=64: 64 x 2048 = 131,072
    (512 KB), 8x. BERT embedding 30K x 768 = 23M; r=128: 128 x 30,768 = 3.94M ("4M"), 5.85x
    ("5.8x"). GPT-2 attention 768 x 768 = 590K; r=64: 64 x 1536 = 98K, 6x."""
    assert 1024 * 1024 == 1_048_576
    assert calc.model_size_bytes(1024 * 1024, 32) == 4 * MIB
    assert calc.low_rank_params(1024, 1024, 64) == 131_072
    assert calc.model_size_bytes(131_072, 32) == 512 * KIB
    assert calc.low_rank_compression_ratio(1024, 1024, 64) == approx(8)
    assert calc.low_rank_params(30_000, 768, 128) == 3_938_304
    assert calc.low_rank_params(30_000, 768, 128) / 1e6 == approx(4, abs=0.1)
    assert calc.low_rank_compression_ratio(30_000, 768, 128) == approx(5.85, abs=0.005)
    assert calc.low_rank_params(768, 768, 64) == 98_304
    assert calc.low_rank_compression_ratio(768, 768, 64) == approx(6)


def test_004_energy_threshold_rank():
    """Seed 004, Method 4 Step 2: choose the smallest r with sum_r sigma^2 / sum sigma^2 >= 0.95."""
    sigma = [4.0, 2.0, 1.0, 0.5, 0.25]
    r = calc.rank_for_energy(sigma, 0.95)
    assert calc.energy_captured(sigma, r) >= 0.95 > calc.energy_captured(sigma, r - 1)
    assert r == 3  # sigma^2 = 16, 4, 1, ...: 93.8% at r=2, 98.5% at r=3


def test_004_weight_sharing_k4():
    """Seed 004, Method 5: k = 4 clusters -> 2-bit indices; 4 bytes -> 0.25 bytes per weight, 16x
    (the 16 B codebook vanishes for a large layer)."""
    assert calc.kmeans_index_bits(4) == 2
    n = 10**9
    assert calc.kmeans_storage_bytes(n, 4) / n == approx(0.25)
    assert calc.kmeans_compression_ratio(n, 4) == approx(16)


def test_004_kmeans_n1m_k256():
    """Seed 004, Method 5 detail: n = 1M, k = 256: 4 MB original, 1 KB codebook, 1 MB of 8-bit
    indices, ratio 4x (3.996); BERT with k = 256: 440 MB -> 110 MB."""
    n = 1_000_000
    assert calc.model_size_bytes(n, 32) / MB == approx(4)
    assert calc.kmeans_storage_bytes(n, 256) - n == 1024
    assert calc.kmeans_compression_ratio(n, 256) == approx(4, abs=0.005)
    # "BERT (k = 256): 440MB -> 110MB": 110M 8-bit indices + a 1 KB codebook
    assert calc.kmeans_storage_bytes(110_000_000, 256) / MB == approx(110, abs=0.01)


@pytest.mark.parametrize("k, seed_ratio", [(2, 32), (16, 8), (256, 4), (4096, 2.7)])
def test_004_kmeans_cluster_table(k, seed_ratio):
    """Seed 004, clusters table: k=2 32x, k=16 8x, k=256 4x, k=4096 2.7x: 32 / ceil(log2 k) for a
    large layer. For k=4096 that is 32/12 = 2.67 (written 2.7); at n = 1M the codebook makes it 2.64."""
    assert calc.kmeans_compression_ratio(10**9, k) == approx(seed_ratio, abs=0.05)
    if k == 4096:
        assert calc.kmeans_compression_ratio(1_000_000, k) == approx(2.64, abs=0.005)


def test_004_mixed_precision_memory_table():
    """Seed 004, Method 6 memory table (percent of the FP32 weights): FP32 activations 100,
    gradients 100, weights 100, optimizer 200; mixed: 50, 50, 100, 200.

    The seed totals these 400% and 350%; the rows sum to 500% and 400%. (This table counts
    only the FP32 master weights; with the FP16 working copy too, mixed precision is 450%.)"""
    p = 1e9
    w = calc.model_size_bytes(p, 32)
    fp32 = calc.training_memory(p, activation_bytes=w)
    mixed = calc.training_memory(p, weight_bits=32, grad_bits=16, master_bits=0,
                                 activation_bytes=calc.bytes_at_precision(w, 32, 16))
    pct = lambda m: [100 * x / w for x in (m.activations, m.gradients, m.weights, m.optimizer)]  # noqa: E731
    assert pct(fp32) == approx([100, 100, 100, 200])
    assert pct(mixed) == approx([100 / 2, 50, 100, 200])
    assert 100 * fp32.total / w == approx(500)
    assert 100 * mixed.total / w == approx(400)
    amp = calc.training_memory(p, mixed_precision=True, activation_bytes=w / 2)
    assert 100 * amp.total / w == approx(450)


def test_004_tensor_core_peaks():
    """Seed 004, Method 6: V100 FP16 125 vs FP32 15 TFLOPS: "8x" (8.33); TPU v4 BF16 275 vs FP32 68: 4x."""
    flops = 1e15
    v100 = calc.speedup(calc.compute_bound_latency_s(flops, 15e12), calc.compute_bound_latency_s(flops, 125e12))
    tpu = calc.speedup(calc.compute_bound_latency_s(flops, 68e12), calc.compute_bound_latency_s(flops, 275e12))
    assert v100 == approx(8.33, abs=0.005)
    assert tpu == approx(4, abs=0.05)


def test_004_loss_scaling_2_14():
    """Seed 004, Method 6 training loop: multiply the loss by 2^14, divide the gradients by 2^14."""
    grads = [1e-7, -3e-5]
    assert calc.unscale_gradients([g * 2**14 for g in grads], 2**14) == approx(grads)


def test_004_early_exit_per_difficulty():
    """Seed 004, Method 7: easy exits after 3 of 12 layers (4x), medium 6 (2x), hard 12 (1x)."""
    assert calc.early_exit_speedup(12, [3], [1.0]) == approx(4)
    assert calc.early_exit_speedup(12, [6], [1.0]) == approx(2)
    assert calc.early_exit_speedup(12, [12], [1.0]) == approx(1)


def test_004_early_exit_bert_three_exits():
    """Seed 004, Method 7 detail: exits at layers 4 / 8 / 12 for 35% / 45% / 20% of samples.

    The seed says 6.8 layers on average and 1.76x; the expectation is
    0.35 x 4 + 0.45 x 8 + 0.20 x 12 = 7.4 layers, so 12 / 7.4 = 1.62x."""
    assert calc.early_exit_expected_layers([4, 8, 12], [0.35, 0.45, 0.20]) == approx(7.4)
    assert calc.early_exit_speedup(12, [4, 8, 12], [0.35, 0.45, 0.20]) == approx(1.62, abs=0.005)
    assert calc.speedup(12, 6.8) == approx(1.76, abs=0.005)  # the seed's own (mis-summed) depth


def test_004_adaptive_attention():
    """Seed 004, Method 7: 12 words x 8 heads = 96 head computations, adaptive 48 = 50% less;
    GPT-2 with adaptive heads does 60% of the work: 1.67x."""
    assert calc.size_reduction(12 * 8, 48) == approx(0.5)
    assert calc.speedup(1.0, 0.60) == approx(1.67, abs=0.005)


def test_004_success_metric_ratios():
    """Seed 004, "Success Metrics": R = original / compressed size: FP16 2x, INT8 4x, INT4 8x for BERT."""
    base = calc.model_size_bytes(110e6, 32)
    assert [calc.compression_ratio(base, calc.model_size_bytes(110e6, b)) for b in (16, 8, 4)] == approx([2, 4, 8])
