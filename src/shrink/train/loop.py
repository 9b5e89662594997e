"""Fine-tuning: a short training loop that recovers the quality a compression step cost.

Two training signals, both needing only the calibration inputs a recipe already has:

- "lm": next-token cross-entropy on the batches' own tokens (causal LMs);
- "distill": match a teacher (the uncompressed model): KL divergence between the
  temperature-softened output distributions for models that output logits
  (classifiers, LMs), mean squared error on the last hidden states for encoders.
  No labels are needed, so a classifier calibrated on unlabeled images recovers too.

Pruned weights stay pruned: `masks` (parameter -> bool mask, True = kept) are applied to
the gradients and re-applied after every optimizer step; SparseLinear modules train only
their stored values, so their pattern cannot change.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from shrink.surgery.capture import call_model

Progress = Callable[[int, int], None]
LOSSES = ("auto", "lm", "distill")


@dataclass
class TrainRecord:
    steps: int
    loss: str
    lr: float
    losses: list[float] = field(default_factory=list)   # one per step
    seconds: float = 0.0

    def to_dict(self) -> dict:
        n = max(1, len(self.losses) // 10)
        head, tail = self.losses[:n], self.losses[-n:]
        return {"steps": self.steps, "loss": self.loss, "lr": self.lr, "seconds": self.seconds,
                "loss_first": sum(head) / len(head) if head else None,
                "loss_last": sum(tail) / len(tail) if tail else None,
                "curve": self.losses[:: max(1, len(self.losses) // 50)]}


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
    with torch.no_grad():
        out = call_model(model, batch)
    return isinstance(out, torch.Tensor) or getattr(out, "logits", None) is not None


def _token_ids(batch) -> torch.Tensor | None:
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
        return F.mse_loss(student.float(), teacher.float())
    t = temperature
    s = F.log_softmax(student.float().reshape(-1, student.shape[-1]) / t, dim=-1)
    p = F.log_softmax(teacher.float().reshape(-1, teacher.shape[-1]) / t, dim=-1)
    return F.kl_div(s, p, log_target=True, reduction="batchmean") * t * t


def resolve_loss(loss: str, model: nn.Module, batch, teacher: nn.Module | None = None) -> str:
    """auto: distillation when there is a teacher (measured better than next-token loss on a
    small calibration set, which a causal LM overfits: docs/BENCHMARKS.md, Pruning), else
    next-token loss for a causal LM."""
    if loss not in LOSSES:
        raise ValueError(f"finetune: loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if loss != "auto":
        return loss
    if teacher is not None:
        return "distill"
    ids = _token_ids(batch)
    return "lm" if ids is not None and ids.dim() == 2 and _is_causal(model) else "distill"


def _is_causal(model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    archs = getattr(cfg, "architectures", None) or []
    return hasattr(model, "generation_config") or any("CausalLM" in a or "LMHead" in a for a in archs)


def finetune(model: nn.Module, batches: Sequence, *, steps: int, lr: float = 1e-4, loss: str = "auto",
             teacher: nn.Module | None = None, masks: dict[nn.Parameter, torch.Tensor] | None = None,
             temperature: float = 2.0, weight_decay: float = 0.0, progress: Progress | None = None,
             seed: int = 0, callback: Callable[[int, nn.Module], None] | None = None) -> TrainRecord:
    """Train `model` in place for `steps` optimizer steps over `batches` (cycled, in a seeded
    order), AdamW with a cosine decay to 10% of lr after a 5% warm-up. loss="distill" needs a
    teacher (kept frozen, in eval mode). callback(step, model) runs after each optimizer step
    (e.g. to snapshot the weights a lottery ticket rewinds to). Returns the per-step losses."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
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
    teacher_logits = kind == "distill" and has_logits(teacher, batches[0])
    params = [p for p in model.parameters() if p.requires_grad and p.is_floating_point()]
    if not params:
        raise ValueError("finetune: the model has no trainable floating-point parameters "
                         "(quantized layers train with QAT, not finetune)")
    masks = {p: m.to(p.device) for p, m in (masks or {}).items()}
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    rec = TrainRecord(steps=steps, loss=kind, lr=lr)
    was_training = model.training
    teacher_training = teacher is not None and teacher.training
    model.train()
    if teacher is not None:
        teacher.eval()
    t0 = time.perf_counter()
    try:
        for step in range(steps):
            if not order:
                order = torch.randperm(len(batches), generator=gen).tolist()
            batch = batches[order.pop()]
            out = output_tensor(call_model(model, batch))
            if kind == "lm":
                ids = _token_ids(batch).to(out.device)
                am = batch.get("attention_mask") if isinstance(batch, dict) else None
                value = lm_loss(out, ids, None if am is None else am.to(out.device))
            else:
                with torch.no_grad():
                    ref = output_tensor(call_model(teacher, batch))
                value = distill_loss(out, ref, temperature, logits=teacher_logits)
            if not torch.isfinite(value):
                raise FloatingPointError(f"finetune: the loss became {float(value)} at step {step + 1}; "
                                         f"lower lr (now {lr:g})")
            opt.zero_grad(set_to_none=True)
            value.backward()
            for p, m in masks.items():
                if p.grad is not None:
                    p.grad.mul_(m)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            with torch.no_grad():
                for p, m in masks.items():
                    p.mul_(m)
            rec.losses.append(float(value.detach()))
            if callback:
                callback(step + 1, model)
            if progress:
                progress(step + 1, steps)
    finally:
        model.train(was_training)
        if teacher is not None:
            teacher.train(teacher_training)
    rec.seconds = time.perf_counter() - t0
    return rec
