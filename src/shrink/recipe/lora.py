"""Run the recipe step `lora`: adapters on the targeted Linears, trained on the task's own
loss with the base frozen (QLoRA: the base stored in 4 bits first), then merged into the
weights or kept apart.

Evidence in the step record's details: trainable parameters against the model's (the
seeds' "0.24% of the full model"), rank, alpha, the base's format and what quantizing it
cost (the metric on the quantized base before training, per-layer SQNR), the training
record, and how far merged and unmerged outputs are apart on a calibration batch. A
merged QLoRA model holds float layers again (W' = dequantized base + (alpha / r) B A);
a later quantization step may store them in few bits again.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from shrink.data.labeled import split_batch
from shrink.modules.quant_linear import QuantLinear
from shrink.surgery.capture import call_model
from shrink.train.engine import TrainOptions
from shrink.train.lora import apply_lora, base_spec, fold_lora, lora_layers, merge_lora, train_lora, unmerge_lora
from shrink.train.loop import output_tensor

from .context import StepContext
from .records import LayerRecord, StepRecord, model_params
from .train_steps import LoRA

PROBE_ROWS = 8


def _probe(batch):
    """The inputs of a batch, cut to a few rows: enough to compare outputs."""
    inputs, _ = split_batch(batch)
    if isinstance(inputs, torch.Tensor):
        return inputs[:PROBE_ROWS]
    if isinstance(inputs, dict):
        return {k: v[:PROBE_ROWS] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in inputs.items()}
    return inputs


def _outputs(model: nn.Module, inputs) -> torch.Tensor:
    with torch.no_grad():
        return output_tensor(call_model(model, inputs)).detach().float()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) if a.numel() else 0.0


def run_lora(work: nn.Module, step: LoRA, ctx: StepContext, rec: StepRecord) -> nn.Module:
    batches = ctx.batches(step.batch_size, "lora")
    before = {id(p): p.requires_grad for p in work.parameters()}
    total = model_params(work)
    applied = apply_lora(work, step.targets, rank=step.rank, alpha=step.alpha, dropout=step.dropout,
                         base_bits=step.base_bits, base_format=step.base_format, seed=ctx.seed)
    d = rec.details
    d.update({"rank": step.rank, "alpha": step.alpha, "scaling": step.alpha / step.rank, "dropout": step.dropout,
              "init": "A ~ N(0, (1/rank)^2), B = 0", "adapted_layers": len(applied.layers),
              "targets": list(step.targets) if step.targets else "every Linear but the output head",
              "base_format": f"{step.base_format}-g{base_spec(step.base_format).group_size}" if step.base_bits
              else "float (unchanged)",
              "trainable_params": applied.adapter_params, "model_params": total,
              "trainable_percent": 100.0 * applied.adapter_params / max(1, total)})
    if step.targets:   # what the patterns matched but could not adapt
        rec.skipped.extend(applied.skipped)
    if step.base_bits and ctx.evaluate is not None:
        d["quality_quantized_base"] = ctx.evaluate(work)   # adapters are zero: this is the 4-bit base alone
    if step.base_bits:
        sq = [l.base_sqnr_db for l in applied.layers if math.isfinite(l.base_sqnr_db)]
        d["base_sqnr_db_mean"] = sum(sq) / len(sq) if sq else None
        d["base_bytes"] = sum(l.base_bytes for l in applied.layers)
        d["base_bytes_before"] = sum(l.base_bytes_before for l in applied.layers)
    options = TrainOptions(steps=step.steps, epochs=step.epochs, lr=step.lr, seed=ctx.seed, precision=step.precision,
                           **(ctx.engine_options() if not step.dropout else {}))   # dropout's generator is not checkpointed
    tr = train_lora(work, batches, options, loss=step.loss, teacher=ctx.original, progress=ctx.progress())
    d["training"] = tr.to_dict()
    d["loss"] = tr.loss

    probe = _probe((ctx.calibration or batches)[0])
    unmerged = _outputs(work, probe)
    merge_lora(work)
    merged = _outputs(work, probe)
    d["merged_vs_unmerged_max_abs_diff"] = _max_diff(merged, unmerged)
    d["output_max_abs"] = float(unmerged.abs().max()) if unmerged.numel() else 0.0
    kernels = sorted({m.base.kernel for m in lora_layers(work).values() if isinstance(m.base, QuantLinear)})
    if kernels:
        d["base_kernels"] = kernels   # int4pack computes in bf16: the unmerged outputs carry its rounding
    if step.merge:
        folded = fold_lora(work)
        d["merged"] = True
        d["folded_vs_unmerged_max_abs_diff"] = _max_diff(_outputs(work, probe), unmerged)
        d["merged_layers"] = len(folded)
        if step.base_bits:
            d["merged_note"] = ("QLoRA merged: the targets are float layers again (dequantized base + "
                                "(alpha/r) B A); add a quantization step after lora to store them in few bits")
    else:
        unmerge_lora(work)
        d["merged"] = False
        d["unmerge_exact"] = bool(torch.equal(_outputs(work, probe), unmerged))
        _layer_records(work, applied, step, rec)
    _restore_grad_flags(work, before)
    work.eval()
    return work


def _layer_records(work: nn.Module, applied, step: LoRA, rec: StepRecord) -> None:
    """Adapters kept apart: each adapted layer now stores its base (4-bit for QLoRA) plus A and B."""
    mods = lora_layers(work)
    for l in applied.layers:
        m = mods[l.name]
        kernel = m.base.kernel if isinstance(m.base, QuantLinear) else "dense"
        note = (f"LoRA rank {step.rank} kept apart (A, B: {m.adapter_nbytes} bytes); error = weight MSE of the "
                "stored base against the weight before the step (adapters excluded)")
        rec.layers.append(LayerRecord(name=l.name, shape=(l.out_features, l.in_features),
                                      format=f"{l.base_format}+lora{step.rank}", bytes_fp32=4 * l.out_features *
                                      l.in_features, bytes_stored=l.base_bytes + m.adapter_nbytes, error=l.base_mse,
                                      error_rtn=None, sqnr_db=l.base_sqnr_db, seconds=0.0, kernel=kernel, note=note))


def _restore_grad_flags(work: nn.Module, before: dict[int, bool]) -> None:
    """Give the parameters the step froze their trainability back (a later finetune step trains
    them as before); the bases under adapters kept apart stay frozen."""
    frozen = {id(p) for m in lora_layers(work).values() for p in m.base.parameters()}
    for p in work.parameters():
        if id(p) in before and id(p) not in frozen:
            p.requires_grad_(before[id(p)])

