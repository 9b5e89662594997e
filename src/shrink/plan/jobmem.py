"""Peak memory of a compression job, from the architecture alone: the in-memory job
(`shrink compress` holding the model and its working copy) and the streamed job
(recipe/stream.py: one decoder block at a time from the safetensors shards).

Streamed peak, each term from the config:
  runtime            Python, torch and transformers once imported (RUNTIME_BYTES, measured
                     on this machine's CPU build: ~0.6 GiB of data segment with
                     torch's threads, ~0.45 GiB resident; RUNTIME_BYTES rounds it up)
+ stem as loaded     calibrated steps only: the token (and position) embeddings the
                     calibration batches enter through; the LM head and final norm are copied
                     tensor by tensor, never loaded into the model
+ one block, float   the largest block's weights at their stored width
+ the block, packed  its quantized output (codes + scales + zero-points), held with it
+ Hessians           calibrated steps: one [in x in] float64 sum per target of the block
+ quantize           the widest layer (gptq: the widest group solved together, gate and up)
                     in float64, three copies (scaled, rounded, the error), measured
+ GPTQ working set   seven [in x in] float64 for the widest input (algos/gptq.py's
                     _inverse_cholesky: H, the damped copy, its flip, the factor, the
                     identity, the triangular solve and its flip)
+ activations        calibrated steps: the hidden states of every calibration token (fp32,
                     replaced in place block by block) + one batch inside the block (q, k, v,
                     MLP, attention scores); all the calibration rows at once where GPTQ runs
                     in one pass (true_sequential, one_pass_bytes within ONE_PASS_BUDGET)
+ writer             the tensors waiting for their shard: max(shard size, largest tensor)

In-memory peak (recipe/memory.py's rule): the model + its working copy + the same
activations, one block's Hessians and quantize/GPTQ working sets, + the runtime."""
from __future__ import annotations

from dataclasses import dataclass

from shrink.quant import QuantSpec

from .arch import Arch
from .formats import FormatInfo, matrix_bytes

STREAMABLE_FAMILIES = ("llama", "mistral", "qwen2", "gpt2")   # what recipe/stream.py can stream
# GPTQ runs a block once on all calibration rows joined (recipe/gptq_inline.py) when that
# batch's activations through the widest layer, ONE_PASS_COPIES of them, fit this budget.
ONE_PASS_BUDGET = 2 * 2**30
ONE_PASS_COPIES = 6


def one_pass_bytes(rows: int, widest: int) -> int:
    """The one-pass GPTQ's estimate of its joined batch inside a block: rows (tokens) x the
    widest layer (max of in and out features) x 4 B, ONE_PASS_COPIES live at once."""
    return rows * widest * 4 * ONE_PASS_COPIES
RUNTIME_BYTES = 640 * 2**20
SHARD_BYTES = 256 * 2**20


@dataclass(frozen=True)
class JobShape:
    """What the recipe and the calibration data are, as far as memory goes."""
    spec: QuantSpec = QuantSpec(bits=4, symmetric=False, granularity="group", group_size=128, axis=0)
    calibrated: bool = True       # gptq (activations, Hessians) vs rtn/kmeans (weights only)
    samples: int = 64             # calibration sequences (job.prepare's default)
    seq_len: int = 128
    batch: int = 8                # sequences per calibration batch
    weight_bytes: int = 4         # bytes per stored weight (fp32 4, bf16/fp16 2)
    shard_bytes: int = SHARD_BYTES
    label: str = "w4-gptq"
    one_pass: bool = False        # gptq true_sequential: all calibration rows inside a block at once


def job_memory(arch: Arch, job: JobShape = JobShape(), d: dict | None = None) -> dict:
    """{"in_memory_bytes", "streamed_bytes", "parts": {...}}; derivations into d
    (job_memory[in_memory], job_memory[streamed])."""
    wb = job.weight_bytes
    f = FormatInfo(name="job", spec=job.spec, bits=job.spec.bits, has_scale=job.spec.has_scale,
                   granularity=job.spec.granularity, group_size=job.spec.group_size,
                   symmetric=not job.spec.has_zero_point, compute="fp16")
    L = arch.num_layers
    per_layer = [s for s in arch.linear_shapes() if s.count == L]
    side = (arch.norm_params() - arch.hidden_size * (2 if arch.norm == "layernorm" else 1)) // L \
        + arch.bias_params() // L
    block_float = (sum(s.out_features * s.in_features for s in per_layer) + side) * wb
    block_packed = sum(matrix_bytes(s.out_features, s.in_features, f) for s in per_layer) + side * wb
    weights = arch.params() * wb
    emb = arch.vocab_size * arch.hidden_size * wb
    pos = (arch.max_context or 0) * arch.hidden_size * wb if arch.learned_positions else 0
    largest = max([emb] + [s.out_features * s.in_features * wb for s in arch.linear_shapes()])
    tokens = job.samples * job.seq_len
    tb = job.batch * job.seq_len
    d_model, inter = arch.hidden_size, arch.intermediate_size
    q_out, kv_out = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    act = hess = solve = stem = 0
    # quantizing a layer (or a group solved together: gate and up) works in float64 next to it
    group = max([s.out_features * s.in_features for s in per_layer]
                + ([2 * inter * d_model] if job.calibrated and arch.gated_mlp else []))
    quant = 3 * 8 * group
    if job.calibrated:
        widest_io = max(max(s.in_features, s.out_features) for s in per_layer)
        if job.one_pass and one_pass_bytes(tokens, widest_io) <= ONE_PASS_BUDGET:
            tb = tokens   # GPTQ in one pass: every calibration row inside the block at once
        act = (tokens * d_model * 4 + tokens * arch.head_dim * 4 * 2
               + tb * (q_out + 2 * kv_out + 3 * d_model + 3 * inter) * 4
               + 2 * job.batch * arch.num_heads * job.seq_len ** 2 * 4)
        hess = sum(8 * s.in_features ** 2 for s in per_layer)
        widest = max(per_layer, key=lambda s: s.in_features ** 2)
        solve = 7 * 8 * widest.in_features ** 2
        stem = emb + pos
    output = L * block_packed + (emb + pos) * (1 if arch.tied_embeddings else 2)   # about: what can be pending
    writer = max(min(job.shard_bytes, output), largest)
    streamed = RUNTIME_BYTES + stem + block_float + block_packed + quant + hess + solve + act + writer
    in_memory = RUNTIME_BYTES + 2 * weights + act + hess + quant + solve
    parts = {"runtime": RUNTIME_BYTES, "stem": stem, "block_float": block_float, "block_packed": block_packed,
             "quantize": quant,
             "hessians": hess, "gptq_solve": solve, "activations": act, "writer": writer, "weights": weights}
    if d is not None:
        inside = "all of them joined (one-pass GPTQ)" if tb == tokens else f"one batch of {tb:,} tokens"
        calib = (f"activations {_mb(act)} ({tokens:,} calibration tokens x {d_model} hidden x 4 B, kept between "
                 f"blocks, + {inside} inside a block) + one block's Hessians {_mb(hess)} "
                 f"(8 B x in^2 per target)") if job.calibrated else "no calibration (weights only)"
        d["job_memory[in_memory]"] = (
            f"{job.label}: runtime {_mb(RUNTIME_BYTES)} + model {_mb(weights)} + working copy {_mb(weights)} + "
            f"{calib} + quantize working set {_mb(quant + solve)} = {_mb(in_memory)}")
        d["job_memory[streamed]"] = (
            f"{job.label}, one block at a time: runtime {_mb(RUNTIME_BYTES)} + "
            + (f"embeddings as loaded {_mb(stem)} + " if stem else "")
            + f"largest block at {wb} B/weight {_mb(block_float)} + its quantized output {_mb(block_packed)} + "
            + f"quantizing its widest layer or group in float64 3 x 8 B x {group:,} = {_mb(quant)} + "
            + (f"Hessians {_mb(hess)} + GPTQ working set {_mb(solve)} + activations {_mb(act)} + "
               if job.calibrated else "")
            + f"shard writer max(min({_mb(job.shard_bytes)} shard, {_mb(output)} output), {_mb(largest)} largest "
            f"tensor) = {_mb(streamed)}")
    if arch.family not in STREAMABLE_FAMILIES:
        streamed = None
        if d is not None:
            d["job_memory[streamed]"] = f"{arch.family} models are not streamed (streaming: {', '.join(STREAMABLE_FAMILIES)})"
    return {"recipe": job.label, "in_memory_bytes": in_memory, "streamed_bytes": streamed, "parts": parts}


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"
