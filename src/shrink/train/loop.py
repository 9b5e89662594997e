"""Fine-tuning: a short training loop that recovers the quality a compression step cost.

Three training signals; the first two need only the calibration inputs a recipe has:

- "lm": next-token cross-entropy on the batches' own tokens (causal LMs);
- "distill": match a teacher (the uncompressed model): KL divergence between the
  temperature-softened output distributions for models that output logits
  (classifiers, LMs), mean squared error on the last hidden states for encoders.
  No labels are needed, so a classifier calibrated on unlabeled images recovers too;
- "ce": cross-entropy on the labels of Labeled(inputs, labels) batches (classifiers).

Pruned weights stay pruned: `masks` (parameter -> bool mask, True = kept) are applied to
the gradients and re-applied after every optimizer step; SparseLinear modules train only
their stored values, so their pattern cannot change.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from shrink.algos.kd import hidden_loss, soft_kl
from shrink.data.labeled import split_batch
from shrink.models.io import is_causal_lm
from shrink.surgery.capture import call_model

from .engine import TrainOptions, TrainRecord, train

Progress = Callable[[int, int], None]
LOSSES = ("auto", "lm", "distill", "ce")


def output_tensor(out) -> torch.Tensor:
    """The tensor a loss compares: logits where the model has them, else the last hidden states."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if value is None and isinstance(out, dict):
            value = out.get(key)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find logits or hidden states in a {type(out).__name__} model output")


def has_logits(model: nn.Module, batch) -> bool:
    batch, _ = split_batch(batch)
    with torch.no_grad():
        out = call_model(model, batch)
    return isinstance(out, torch.Tensor) or getattr(out, "logits", None) is not None


def _token_ids(batch) -> torch.Tensor | None:
    batch, _ = split_batch(batch)
    if isinstance(batch, torch.Tensor) and not batch.is_floating_point():
        return batch
    if isinstance(batch, dict) and isinstance(batch.get("input_ids"), torch.Tensor):
        return batch["input_ids"]
    return None


def lm_loss(logits: torch.Tensor, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy (positions whose target is padding are ignored)."""
    target = ids[:, 1:].clone()
    if attention_mask is not None:
        target[attention_mask[:, 1:] == 0] = -100
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                           ignore_index=-100)


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 2.0,
                 logits: bool = True) -> torch.Tensor:
    """KL(teacher || student) on softened distributions, scaled by T^2 (Hinton et al.), or MSE
    on hidden states (logits=False)."""
    if not logits:
        return hidden_loss(student, teacher, "mse")
    return soft_kl(student, teacher, temperature)


def resolve_loss(loss: str, model: nn.Module, batch, teacher: nn.Module | None = None) -> str:
    """auto: distillation when there is a teacher, else cross-entropy on the labels of
    Labeled batches, else next-token loss for a causal LM. Distillation is preferred (measured better than next-token loss on a
    small calibration set, which a causal LM overfits: docs/BENCHMARKS.md, Pruning), else
    next-token loss for a causal LM."""
    if loss not in LOSSES:
        raise ValueError(f"finetune: loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if loss != "auto":
        return loss
    if teacher is not None:
        return "distill"
    if split_batch(batch)[1] is not None:
        return "ce"
    ids = _token_ids(batch)
    return "lm" if ids is not None and ids.dim() == 2 and is_causal_lm(model) else "distill"






def make_loss(kind: str, teacher: nn.Module | None = None, temperature: float = 2.0,
              teacher_logits: bool = True) -> Callable[[nn.Module, object], torch.Tensor]:
    """loss_fn(model, batch) for the engine: "lm", "ce" or "distill"."""
    def fn(model: nn.Module, batch) -> torch.Tensor:
        inputs, labels = split_batch(batch)
        out = output_tensor(call_model(model, inputs))
        if kind == "lm":
            ids = _token_ids(inputs).to(out.device)
            am = inputs.get("attention_mask") if isinstance(inputs, dict) else None
            return lm_loss(out, ids, None if am is None else am.to(out.device))
        if kind == "ce":
            return F.cross_entropy(out.float().reshape(-1, out.shape[-1]), labels.to(out.device).reshape(-1))
        with torch.no_grad():
            ref = output_tensor(call_model(teacher, inputs))
        return distill_loss(out, ref, temperature, logits=teacher_logits)
    return fn


def finetune(model: nn.Module, batches: Sequence, *, steps: int | None = None, epochs: float | None = None,
             lr: float = 1e-4, loss: str = "auto", teacher: nn.Module | None = None,
             masks: dict[nn.Parameter, torch.Tensor] | None = None, temperature: float = 2.0,
             weight_decay: float = 0.0, progress: Progress | None = None, seed: int = 0,
             callback: Callable[[int, nn.Module], None] | None = None, precision: str = "fp32",
             evaluate=None, patience: int | None = None, eval_every: int | None = None,
             checkpoint: str | None = None, resume: bool = False, checkpoint_every: int = 100) -> TrainRecord:
    """Train `model` in place for `steps` optimizer steps (or `epochs` passes) over `batches`
    with the shared loop (train/engine.py: AdamW, warm-up then cosine decay to 10% of lr,
    seeded batch order, optional mixed precision, evaluation, early stop, checkpoints).
    loss="distill" needs a teacher (kept frozen, in eval mode); "ce" needs Labeled batches.
    callback(step, model) runs after each optimizer step (e.g. to snapshot the weights a
    lottery ticket rewinds to)."""
    if steps is None and epochs is None:
        raise ValueError("finetune: give steps or epochs")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"finetune: steps must be a positive integer, got {steps!r}")
    if not lr > 0 or not math.isfinite(lr):
        raise ValueError(f"finetune: lr must be a positive number, got {lr!r}")
    if not batches:
        raise ValueError("finetune: no training batches (give the recipe calibration data)")
    kind = resolve_loss(loss, model, batches[0], teacher)
    if kind == "distill" and teacher is None:
        raise ValueError("finetune: loss 'distill' needs a teacher model (the uncompressed original)")
    if kind == "lm" and _token_ids(batches[0]) is None:
        raise ValueError("finetune: loss 'lm' needs batches of token ids (input_ids)")
    if kind == "ce" and split_batch(batches[0])[1] is None:
        raise ValueError("finetune: loss 'ce' needs labeled batches (Labeled(inputs, labels))")
    teacher_logits = kind == "distill" and has_logits(teacher, batches[0])
    options = TrainOptions(steps=steps, epochs=epochs, lr=lr, weight_decay=weight_decay, seed=seed,
                           precision=precision, eval_every=eval_every, patience=patience,
                           checkpoint=None if checkpoint is None else str(checkpoint), resume=resume,
                           checkpoint_every=checkpoint_every)
    teacher_training = teacher is not None and teacher.training
    if teacher is not None:
        teacher.eval()
    try:
        return train(model, batches, make_loss(kind, teacher, temperature, teacher_logits), options,
                     masks=masks, progress=progress, callback=callback, evaluate=evaluate, label=kind)
    finally:
        if teacher is not None:
            teacher.train(teacher_training)
