"""Early exit: attach exit heads to a Sequential classifier, train them jointly on the shared
engine, and measure the trade-off of accuracy, depth and latency across thresholds.

The loss, per batch, is a weighted mean over the outputs that train (weights default equal):

- labeled batches (Labeled(inputs, labels)): cross-entropy of each output on the labels;
- unlabeled batches: distillation, T^2 KL(softmax(teacher/T) || softmax(exit/T)). With the
  base frozen the teacher is the model's own final head (its logits, detached): the exits
  learn to predict what full depth predicts. With train_base the final head moves too, so
  every output, the final included, distills from a fixed teacher (the original model; by
  default a copy of the base taken before training).

train_base false (the default): the base's parameters are frozen and it stays in eval mode
while the heads train (BatchNorm statistics untouched), so full-depth outputs, and the
accuracy at threshold 1, are the base model's exactly. train_base true: the exits' losses
also shape the shared layers (the final head's cross-entropy, or distillation, in the mix).
"""
from __future__ import annotations

import copy
import statistics
import time
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from shrink.algos.kd import check_temperature, soft_kl
from shrink.data.labeled import split_batch
from shrink.modules.early_exit import EarlyExitModel, ExitHead, check_exits, exit_width, sequential_layers

from .engine import TrainOptions, TrainRecord, train

DEFAULT_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0)


def _classes(model: nn.Sequential) -> int:
    last = model[sequential_layers(model)[-1]]
    n = getattr(last, "out_features", None)
    if not isinstance(n, int):
        raise ValueError(f"early_exit supports nn.Sequential classifiers (digits-mlp, digits-cnn); the last layer "
                         f"({type(last).__name__}) is not a Linear with out_features (the class logits)")
    return n


def attach_exits(model: nn.Module, exits: Sequence[int] | None = None, *, threshold: float = 0.9,
                 seed: int = 0) -> EarlyExitModel:
    """An EarlyExitModel around `model` (which becomes its base: not copied), with a freshly
    initialized exit head (seeded) after each layer in `exits` (default: every layer but the
    last)."""
    if isinstance(model, EarlyExitModel):
        raise ValueError("early_exit: the model already has exit heads; attach them once (or set .threshold)")
    n = len(sequential_layers(model))
    exits = check_exits(model, tuple(range(n - 1)) if exits is None else tuple(exits))
    classes = _classes(model)
    like = next((t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()), None)
    heads = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for e in exits:
            width, pool = exit_width(model, e)
            heads.append(ExitHead(width, classes, pool))
    ee = EarlyExitModel(model, exits, heads, threshold)
    if like is not None:
        ee.heads.to(device=like.device, dtype=like.dtype)
    return ee.train(model.training)


def exit_loss(*, train_base: bool = False, teacher: nn.Module | None = None, temperature: float = 2.0,
              weights: Sequence[float] | None = None) -> Callable[[EarlyExitModel, object], torch.Tensor]:
    """loss_fn(model, batch) for the engine (see the module's docstring)."""
    t = check_temperature(temperature, "early_exit")

    def fn(model: EarlyExitModel, batch) -> torch.Tensor:
        inputs, labels = split_batch(batch)
        outs = model.forward_all(inputs)
        terms = outs if train_base else outs[:-1]
        w = _weights(weights, len(terms))
        if labels is not None:
            labels = labels.to(outs[0].device).reshape(-1)
            losses = [F.cross_entropy(o.float(), labels) for o in terms]
        else:
            if train_base:
                with torch.no_grad():
                    ref = teacher(inputs)
            else:
                ref = outs[-1].detach()
            losses = [soft_kl(o, ref, t) for o in terms]
        return sum(wi * li for wi, li in zip(w, losses))
    return fn


def _weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    w = [float(v) for v in weights]
    if len(w) != n or any(not v >= 0 for v in w) or sum(w) <= 0:
        raise ValueError(f"early_exit: weights must be {n} non-negative numbers (one per trained output) with a "
                         f"positive sum, got {list(weights)!r}")
    return [v / sum(w) for v in w]


def train_exits(model: EarlyExitModel, batches: Sequence, options: TrainOptions, *, train_base: bool = False,
                teacher: nn.Module | None = None, temperature: float = 2.0, weights: Sequence[float] | None = None,
                progress=None) -> TrainRecord:
    """Train the exit heads (and with train_base the whole model) on the shared engine. The
    base's trainability is restored afterwards; the model is left in eval mode."""
    if not isinstance(model, EarlyExitModel):
        raise TypeError(f"train_exits: expected an EarlyExitModel (attach_exits), got {type(model).__name__}")
    if train_base and teacher is None:
        teacher = copy.deepcopy(model.base).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    loss_fn = exit_loss(train_base=train_base, teacher=teacher, temperature=temperature, weights=weights)
    flags = {id(p): p.requires_grad for p in model.base.parameters()}
    try:
        if not train_base:
            for p in model.base.parameters():
                p.requires_grad_(False)
            model.base_frozen = True
            params = [p for p in model.heads.parameters() if p.requires_grad]
        else:
            params = None
        return train(model, batches, loss_fn, options, params=params, progress=progress, label="early_exit")
    finally:
        model.base_frozen = False
        for p in model.base.parameters():
            p.requires_grad_(flags[id(p)])
        model.eval()


# ----------------------------------------------------------------------------- measuring

@torch.no_grad()
def exit_accuracies(model: EarlyExitModel, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Accuracy of each exit alone, then of the final head, on every row (full depth)."""
    was = model.training
    model.eval()
    try:
        return [float((o.argmax(-1) == y).double().mean()) for o in model.forward_all(x)]
    finally:
        model.train(was)


@torch.inference_mode()
def batch1_latency_ms(model: nn.Module, x: torch.Tensor, *, repeats: int = 5, warmup: int = 1) -> float:
    """Mean milliseconds per row when the rows of x are run one at a time (batch 1): the median
    over `repeats` passes over the rows. With early exit the rows' depths differ, so the
    mean over many rows is the number that matters."""
    rows = [x[i:i + 1] for i in range(x.shape[0])]
    if not rows:
        raise ValueError("batch1_latency_ms: no rows to time")
    for r in rows[:warmup]:
        model(r)
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        for r in rows:
            model(r)
        times.append((time.perf_counter() - t0) * 1e3 / len(rows))
    return statistics.median(times)


def tradeoff(model: EarlyExitModel, x: torch.Tensor, y: torch.Tensor,
             thresholds: Sequence[float] = DEFAULT_THRESHOLDS, *, latency_rows: int = 64,
             repeats: int = 5) -> list[dict]:
    """Per threshold: accuracy on (x, y), where the samples left (fractions per exit, the
    final head last), the mean number of stages and of layers run and that depth as a
    fraction of the model's layers, and the batch-1 latency (batch1_latency_ms over the
    first `latency_rows` rows of x, in this process), and the compute fraction (mean
    multiply-accumulates per sample, exit heads included, over the base model's). The
    model's threshold is restored."""
    was, before = model.training, model.threshold
    model.eval()
    macs = model.exit_macs(x[:1])
    out = []
    try:
        for t in thresholds:
            model.threshold = t
            with model.recording(macs) as st, torch.no_grad():
                pred = model(x).argmax(-1)
            row = {"threshold": float(t), "accuracy": float((pred == y).double().mean()), **st.to_dict()}
            if latency_rows > 0:
                row["latency_ms"] = batch1_latency_ms(model, x[:latency_rows], repeats=repeats)
            out.append(row)
    finally:
        model.threshold = before
        model.train(was)
    return out
