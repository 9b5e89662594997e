"""Compression algorithms: pure functions, tensors in -> tensors (or codes) out."""
from shrink.algos.gptq import gptq
from shrink.algos.kmeans import KMeansResult, kmeans
from shrink.algos.magnitude import global_magnitude_masks, magnitude_mask
from shrink.algos.nm import check_nm, nm_mask, parse_pattern
from shrink.algos.result import QuantResult
from shrink.algos.rtn import rtn
from shrink.algos.sparsegpt import SparseGPTResult, layer_loss, sparsegpt
from shrink.algos.sparsity import allocate_sparsity, cubic_schedule, geometric_schedule
from shrink.algos.structured import group_scores, keep_indices, neuron_scores, row_scores
from shrink.algos.wanda import ActNorm, act_norms_from_inputs, wanda_mask, wanda_scores

__all__ = [
    "ActNorm", "KMeansResult", "QuantResult", "SparseGPTResult", "act_norms_from_inputs", "allocate_sparsity",
    "check_nm", "cubic_schedule", "geometric_schedule", "global_magnitude_masks", "gptq", "group_scores",
    "keep_indices", "kmeans", "layer_loss", "magnitude_mask", "neuron_scores", "nm_mask", "parse_pattern",
    "row_scores", "rtn", "sparsegpt", "wanda_mask", "wanda_scores",
]
