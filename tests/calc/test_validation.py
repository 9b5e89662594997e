"""Meaningless arguments raise ValueError naming the function and the argument."""
from __future__ import annotations

import math

import pytest

from shrink import calc

NAN = math.nan


def test_kv_cache_message_names_function_and_argument():
    with pytest.raises(ValueError) as err:
        calc.kv_cache_bytes(32, 8, 128, context=0)
    assert str(err.value) == "kv_cache_bytes: context must be a positive integer, got 0"


@pytest.mark.parametrize("call, fragment", [
    (lambda: calc.model_size_bytes(0, 16), "model_size_bytes: params must be a positive"),
    (lambda: calc.model_size_bytes(-7e9, 16), "model_size_bytes: params"),
    (lambda: calc.model_size_gb(7e9, NAN), "model_size_bytes: bits must be a positive finite number, got nan"),
    (lambda: calc.model_size_gb(7e9, math.inf), "bits"),
    (lambda: calc.compression_ratio(14, 0), "compression_ratio: compressed"),
    (lambda: calc.compression_ratio("14", 3.5), "compression_ratio: original"),
    (lambda: calc.devices_needed(280e9, 0), "devices_needed: device_bytes"),
    (lambda: calc.group_count(4096, 4096, 0), "group_count: group_size must be a positive integer, got 0"),
    (lambda: calc.group_count(4096, 4096.0, 128), "group_count: cols must be a positive integer"),
    (lambda: calc.quantized_matrix_bytes(8, 8, 4, "group"), "quantized_matrix_bytes: group_size is required"),
    (lambda: calc.quantized_matrix_bytes(8, 8, 4, "channel", 4), "only meaningful with granularity 'group'"),
    (lambda: calc.quantized_matrix_bytes(8, 8, 4, "row"), "quantized_matrix_bytes: granularity must be one of"),
    (lambda: calc.quantized_matrix_bytes(8, 8, True), "quantized_matrix_bytes: bits must be a positive integer, got True"),
    (lambda: calc.kmeans_storage_bytes(1000, 0), "kmeans_storage_bytes: k must be a positive integer, got 0"),
    (lambda: calc.sparse_storage_bytes(1e6, 1.0, 16), "sparse_storage_bytes: sparsity must lie in [0, 1), got 1.0"),
    (lambda: calc.sparse_storage_bytes(1e6, 0.5, 16, layout="csr"), "sparse_storage_bytes: layout"),
    (lambda: calc.pipeline_size_bytes(13e9, -0.1, 4), "pipeline_size_bytes: prune_fraction must lie in [0, 1)"),
    (lambda: calc.bandwidth_bound_latency_s(14e9, 0), "bandwidth_bound_latency_s: bandwidth_bytes_per_s"),
    (lambda: calc.ridge_point(NAN, 2e12), "ridge_point: peak_flops"),
    (lambda: calc.arithmetic_intensity(1e9, 0), "arithmetic_intensity: bytes_moved"),
    (lambda: calc.kv_cache_bytes(32, 0, 128, 4096), "kv_cache_bytes: kv_heads must be a positive integer, got 0"),
    (lambda: calc.kv_cache_bytes(32, 8, 128, 4096, bytes_per_element=0), "kv_cache_bytes: bytes_per_element"),
    (lambda: calc.decode_tokens_per_s_bound(0, 1e12), "decode_tokens_per_s_bound: weight_bytes"),
    (lambda: calc.decode_tokens_per_s_bound(1e9, 1e12, kv_bytes=-1), "decode_tokens_per_s_bound: kv_bytes"),
    (lambda: calc.transformer_layer_flops(0, 4096), "transformer_layer_flops: seq_len"),
    (lambda: calc.early_exit_expected_layers([4, 8], [0.5, 0.4]), "exit_fractions must sum to 1"),
    (lambda: calc.early_exit_expected_layers([4, 8], [1.0]), "same length"),
    (lambda: calc.early_exit_speedup(6, [4, 8], [0.5, 0.5]), "must not exceed total_layers"),
    (lambda: calc.imp_rounds(0.8, 0.0), "imp_rounds: prune_rate must lie in (0, 1), got 0.0"),
    (lambda: calc.imp_rounds(1.0, 0.2), "imp_rounds: target_sparsity must lie in [0, 1), got 1.0"),
    (lambda: calc.imp_remaining(100e6, 0.2, 0), "imp_remaining: rounds must be a positive integer, got 0"),
    (lambda: calc.magnitude_prune([], 0.5), "magnitude_prune: values must hold at least 1"),
    (lambda: calc.magnitude_prune([1.0, NAN], 0.5), "magnitude_prune: values[1] must be a finite number"),
    (lambda: calc.magnitude_prune([1.0], 1.5), "magnitude_prune: sparsity must lie in [0, 1]"),
    (lambda: calc.keep_top_k([1.0, 2.0], 3), "keep_top_k: k must be an integer in [0, 2]"),
    (lambda: calc.softmax_with_temperature([1.0, 2.0], 0), "softmax_with_temperature: temperature"),
    (lambda: calc.entropy([0.5, 0.6]), "entropy: probs must be non-negative and sum to 1"),
    (lambda: calc.kl_divergence([0.5, 0.5], [1.0]), "kl_divergence: p and q must have the same length"),
    (lambda: calc.cross_entropy([0.5, 0.5], 2), "cross_entropy: label must be an integer in [0, 1]"),
    (lambda: calc.distillation_loss_from_terms(0.05, 2.3, 1.2, 4), "distillation_loss_from_terms: alpha"),
    (lambda: calc.distillation_loss([1, 2], [1, 2, 3], 0, 0.5, 2), "soft_distillation_loss: student_logits and teacher_logits"),
    (lambda: calc.training_memory(0), "training_memory: params"),
    (lambda: calc.training_memory(7e9, optimizer_states=-1), "training_memory: optimizer_states"),
    (lambda: calc.qat_hours(100, 1e6, 1000, epoch_fraction=0), "qat_hours: epoch_fraction must lie in (0, 1]"),
    (lambda: calc.lora_params(4096, 4096, 0), "low_rank_params: rank must be a positive integer, got 0"),
    (lambda: calc.lora_params(4096, 4096, 16, matrices=0), "lora_params: matrices"),
    (lambda: calc.break_even_rank(0, 4096), "break_even_rank: m"),
    (lambda: calc.energy_captured([1.0, -2.0], 1), "energy_captured: singular_values must be non-negative"),
    (lambda: calc.energy_captured([0.0, 0.0], 1), "must not all be zero"),
    (lambda: calc.fake_quantize_value(1.0, 0, 0, 0, 255), "fake_quantize_value: scale"),
    (lambda: calc.fake_quantize_value(1.0, 0.1, 0, 5, 5), "fake_quantize_value: qmin must be below qmax"),
    (lambda: calc.ste_gradient(0.1, 0.0, 1.0, -1.0), "ste_gradient: clip_min must not exceed clip_max"),
    (lambda: calc.unscale_gradients([1.0], 0), "unscale_gradients: loss_scale"),
    (lambda: calc.student_latency(0.1, 70e9, 0, 2), "student_latency: student_params"),
])
def test_bad_arguments_raise_value_error(call, fragment):
    with pytest.raises(ValueError) as err:
        call()
    assert fragment in str(err.value)


def test_zero_is_fine_where_it_means_something():
    assert calc.sparse_storage_bytes(1e6, 0.0, 16, "values") == 2e6          # nothing pruned
    assert calc.imp_rounds(0.0, 0.2) == 0                                    # already there
    assert calc.decode_tokens_per_s_bound(1e9, 1e12, kv_bytes=0) == 1000.0   # empty cache
    assert calc.magnitude_prune([1.0, -2.0], 0) == [1.0, -2.0]
    assert calc.kmeans_index_bits(1) == 0                                    # one centroid needs no index
