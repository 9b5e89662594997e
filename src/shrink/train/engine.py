"""The training loop every training-time method shares (fine-tune, QAT, distillation, LoRA,
early exit, pruning's recovery): a loss function and the parameters to train go in; the
loop owns the optimizer and schedule, batch order, mixed precision, evaluation, early
stopping, checkpoints and resume.

- Optimizer AdamW; learning rate: linear warm-up over `warmup` of the steps, then a
  cosine decay to `min_lr` x lr.
- Batches are visited in epochs, each in a fresh order drawn from a generator seeded
  with `seed`: the same data, options and seed give the same weights.
- precision "bf16" / "fp16": the forward pass and loss run under autocast while the
  parameters stay fp32 (the master weights); fp16 adds dynamic loss scaling (train/amp.py).
- evaluate(model) -> a number or a metric dict {"value", "higher_is_better"}: run every
  `eval_every` steps (default: once per epoch); with `patience`, training stops after that
  many evaluations without improvement and the best weights are restored.
- checkpoint: a file written atomically every `checkpoint_every` steps (model, optimizer,
  schedule, scaler, random states, losses); resume=True continues from it and ends with
  the same weights as an uninterrupted run.
- masks {parameter: bool mask}: pruned weights get no gradient and stay zero.
"""
from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .amp import autocast, check_precision, scaler_for

Progress = Callable[[int, int], None]
LossFn = Callable[[nn.Module, Any], torch.Tensor]


@dataclass(frozen=True)
class TrainOptions:
    steps: int | None = None          # optimizer steps; or
    epochs: float | None = None       # passes over the batches (steps = ceil(epochs x batches))
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup: float = 0.05              # fraction of the steps
    min_lr: float = 0.1               # the cosine decays to min_lr x lr
    grad_clip: float | None = 1.0     # max global gradient norm (None: no clipping)
    seed: int = 0
    precision: str = "fp32"           # fp32 | bf16 | fp16 (autocast, fp32 master weights)
    eval_every: int | None = None     # steps between evaluations (default: one per epoch)
    patience: int | None = None       # early stop after this many evaluations without improvement
    checkpoint: str | None = None     # file for checkpoints
    checkpoint_every: int = 100
    resume: bool = False

    def __post_init__(self):
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("training: give steps or epochs (one of them)")
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int)
                                       or self.steps < 1):
            raise ValueError(f"training: steps must be a positive integer, got {self.steps!r}")
        if self.epochs is not None and (isinstance(self.epochs, bool) or not isinstance(self.epochs, (int, float))
                                        or not 0 < self.epochs < 1e6):
            raise ValueError(f"training: epochs must be a positive number, got {self.epochs!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not (0 < self.lr < 1):
            raise ValueError(f"training: lr must be in (0, 1), got {self.lr!r}")
        if not 0 <= self.weight_decay < 1:
            raise ValueError(f"training: weight_decay must be in [0, 1), got {self.weight_decay!r}")
        if not 0 <= self.warmup < 1 or not 0 <= self.min_lr <= 1:
            raise ValueError("training: warmup must be in [0, 1) and min_lr in [0, 1]")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"training: grad_clip must be positive or None, got {self.grad_clip!r}")
        check_precision(self.precision)
        for name in ("eval_every", "patience", "checkpoint_every"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"training: {name} must be a positive integer, got {v!r}")
        if self.resume and not self.checkpoint:
            raise ValueError("training: resume needs a checkpoint file")

    def total_steps(self, n_batches: int) -> int:
        return self.steps if self.steps is not None else max(1, math.ceil(self.epochs * n_batches))


@dataclass
class TrainRecord:
    steps: int
    loss: str
    lr: float
    losses: list[float] = field(default_factory=list)      # one per optimizer step (skipped steps too)
    evaluations: list[dict] = field(default_factory=list)  # {"step", "value"}
    seconds: float = 0.0
    stopped_early: bool = False
    best_step: int | None = None
    skipped_steps: int = 0                                  # fp16 steps skipped for inf/NaN gradients
    precision: str = "fp32"
    resumed_from: int | None = None

    def to_dict(self) -> dict:
        n = max(1, len(self.losses) // 10)
        head, tail = self.losses[:n], self.losses[-n:]
        return {"steps": self.steps, "steps_run": len(self.losses), "loss": self.loss, "lr": self.lr,
                "seconds": self.seconds, "precision": self.precision,
                "loss_first": sum(head) / len(head) if head else None,
                "loss_last": sum(tail) / len(tail) if tail else None,
                "curve": self.losses[:: max(1, len(self.losses) // 50)],
                "evaluations": self.evaluations, "stopped_early": self.stopped_early,
                "best_step": self.best_step, "skipped_steps": self.skipped_steps,
                "resumed_from": self.resumed_from}


def _metric_value(result) -> tuple[float, bool]:
    """(value, higher_is_better) of an evaluate() result."""
    if isinstance(result, dict):
        return float(result["value"]), bool(result.get("higher_is_better", True))
    return float(result), True


def _save_checkpoint(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train(model: nn.Module, batches: Sequence, loss_fn: LossFn, options: TrainOptions, *,
          params: list[nn.Parameter] | None = None, evaluate: Callable[[nn.Module], Any] | None = None,
          masks: dict[nn.Parameter, torch.Tensor] | None = None, progress: Progress | None = None,
          callback: Callable[[int, nn.Module], None] | None = None, label: str = "train") -> TrainRecord:
    """Train `params` (default: every trainable floating-point parameter of `model`) to lower
    loss_fn(model, batch). The model is left in eval mode on return. label names the loss in
    the record (e.g. "distill")."""
    if not batches:
        raise ValueError(f"{label}: no training batches (give the recipe calibration or training data)")
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad and p.is_floating_point()]
    if not params:
        raise ValueError(f"{label}: the model has no trainable floating-point parameters (quantized layers train "
                         "with qat or lora, not finetune)")
    steps = options.total_steps(len(batches))
    device = params[0].device
    masks = {p: m.to(p.device) for p, m in (masks or {}).items()}
    opt = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
    warm = max(1, round(options.warmup * steps))
    floor = options.min_lr

    def lr_at(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        t = min(1.0, (s - warm) / max(1, steps - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    scaler = scaler_for(options.precision)
    gen = torch.Generator().manual_seed(options.seed)
    order: list[int] = []
    rec = TrainRecord(steps=steps, loss=label, lr=options.lr, precision=options.precision)
    eval_every = options.eval_every or len(batches)
    best: tuple[float, int, dict] | None = None   # (score, step, state)
    bad_evals = 0
    start = 0
    torch_rng = None
    ckpt = Path(options.checkpoint) if options.checkpoint else None
    if options.resume and ckpt is not None and ckpt.is_file():
        state = torch.load(ckpt, weights_only=True)
        if state.get("steps") != steps or state.get("n_params") != len(params):
            raise ValueError(f"{ckpt}: the checkpoint is of a different run ({state.get('steps')} steps, "
                             f"{state.get('n_params')} parameter tensors; this run: {steps}, {len(params)}); "
                             "delete it or drop resume")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        gen.set_state(state["generator"])
        torch_rng = state["torch_rng"]
        order = list(state["order"])
        rec.losses = list(state["losses"])
        rec.evaluations = list(state["evaluations"])
        bad_evals = int(state["bad_evals"])
        if state.get("best_state") is not None:
            best = (float(state["best_score"]), int(state["best_step"]), state["best_state"])
        start = int(state["step"])
        rec.resumed_from = start
    was_training = model.training
    model.train()
    t0 = time.perf_counter()
    rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
    with rng:   # dropout and other random layers draw from a generator seeded here; the caller's is untouched
        if torch_rng is None:
            torch.manual_seed(options.seed)
        else:
            torch.set_rng_state(torch_rng)
        try:
            for step in range(start, steps):
                if not order:
                    order = torch.randperm(len(batches), generator=gen).tolist()
                batch = batches[order.pop()]
                with autocast(options.precision, device):
                    value = loss_fn(model, batch)
                if not torch.isfinite(value) and not scaler.enabled:
                    raise FloatingPointError(f"{label}: the loss became {float(value)} at step {step + 1}; lower lr "
                                             f"(now {options.lr:g})")
                opt.zero_grad(set_to_none=True)
                scaler.scale(value.float()).backward()
                for p, m in masks.items():
                    if p.grad is not None:
                        p.grad.mul_(m)
                ok = scaler.unscale(params) and bool(torch.isfinite(value))
                if ok:
                    if options.grad_clip is not None:
                        torch.nn.utils.clip_grad_norm_(params, options.grad_clip)
                    opt.step()
                scaler.update(not ok)
                with warnings.catch_warnings():   # a skipped fp16 step still advances the schedule
                    warnings.simplefilter("ignore", UserWarning)
                    sched.step()
                if masks:
                    with torch.no_grad():
                        for p, m in masks.items():
                            p.mul_(m)
                rec.losses.append(float(value.detach()))
                done = step + 1
                if callback:
                    callback(done, model)
                if evaluate is not None and (done % eval_every == 0 or done == steps):
                    model.eval()
                    with torch.no_grad():
                        score, higher = _metric_value(evaluate(model))
                    model.train()
                    rec.evaluations.append({"step": done, "value": score})
                    key = score if higher else -score
                    if best is None or key > best[0]:
                        best = (key, done, {k: v.detach().clone() for k, v in model.state_dict().items()})
                        bad_evals = 0
                    else:
                        bad_evals += 1
                    if options.patience is not None and bad_evals >= options.patience:
                        rec.stopped_early = True
                if ckpt is not None and (done % options.checkpoint_every == 0 or done == steps or rec.stopped_early):
                    _save_checkpoint(ckpt, {
                        "steps": steps, "n_params": len(params), "step": done, "model": model.state_dict(),
                        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                        "generator": gen.get_state(), "torch_rng": torch.get_rng_state(), "order": list(order),
                        "losses": rec.losses, "evaluations": rec.evaluations, "bad_evals": bad_evals,
                        "best_score": None if best is None else best[0], "best_step": None if best is None else best[1],
                        "best_state": None if best is None else best[2]})
                if progress:
                    progress(done, steps)
                if rec.stopped_early:
                    break
        finally:
            model.train(was_training)
    if best is not None and options.patience is not None:
        model.load_state_dict(best[2])   # early stopping keeps the best evaluated weights
    rec.best_step = None if best is None else best[1]
    rec.skipped_steps = scaler.skipped
    rec.seconds = time.perf_counter() - t0
    model.eval()
    return rec
