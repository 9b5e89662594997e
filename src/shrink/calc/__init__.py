"""The seeds' formulas as small pure functions on plain numbers (no torch).

size      bytes of a model: bit widths, quantization metadata, k-means, sparse storage, pipelines
roofline  latency, speedup, FLOPs, arithmetic intensity, ridge point, KV cache, decode bound, early exit
training  training memory, QAT time, LoRA / low-rank / SVD energy, STE, fake-quantize, loss scaling
pruning   magnitude pruning on lists, sparsity, sparse FLOPs, iterative magnitude pruning rounds and cost
distill   temperature softmax, entropy, KL, cross-entropy, distillation loss

Every docstring states its formula and the seed example it comes from. Bad
arguments raise ValueError naming the function and the argument.
"""
from __future__ import annotations

from shrink.calc.distill import (
    cross_entropy, distillation_gradient_factor, distillation_loss, distillation_loss_from_terms,
    entropy, kl_divergence, soft_distillation_loss, softmax_with_temperature,
)
from shrink.calc.pruning import (
    imp_cost, imp_remaining, imp_rounds, imp_sparsity, keep_top_k, magnitude_prune,
    sparse_matmul_flops, sparse_speedup_bound, sparsity_of, threshold_prune,
)
from shrink.calc.roofline import (
    arithmetic_intensity, attainable_flops, bandwidth_bound_latency_s, bandwidth_bound_speedup,
    compute_bound_latency_s, decode_flops_per_token, decode_tokens_per_s_bound,
    early_exit_expected_layers, early_exit_speedup, kv_cache_bytes, kv_cache_bytes_per_token,
    matmul_flops, max_context_tokens, ridge_point, roofline_bound, roofline_latency_s, speedup,
    student_latency, tokens_per_s, transformer_flops, transformer_layer_flops,
    weight_streaming_intensity,
)
from shrink.calc.size import (
    GB, GIB, compression_ratio, devices_needed, fits_in_memory, group_count, kmeans_compression_ratio,
    kmeans_index_bits, kmeans_storage_bytes, metadata_bits_per_weight, model_size_bytes,
    model_size_gb, model_size_gib, per_channel_overhead_fraction, per_channel_overhead_values,
    pipeline_size_bytes, quantization_overhead_fraction, quantized_matrix_bytes,
    quantized_model_bytes, size_reduction, sparse_storage_bytes,
)
from shrink.calc.training import (
    TrainingMemory, break_even_rank, bytes_at_precision, energy_captured, fake_quantize_value,
    lora_compression_ratio, lora_params, lora_trainable_fraction, low_rank_compression_ratio,
    low_rank_params, qat_hours, rank_for_energy, ste_gradient, training_hours, training_memory,
    unscale_gradients,
)

__all__ = [
    # size
    "GB", "GIB", "compression_ratio", "devices_needed", "fits_in_memory", "group_count",
    "kmeans_compression_ratio", "kmeans_index_bits", "kmeans_storage_bytes",
    "metadata_bits_per_weight", "model_size_bytes", "model_size_gb", "model_size_gib",
    "per_channel_overhead_fraction", "per_channel_overhead_values", "pipeline_size_bytes",
    "quantization_overhead_fraction", "quantized_matrix_bytes", "quantized_model_bytes",
    "size_reduction", "sparse_storage_bytes",
    # roofline
    "arithmetic_intensity", "attainable_flops", "bandwidth_bound_latency_s",
    "bandwidth_bound_speedup", "compute_bound_latency_s", "decode_flops_per_token",
    "decode_tokens_per_s_bound", "early_exit_expected_layers", "early_exit_speedup",
    "kv_cache_bytes", "kv_cache_bytes_per_token", "matmul_flops", "max_context_tokens",
    "ridge_point", "roofline_bound", "roofline_latency_s", "speedup", "student_latency",
    "tokens_per_s", "transformer_flops", "transformer_layer_flops", "weight_streaming_intensity",
    # training
    "TrainingMemory", "break_even_rank", "bytes_at_precision", "energy_captured",
    "fake_quantize_value", "lora_compression_ratio", "lora_params", "lora_trainable_fraction",
    "low_rank_compression_ratio", "low_rank_params", "qat_hours", "rank_for_energy",
    "ste_gradient", "training_hours", "training_memory", "unscale_gradients",
    # pruning
    "imp_cost", "imp_remaining", "imp_rounds", "imp_sparsity", "keep_top_k", "magnitude_prune",
    "sparse_matmul_flops", "sparse_speedup_bound", "sparsity_of", "threshold_prune",
    # distill
    "cross_entropy", "distillation_gradient_factor", "distillation_loss",
    "distillation_loss_from_terms", "entropy", "kl_divergence", "soft_distillation_loss",
    "softmax_with_temperature",
]
