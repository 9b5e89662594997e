"""Run the recipe step `early_exit`: exit heads after intermediate layers of a Sequential
classifier, trained on the shared engine (train/early_exit.py), then the trade-off across
confidence thresholds measured with the job's own metric. The step returns the
EarlyExitModel at the step's threshold; compress's final measurement (quality, batch-1
latency) is of that model.

Evidence in the step record's details["early_exit"]:
- exits (layer indices), the layers each exit has run, the heads' sizes and parameters;
- exit_quality: each exit alone and the final head, scored by the job's metric on its
  held-out data (an ExitView of one exit is a model of its own);
- tradeoff: per threshold the metric, where the samples left (fractions per exit, final
  last), the mean stages and layers run and that depth as a fraction of the model's, the
  compute fraction (mean multiply-accumulates per sample, exit heads included, over the
  base model's: layers differ in cost, a conv layer far more than a head), and
  the batch-1 latency on calibration rows run one at a time. The depth figures are counted
  while the metric runs, so they are of the same held-out samples. Without a metric the
  table scores agreement with the full-depth prediction on calibration rows instead.
"""
from __future__ import annotations

import torch
from torch import nn

from shrink.data.labeled import split_batch
from shrink.modules.early_exit import EarlyExitModel, ExitView
from shrink.train.early_exit import DEFAULT_THRESHOLDS, attach_exits, batch1_latency_ms, train_exits
from shrink.train.engine import TrainOptions

from .context import StepContext
from .records import StepRecord, model_params
from .train_steps import EarlyExit

LATENCY_ROWS = 32
LATENCY_REPEATS = 3


def _inputs(ctx: StepContext, batches: list) -> torch.Tensor | None:
    """Up to 256 rows of model inputs from the calibration data (else the training batches)."""
    rows = []
    for b in (ctx.calibration or batches):
        x, _ = split_batch(b)
        if not isinstance(x, torch.Tensor):
            return None
        rows.append(x)
        if sum(r.shape[0] for r in rows) >= 256:
            break
    return torch.cat(rows)[:256] if rows else None


def run_early_exit(work: nn.Module, step: EarlyExit, ctx: StepContext, rec: StepRecord) -> nn.Module:
    if step.include or step.exclude:
        raise ValueError("early_exit: include/exclude do not apply; choose where the exits go with exits: "
                         "[layer indices]")
    batches = ctx.batches(step.batch_size, "early_exit")
    ee = attach_exits(work, step.exits, threshold=step.threshold, seed=ctx.seed)
    options = TrainOptions(steps=step.steps, epochs=step.epochs, lr=step.lr, seed=ctx.seed, precision=step.precision,
                           **ctx.engine_options())
    labeled = split_batch(batches[0])[1] is not None
    tr = train_exits(ee, batches, options, train_base=step.train_base,
                     teacher=ctx.original if step.train_base else None, progress=ctx.progress())
    rec.details["training"] = tr.to_dict()
    heads = [{"exit": e, "layers_run": e + 1, **h.describe(), "params": sum(p.numel() for p in h.parameters())}
             for e, h in zip(ee.exits, ee.heads)]
    d = {"exits": list(ee.exits), "layers": ee.n_layers, "threshold": step.threshold, "train_base": step.train_base,
         "heads": heads, "head_params": sum(h["params"] for h in heads), "model_params": model_params(ee.base),
         "loss": _loss_text(labeled, step.train_base)}
    x = _inputs(ctx, batches)
    if ctx.evaluate is not None:
        d["exit_quality"] = [{"exit": e, **_value(ctx.evaluate(ExitView(ee, j)))}
                             for j, e in enumerate([*ee.exits, "final"])]
    thresholds = sorted({*DEFAULT_THRESHOLDS, float(step.threshold)})
    d["tradeoff"] = _tradeoff(ee, thresholds, ctx, x)
    d["quality_source"] = ("the job's metric on its held-out data" if ctx.evaluate is not None else
                           "agreement with the full-depth prediction on calibration rows (no metric given)")
    if x is not None:
        d["latency_note"] = (f"batch-1 latency: mean ms per row over {min(LATENCY_ROWS, x.shape[0])} calibration "
                             f"rows run one at a time, median of {LATENCY_REPEATS} passes, this process")
    d["chosen"] = next(r for r in d["tradeoff"] if r["threshold"] == float(step.threshold))
    rec.details["early_exit"] = d
    ee.threshold = step.threshold
    return ee.eval()


def _loss_text(labeled: bool, train_base: bool) -> str:
    outs = "every exit and the final head" if train_base else "every exit head (base frozen)"
    if labeled:
        return f"cross-entropy on the labels, equal weights over {outs}"
    teacher = "the original model" if train_base else "the model's own final head"
    return f"distillation (T=2) from {teacher}, equal weights over {outs}"


def _value(q) -> dict:
    if isinstance(q, dict):
        return {"value": float(q["value"]), "name": q.get("name", "quality")}
    return {"value": float(q), "name": "quality"}


def _tradeoff(ee: EarlyExitModel, thresholds: list[float], ctx: StepContext, x: torch.Tensor | None) -> list[dict]:
    before = ee.threshold
    ee.eval()
    full = None
    if ctx.evaluate is None and x is not None:
        with torch.no_grad():
            full = ee.base(x).argmax(-1)
    macs = ee.exit_macs(x[:1]) if x is not None else None
    rows = []
    try:
        for t in thresholds:
            ee.threshold = t
            with ee.recording(macs) as st, torch.no_grad():
                if ctx.evaluate is not None:
                    q = _value(ctx.evaluate(ee))
                elif x is not None:
                    q = {"value": float((ee(x).argmax(-1) == full).double().mean()), "name": "agreement"}
                else:
                    q = None
            row = {"threshold": t, **({"quality": q["value"], "quality_name": q["name"]} if q else {}),
                   **{k: v for k, v in st.to_dict().items() if k != "calls"}}
            if x is not None:
                row["latency_ms"] = batch1_latency_ms(ee, x[:LATENCY_ROWS], repeats=LATENCY_REPEATS)
            rows.append(row)
    finally:
        ee.threshold = before
    return rows
