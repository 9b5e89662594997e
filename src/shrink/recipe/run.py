"""Run a recipe on a model: each step picks its target layers, compresses them (with
calibration data, block by block, where the algorithm needs activations) and
records per-layer error, bytes and time. The model given is never modified.

Targets are nn.Linear, transformers' Conv1D and nn.Conv2d (quantized as its
[out, in/groups*kh*kw] matrix and installed as QuantConv2d; Hessian-based steps
see its im2col patches, per filter group for a grouped conv). Layers a step
cannot handle are listed in the step record's `skipped`, with the reason."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from shrink.algos import kmeans, rtn
from shrink.algos.awq import awq
from shrink.algos.mixed import Sensitivity, allocate_bits, layer_sensitivity
from shrink.algos.smoothquant import smoothquant_scales
from shrink.eval.latency import latency_probe
from shrink.modules.w8a8_linear import W8A8Linear
from shrink.quant import QuantSpec, check_finite, dequantize, quantize
from shrink.surgery import SequentialRunner, Target, find_fold_source, fold_into, replace_module, select_modules

from .figures import run_figures
from .install import as_linear as _as_linear, fmt as _fmt, install as _install, sqnr as _sqnr
from .install import sparse_pattern as _sparse_pattern
from .gptq_inline import run_one_pass
from .hessians import HessianCollector, gptq_row_groups, gptq_shared, hessian_error, row_parts
from .measure import four_ratios, measure
from .records import LayerRecord, StepRecord
from .rules import check_order
from .context import StepContext, run_training_step
from .resume import Checkpointer, StepCheckpoint, block_hooks, restore_partial, scrub, step_seed
from .train_steps import TRAINING_STEPS, Distill, LoRA
from .steps import (AWQ, GPTQ, RTN, Finetune, IterativePrune, KMeans, LotteryTicket, MixedPrecision, Prune, SmoothQuant,
                    needs_calibration, parse_recipe, step_to_dict)

Progress = Callable[[str, int, int], None]
MAX_AWQ_TOKENS = 4096


@dataclass
class CompressResult:
    model: nn.Module
    recipe: list
    steps: list[StepRecord]
    metrics: dict = field(default_factory=dict)
    figures: dict = field(default_factory=dict)   # the report's plot data (recipe.figures)

    def to_json(self) -> dict:
        return {"recipe": [step_to_dict(s) for s in self.recipe],
                "steps": [s.to_dict() for s in self.steps], **self.metrics, "figures": self.figures}


def compress(model: nn.Module, recipe: Any, calibration: Iterable | None = None,
             evaluate: Callable[[nn.Module], dict] | None = None, *,
             progress: Progress | None = None, example: Any = None, measure_speed: bool = True,
             baseline: dict | None = None, force: bool = False, train_data: Iterable | None = None,
             seed: int = 0, checkpoint: Checkpointer | None = None) -> CompressResult:
    """Compress a copy of `model` with `recipe` (a built-in name, YAML file, or list of steps).

    calibration: batches the model accepts (tensors of token ids, dicts of model
    inputs, or tuples), needed by gptq and awq. evaluate(model) -> {"name": ..., "value": ...}
    measures quality before and after. example: an input batch for the latency
    (batch 1 and up to 8) and energy figures, default the first calibration batch;
    measure_speed=False skips them (no latency or energy in the metrics). baseline: the
    original model's measurement when already taken (search measures it once for all trials).
    force: run an order the recipe rules refuse (recipe/rules.py); metrics["warnings"] says so.
    train_data: batches the training steps (finetune, qat, distill, lora, early_exit) learn
    from, Labeled(inputs, labels) where there are labels; default the calibration batches.
    seed: the training steps' seed (batch order, initializations).
    checkpoint: a recipe.resume.Checkpointer: the run checkpoints as it goes and starts where
    its latest checkpoint stands (the same result as an uninterrupted run, byte for byte).

    metrics: "baseline" and "compressed" ({"size_bytes", "params", "quality",
    "latency_ms", "latency", "energy"}), "size_reduction", and "ratios" with the
    four figures R (size reduction), A (quality preserved), L (latency
    improvement, batch 1) and E (energy reduction), each original / compressed
    (A: the quality kept, as a fraction; None where a figure was not measured).
    """
    steps = parse_recipe(recipe)
    warnings = check_order(steps, force=force)
    batches = None if calibration is None else list(calibration)
    train_batches = None if train_data is None else list(train_data)
    if example is None and batches:
        example = batches[0]
    probe = latency_probe(example) if measure_speed and example is not None else None
    needs = [s for s in steps if needs_calibration(s)]
    if needs and not batches and not (train_batches and all(getattr(s, "needs_data", False) for s in needs)):
        names = ", ".join(sorted({step_to_dict(s).popitem()[0] for s in needs}))
        raise ValueError(f"recipe steps {names} need calibration data (activations or training batches): pass "
                         "calibration= a list of input batches (e.g. 128 sequences of 512 tokens from "
                         "shrink.data.calibration)")
    _check_weights(model)
    work = copy.deepcopy(model).eval()
    baseline = measure(model, evaluate, probe) if baseline is None else baseline
    records = []
    state = checkpoint.restore() if checkpoint is not None else None
    if state is not None:
        work, records = state.model, state.records
    for i, step in enumerate(steps, 1):
        if state is not None and i <= state.steps_done:
            continue
        step_seed(seed, i)
        part = state.partial if state is not None and state.partial and state.partial.step == i else None
        rec = StepRecord(index=i, step=step_to_dict(step))
        t0 = time.perf_counter()
        types = ("linear", "conv1d", "conv2d") + (("sparse_linear",) if step.kind == "quantize" else ()) + (
            ("sparse_conv2d",) if isinstance(step, (RTN, KMeans, GPTQ, MixedPrecision)) else ())   # pruned convs
        if getattr(step, "refines", False):   # qat: also the layers a PTQ step quantized before it
            types += ("quant_linear", "quant_conv2d")
        sel = select_modules(work, types=types, include=step.include, exclude=step.exclude)
        rec.skipped = [{"name": s.name, "reason": s.reason} for s in sel.skipped if _worth_listing(s)]
        targets = []
        for t in sel.targets:
            why = _unsupported(step, t)
            if why is None:
                targets.append(t)
            else:
                rec.skipped.append({"name": t.name, "reason": why})
        report = (lambda done, total, label=f"step {i} {rec.step and next(iter(rec.step))}":
                  progress(label, done, total)) if progress else None
        if isinstance(step, (Finetune, Distill, LoRA)) or getattr(step, "kind", None) == "structured_prune":
            rec.skipped = []   # they pick no layers by type: nothing was passed over
        if part is not None:   # targets already processed before the interruption are done
            targets = [t for t in targets if t.name not in part.finished]
            restore_partial(rec, part)
        sc = StepCheckpoint(checkpoint, i, records, rec, lambda: work, part) if checkpoint is not None else None
        if isinstance(step, TRAINING_STEPS + (Finetune,)):
            ctx = StepContext(original=model, calibration=batches, train_data=train_batches, evaluate=evaluate,
                              seed=seed, report=report, checkpoint=sc)
            work = run_training_step(work, step, targets, ctx, rec)
        elif isinstance(step, (Prune, IterativePrune, LotteryTicket)):
            _train_or_prune(work, model, step, targets, batches, rec, report, evaluate, sc)
        elif isinstance(step, (RTN, KMeans)):
            _data_free(work, step, targets, rec, report)
        elif isinstance(step, GPTQ):
            _gptq(work, step, targets, batches, rec, report, sc)
        elif isinstance(step, AWQ):
            _awq(work, step, targets, batches, rec, report, sc)
        elif isinstance(step, SmoothQuant):
            _smoothquant(work, step, targets, batches, rec, report, sc)
        elif isinstance(step, MixedPrecision):
            _mixed(work, step, targets, batches, rec, report)
        rec.seconds = time.perf_counter() - t0
        scrub(rec.details)
        records.append(rec)
        if checkpoint is not None and i < len(steps) and checkpoint.due():
            checkpoint.commit(work, records, i)
    compressed = measure(work, evaluate, probe)
    metrics = {"baseline": baseline, "compressed": compressed,
               "size_reduction": baseline["size_bytes"] / compressed["size_bytes"],
               "ratios": four_ratios(baseline, compressed), "warnings": warnings}
    return CompressResult(model=work, recipe=steps, steps=records, metrics=metrics,
                          figures=run_figures(model, work, records))


# ---------------------------------------------------------------- steps

def _train_or_prune(work, original, step, targets, batches, rec: StepRecord, report, evaluate, sc=None) -> None:
    """Pruning steps (recipe/prune.py, structured.py, training.py); sc: their checkpoints (rounds)."""
    from .prune import run_unstructured
    from .structured import run_structured
    from .training import run_iterative, run_lottery

    if isinstance(step, IterativePrune):
        run_iterative(work, original, step, targets, batches, rec, report, evaluate, sc=sc)
    elif isinstance(step, LotteryTicket):
        run_lottery(work, original, step, targets, batches, rec, report, evaluate, sc=sc)
    elif step.kind == "structured_prune":
        run_structured(work, step, batches, rec, report)
    else:
        run_unstructured(work, step, targets, batches, rec, report, sc)


def _data_free(model, step, targets: list[Target], rec: StepRecord, report) -> None:
    for n, t in enumerate(targets, 1):
        t0 = time.perf_counter()
        w = t.weight_view().detach()
        if isinstance(step, RTN):
            qt = rtn(w, step.spec(), observer=step.observer).qtensor
            fmt = _fmt(step.spec())
        else:
            qt = kmeans(w, k=step.clusters).qtensor
            fmt = f"kmeans{step.clusters}"
        err = float(((dequantize(qt).float() - w.float()) ** 2).mean())
        _install(model, t, qt, rec, fmt, err, None, time.perf_counter() - t0, "weight MSE (no calibration)")
        if report:
            report(n, len(targets))


def _gptq(model, step: GPTQ, targets, batches, rec: StepRecord, report, sc=None) -> None:
    spec = step.spec()
    runner = run_one_pass(model, step, targets, batches, rec, report, sc)   # recipe/gptq_inline.py
    if runner is not None:
        return _rtn_outside_blocks(model, runner, spec, rec)
    runner = SequentialRunner(model, targets=targets)
    coll = HessianCollector(targets)

    done = [0]
    start, after = block_hooks(sc, runner, done)

    def process_block(i: int, block: nn.Module, block_targets: list[Target]) -> None:
        single = [t for t in block_targets if len(coll.observers[t.name]) == 1]
        first = {t.name: coll.observers[t.name][0] for t in single}
        for group in _share_input(single, first):
            t0 = time.perf_counter()
            h = first[group[0].name].hessian()
            pats = {t.name: _sparse_pattern(t) for t in group}   # pruned earlier: masked GPTQ keeps the zeros
            dev = group[0].weight_view().device
            mask = torch.cat([pats[t.name][0].to(dev) if pats[t.name] is not None else torch.ones(
                t.out_features, t.in_features, dtype=torch.bool, device=dev) for t in group]) \
                if any(p is not None for p in pats.values()) else None
            res, solved = gptq_shared(group, h, spec, step, mask)
            per = (time.perf_counter() - t0) / len(group)
            for t, qt, err, err_rtn in solved:
                note = "shares its input: solved with " + ", ".join(x.name for x in group if x is not t) \
                    if len(group) > 1 else ""
                if res.retries:
                    note += f" Cholesky retried {res.retries}x, damp {res.damp_used:g}"
                if t.kind == "conv2d":
                    note += f"; Hessian over {first[t.name].samples} im2col patches"
                if pats[t.name] is not None:
                    note += "; pruned weights held at zero (masked GPTQ)"
                _install(model, t, qt, rec, _fmt(spec), err, err_rtn, per, note.strip("; "))
            for t in group:
                coll.pop(t.name)
            done[0] += len(group)
            if report:
                report(done[0], len(targets))
        for t in block_targets:
            if t.name not in first:  # a grouped conv: each filter group solved on its own Hessian
                t0 = time.perf_counter()
                hs = coll.hessians(t.name)
                w = t.weight_view().detach().float()
                qt, parts = gptq_row_groups(w, hs, spec, block_size=step.block_size, damp=step.damp,
                                            act_order=step.act_order, static_groups=step.static_groups,
                                            observer=step.observer)
                err = hessian_error(w, dequantize(qt).float(), hs)
                err_rtn = hessian_error(w, dequantize(quantize(w, spec)).float(), hs)
                note = (f"groups={len(hs)}: one Hessian per filter group (over "
                        f"{coll.observers[t.name][0].samples} im2col patches), each group's rows solved on its own")
                if any(p.retries for p in parts):
                    note += f"; Cholesky retried, damp up to {max(p.damp_used for p in parts):g}"
                _install(model, t, qt, rec, _fmt(spec), err, err_rtn, time.perf_counter() - t0, note)
                coll.pop(t.name)
                done[0] += 1
                if report:
                    report(done[0], len(targets))

    runner.run(batches, process_block, on_input=coll, start=start, after_block=after)
    _rtn_outside_blocks(model, runner, spec, rec)


def _awq(model, step: AWQ, targets, batches, rec: StepRecord, report, sc=None) -> None:
    """Per block: search every group's scales on the float block, fold them into the
    norm or Linear before it where the block's output proves that exact, then quantize."""
    spec = step.spec()
    runner = SequentialRunner(model, targets=targets)
    inputs: dict[str, list[torch.Tensor]] = {}

    def on_input(name: str, x: torch.Tensor) -> None:
        kept = inputs.setdefault(name, [])
        if sum(k.shape[0] for k in kept) < MAX_AWQ_TOKENS:
            kept.append(x.detach().reshape(-1, x.shape[-1]).float())

    done = [0]
    start, after = block_hooks(sc, runner, done)

    def process_block(i: int, block: nn.Module, block_targets: list[Target]) -> None:
        groups = _share_input(block_targets, None, inputs)
        found = []
        for group in groups:
            t0 = time.perf_counter()
            x = torch.cat(inputs[group[0].name])
            res = awq([t.weight_view().detach().float() for t in group], x, spec, grid=step.grid)
            found.append((group, x, res, time.perf_counter() - t0))
        sources = _fold_all(model, runner, i, [(g, r.scales) for g, _, r, _ in found])
        for (group, x, res, secs), source in zip(found, sources):
            t0 = time.perf_counter()
            ws = [t.weight_view().detach().float() for t in group]
            qts = res.qtensors
            if any(t.name in sources.changed for t in group):  # a later fold rescaled these rows
                qts = awq(ws, x, spec, scales=res.scales).qtensors
            per = (secs + time.perf_counter() - t0) / len(group)
            for t, w, qt in zip(group, ws, qts):
                eff = dequantize(qt).float() / res.scales
                err = float(((x @ eff.T - x @ w.T) ** 2).mean())
                err_rtn = float(((x @ dequantize(quantize(w, spec)).float().T - x @ w.T) ** 2).mean())
                where = (f"scales folded into {source.name}" if source is not None else
                         "scales kept in the layer (no norm or Linear before it can absorb them exactly)")
                _install(model, t, qt, rec, _fmt(spec), err, err_rtn, per, f"alpha={res.alpha:.2f}; {where}",
                         input_scale=None if source is not None else 1.0 / res.scales)
            for t in group:
                inputs.pop(t.name, None)
            done[0] += len(group)
            if report:
                report(done[0], len(targets))

    runner.run(batches, process_block, on_input=on_input, start=start, after_block=after)
    _rtn_outside_blocks(model, runner, spec, rec)


class _Folds(list):
    """One FoldSource or None per group, and the target names whose rows a fold rescaled."""

    changed: set


def _fold_all(model, runner: SequentialRunner, i: int, groups_scales) -> _Folds:
    """Find (on a copy of the block) and apply each group's fold; before any quantization,
    so that a Linear source (v_proj, up_proj) is still float when its rows take the scale."""
    block = model.get_submodule(runner.block_names[i])
    folds = _Folds()
    folds.changed = set()
    for group, s in groups_scales:
        source = find_fold_source(block, runner.block_names[i], group, runner.sample_forward)
        if source is not None:
            fold_into(model, source, s)
            folds.changed.add(source.name)
        folds.append(source)
    return folds


def _smoothquant(model, step: SmoothQuant, targets, batches, rec: StepRecord, report, sc=None) -> None:
    runner = SequentialRunner(model, targets=targets)
    absmax: dict[str, torch.Tensor] = {}
    samples: dict[str, torch.Tensor] = {}

    def on_input(name: str, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        m = flat.abs().amax(dim=0)
        absmax[name] = m if name not in absmax else torch.maximum(absmax[name], m)
        if name not in samples:
            samples[name] = flat[:MAX_AWQ_TOKENS]

    done = [0]
    start, after = block_hooks(sc, runner, done)

    def process_block(i: int, block: nn.Module, block_targets: list[Target]) -> None:
        groups = _share_input(block_targets, None, {t.name: [absmax[t.name]] for t in block_targets})
        scales = []
        for group in groups:
            t0 = time.perf_counter()
            s = smoothquant_scales(absmax[group[0].name], [t.weight_view().detach().float() for t in group],
                                   alpha=step.alpha)
            scales.append((s, time.perf_counter() - t0))
        sources = _fold_all(model, runner, i, [(g, s) for g, (s, _) in zip(groups, scales)])
        for group, (s, secs), source in zip(groups, scales, sources):
            x = samples[group[0].name]
            for t in group:
                t1 = time.perf_counter()
                w = t.weight_view().detach().float()
                bias = getattr(t.module, "bias", None)
                lin = _as_linear(w, bias)
                if source is not None:  # the input already arrives divided by s
                    smoothed = W8A8Linear.from_linear(_as_linear(w * s, bias))
                    where = f"scales folded into {source.name}"
                else:
                    smoothed = W8A8Linear.from_linear(lin, smooth_scale=s)
                    where = "scales kept in the layer (no norm or Linear before it can absorb them exactly)"
                plain = W8A8Linear.from_linear(lin).to(w.device)
                smoothed = smoothed.to(w.device)
                with torch.no_grad():
                    ref = lin(x)
                    got = smoothed(x / s) if source is not None else smoothed(x)
                    err = float(((got - ref) ** 2).mean())
                    err_plain = float(((plain(x) - ref) ** 2).mean())
                replace_module(model, t.name, smoothed)
                rec.layers.append(LayerRecord(
                    name=t.name, shape=(t.out_features, t.in_features), format="w8a8", bytes_fp32=4 * w.numel(),
                    bytes_stored=smoothed.nbytes, error=err, error_rtn=err_plain,
                    sqnr_db=_sqnr(w * s, smoothed.dequantized_weight().float()),
                    seconds=secs / len(group) + time.perf_counter() - t1, kernel=smoothed.kernel,
                    note=f"alpha={step.alpha}; error_rtn is W8A8 without smoothing; {where}"))
            done[0] += len(group)
            if report:
                report(done[0], len(targets))

    runner.run(batches, process_block, on_input=on_input, start=start, after_block=after)
    for t in runner.unassigned:
        rec.skipped.append({"name": t.name, "reason": "outside the transformer blocks: no activations captured"})


def _mixed(model, step: MixedPrecision, targets, batches, rec: StepRecord, report) -> None:
    """One pass of the float model collects each layer's Hessian; sensitivities at every
    candidate width feed the allocation; then each layer is quantized at its width."""
    runner = SequentialRunner(model, targets=targets)
    coll = HessianCollector(targets)

    runner.run(batches, on_input=coll)
    chosen = [t for t in targets if t.name in coll]
    for t in targets:
        if t.name not in coll:
            rec.skipped.append({"name": t.name, "reason": "outside the transformer blocks: no activations captured"})
    sens = []
    for n, t in enumerate(chosen, 1):
        sens.append(_sensitivity(t, coll.hessians(t.name), step))
        if report:
            report(n, 2 * len(chosen))
    alloc = allocate_bits(sens, bits_per_weight=step.bits_per_weight, max_bytes=step.max_bytes)
    if not alloc.feasible:
        raise ValueError(f"mixed_precision: the budget cannot be met: {alloc.note}")
    rec.details["sensitivity"] = [{"layer": s.name, "errors": {str(b): e for b, e in s.errors.items()},
                                   "bits": alloc.bits[s.name]} for s in sens]
    for n, t in enumerate(chosen, 1):
        t0 = time.perf_counter()
        bits = alloc.bits[t.name]
        spec = step.spec(bits)
        w = t.weight_view().detach().float()
        hs = coll.hessians(t.name)
        if step.method == "gptq":
            qt = gptq_row_groups(w, hs, spec)[0]
        else:
            qt = rtn(w, spec).qtensor
        err = hessian_error(w, dequantize(qt).float(), hs)
        err_rtn = hessian_error(w, dequantize(quantize(w, spec)).float(), hs)
        _install(model, t, qt, rec, _fmt(spec), err, err_rtn, time.perf_counter() - t0,
                 f"{bits} bits chosen for a {alloc.bits_per_weight:.3f} bpw allocation "
                 f"({'proven optimal' if alloc.optimal else 'near-optimal'})")
        if report:
            report(len(chosen) + n, 2 * len(chosen))


# ---------------------------------------------------------------- helpers

def _unsupported(step, t: Target) -> str | None:
    """Why `step` leaves target t alone, or None when it compresses it."""
    if t.kind != "conv2d":
        return None
    conv = t.module
    if conv.padding_mode != "zeros":
        return (f"Conv2d with padding_mode={conv.padding_mode!r}: QuantConv2d runs zero padding only; "
                "the layer stays float")
    if isinstance(step, (AWQ, SmoothQuant)):
        name = "awq" if isinstance(step, AWQ) else "smoothquant"
        return (f"Conv2d: {name} folds per-input-channel scales into a linear layer's inputs, which a conv "
                "does not take; use rtn, gptq, kmeans or mixed_precision for conv layers")
    return None


def _sensitivity(t: Target, hs: list[torch.Tensor], step: MixedPrecision) -> Sensitivity:
    """The layer's error and bytes at each candidate width; a grouped conv's errors summed over its groups."""
    w = t.weight_view().detach().float()
    if len(hs) == 1:
        return layer_sensitivity(w, hs[0], name=t.name, candidates=step.candidates, spec_for_bits=step.spec,
                                 method="rtn")
    parts = [layer_sensitivity(w[rows], h, name=t.name, candidates=step.candidates, spec_for_bits=step.spec,
                               method="rtn") for rows, h in zip(row_parts(t.out_features, len(hs)), hs)]
    errors = {b: sum(p.errors[b] for p in parts) for b in parts[0].errors}
    nbytes = {b: quantize(w, step.spec(b)).nbytes for b in errors}  # the whole layer's bytes, packed once
    return Sensitivity(name=t.name, errors=errors, nbytes=nbytes, params=int(w.numel()))


def _rtn_outside_blocks(model, runner, spec: QuantSpec, rec: StepRecord) -> None:
    """Targets outside the repeated blocks (e.g. a pooler) see no block inputs: RTN, said so."""
    for t in runner.unassigned:
        w = t.weight_view().detach()
        qt = rtn(w, spec).qtensor
        err = float(((dequantize(qt).float() - w.float()) ** 2).mean())
        _install(model, t, qt, rec, _fmt(spec), err, None, 0.0, "outside the transformer blocks: RTN")


def _share_input(targets: list[Target], observers=None, inputs=None) -> list[list[Target]]:
    """Group targets that saw the same inputs (q/k/v, gate/up): equal Hessians or inputs."""
    groups: list[list[Target]] = []
    for t in targets:
        key = observers[t.name].hessian() if observers is not None else inputs[t.name][0]
        for g in groups:
            other = observers[g[0].name].hessian() if observers is not None else inputs[g[0].name][0]
            if other.shape == key.shape and torch.equal(other, key):
                g.append(t)
                break
        else:
            groups.append([t])
    return groups


def _check_weights(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if p.is_floating_point() and not torch.isfinite(p).all():
            check_finite(p.detach(), f"weight {name}")


def _worth_listing(s) -> bool:
    return "not asked for" not in s.reason and "root" not in s.reason
