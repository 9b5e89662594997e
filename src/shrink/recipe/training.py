"""Run the recipe steps that train: finetune, iterative_prune (gradual pruning with
fine-tuning between rounds) and lottery_ticket (iterative magnitude pruning with rewinding).

The teacher for distillation is always the uncompressed model given to compress; the
pruned pattern is held fixed while training (masks on gradients and weights, or the
fixed pattern of a SparseLinear).
"""
from __future__ import annotations

import copy
import time

import torch
from torch import nn

from shrink.algos.magnitude import global_magnitude_masks, magnitude_mask
from shrink.algos.wanda import wanda_mask
from shrink.surgery import Target
from shrink.surgery.capture import run_with_hooks
from shrink.train.loop import finetune

from .context import StepContext
from .prune import install_sparse, param_mask
from .prune_steps import Finetune, IterativePrune, LotteryTicket
from .records import StepRecord


def run_finetune(model: nn.Module, step: Finetune, ctx: StepContext, rec: StepRecord) -> nn.Module:
    masks = {m.weight: m.shrink_prune_mask for m in model.modules()
             if getattr(m, "shrink_prune_mask", None) is not None and isinstance(getattr(m, "weight", None),
                                                                                 nn.Parameter)}
    tr = finetune(model, ctx.batches(step.batch_size, "finetune"), steps=step.steps, epochs=step.epochs, lr=step.lr,
                  loss=step.loss, teacher=ctx.original, masks=masks, temperature=step.temperature,
                  seed=ctx.seed, precision=step.precision, progress=ctx.progress(), **ctx.engine_options())
    rec.details["training"] = tr.to_dict()
    rec.details["masked_layers"] = len(masks)
    model.eval()
    return model


def _dense_targets(targets: list[Target], rec: StepRecord, step: str = "iterative_prune") -> list[Target]:
    out = []
    for t in targets:
        if t.kind in ("linear", "conv1d") or (t.kind == "conv2d" and t.module.groups == 1):
            out.append(t)
        else:
            rec.skipped.append({"name": t.name, "reason": f"{t.kind}: iterative pruning trains dense Linear, "
                                                          "Conv1D and ungrouped Conv2d layers"})
    if not out:
        raise ValueError(f"{step}: no dense Linear, Conv1D or Conv2d layer left to prune (an earlier step stored "
                         "them sparse or quantized, or include/exclude matched none); put this step first")
    return out


def _masks(model, targets: list[Target], sparsity: float, method: str, scope: str, batches) -> dict[str, torch.Tensor]:
    weights = {t.name: t.weight_view().detach().float() for t in targets}
    if method == "magnitude":
        if scope == "global":
            return global_magnitude_masks(weights, sparsity)
        return {n: magnitude_mask(w, sparsity, name=n) for n, w in weights.items()}
    norms = _input_norms(model, targets, batches)
    return {t.name: wanda_mask(weights[t.name], norms[t.name], sparsity, name=t.name) for t in targets}


def _input_norms(model, targets: list[Target], batches) -> dict[str, torch.Tensor]:
    """||X_j|| of every target's input features over a few calibration batches (the current model)."""
    from shrink.surgery import conv_patches

    sq: dict[str, torch.Tensor] = {}

    def hook(t: Target):
        def fn(mod, args):
            x = args[0].detach().float()
            x = conv_patches(x, mod) if t.kind == "conv2d" else x.reshape(-1, x.shape[-1])
            v = (x.reshape(-1, x.shape[-1]) ** 2).sum(0)
            sq[t.name] = v if t.name not in sq else sq[t.name] + v
        return fn

    run_with_hooks(model, batches, [t.module.register_forward_pre_hook(hook(t)) for t in targets], 8)
    return {n: v.sqrt() for n, v in sq.items()}


def _apply(targets: list[Target], masks: dict[str, torch.Tensor]) -> dict[nn.Parameter, torch.Tensor]:
    out = {}
    for t in targets:
        m = masks[t.name]
        with torch.no_grad():
            t.module.weight.mul_(param_mask(t, m).to(t.module.weight.dtype))
        out[t.module.weight] = param_mask(t, m)
    return out


def _sparsity(masks: dict[str, torch.Tensor]) -> float:
    total = sum(m.numel() for m in masks.values())
    return 1.0 - sum(int(m.sum()) for m in masks.values()) / max(1, total)


def _install_all(model, step, targets: list[Target], masks, originals: dict[str, torch.Tensor], rec: StepRecord,
                 note: str) -> None:
    for t in targets:
        w = t.weight_view().detach().float()
        w0 = originals[t.name]
        mse = float(((w - w0) ** 2).mean())
        install_sparse(model, t, w, masks[t.name], step, rec, mse, None, 0.0, note + "; error = weight MSE to the "
                       "weights before the step (training moved the survivors too)")


def _saved(tensors: dict, prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


def _to_save(**groups: dict) -> dict[str, torch.Tensor]:
    return {f"{g}/{k}": v for g, d in groups.items() for k, v in d.items()}


def run_iterative(model: nn.Module, original: nn.Module, step: IterativePrune, targets: list[Target], batches,
                  rec: StepRecord, report, evaluate=None, sc=None) -> None:
    """sc: the run's StepCheckpoint (recipe/resume.py): a checkpoint after each round; a resumed
    step starts after the last round saved (the model then holds that round's weights)."""
    targets = _dense_targets(targets, rec)
    schedule = step.schedule()
    ft = step.finetune
    got = sc.resumed if sc is not None else None
    if got is None:
        originals = {t.name: t.weight_view().detach().float().clone() for t in targets}
        rounds, masks, first = [], {}, 1
    else:
        originals, masks = _saved(got.tensors, "orig/"), _saved(got.tensors, "mask/")
        rounds, first = list(got.pos["rounds"]), int(got.pos["round"]) + 1
    for r, s in enumerate(schedule, 1):
        if r < first:
            continue
        t0 = time.perf_counter()
        masks = _masks(model, targets, s, step.method, step.scope, batches)
        pmasks = _apply(targets, masks)
        tr = finetune(model, batches, steps=ft.steps, epochs=ft.epochs, lr=ft.lr, loss=ft.loss, teacher=original,
                      masks=pmasks, temperature=ft.temperature, seed=r, precision=ft.precision)
        model.eval()
        entry = {"round": r, "sparsity": _sparsity(masks), "scheduled": s, "training": tr.to_dict(),
                 "seconds": time.perf_counter() - t0}
        if evaluate is not None:
            entry["quality"] = evaluate(model)
        rounds.append(entry)
        if report:
            report(r, len(schedule))
        if sc is not None:
            sc.save({"round": r, "rounds": rounds}, tensors=_to_save(orig=originals, mask=masks))
    rec.details["rounds"] = rounds
    rec.details["schedule"] = schedule
    _install_all(model, step, targets, masks, originals, rec, f"{step.method}, {len(schedule)} rounds with " +
                 (f"{ft.steps} fine-tuning steps each" if ft.steps else f"{ft.epochs:g} fine-tuning epochs each"))


def reinitialize(model: nn.Module, seed: int) -> None:
    """A fresh seeded initialization: every module's reset_parameters() (PyTorch's defaults);
    1-D weights of modules without one (RMSNorm) to 1, their biases to 0."""
    torch.manual_seed(seed)
    for m in model.modules():
        if hasattr(m, "reset_parameters") and callable(m.reset_parameters):
            m.reset_parameters()
        elif isinstance(getattr(m, "weight", None), nn.Parameter) and m.weight.dim() == 1:
            with torch.no_grad():
                m.weight.fill_(1.0)
                if isinstance(getattr(m, "bias", None), nn.Parameter):
                    m.bias.zero_()


def run_lottery(model: nn.Module, original: nn.Module, step: LotteryTicket, targets: list[Target], batches,
                rec: StepRecord, report, evaluate=None, seed: int = 0, sc=None) -> None:
    """sc: the run's StepCheckpoint: a checkpoint after each round (round 0: the dense training),
    with the weights the rounds rewind to."""
    targets = _dense_targets(targets, rec, "lottery_ticket")
    schedule = step.schedule()
    total = (len(schedule) + 1) * step.steps + (step.steps if step.control else 0)
    done = [0]

    def train(pmasks, steps, callback=None, s=0):
        tr = finetune(model, batches, steps=steps, lr=step.lr, loss=step.loss, teacher=original, masks=pmasks,
                      seed=s, callback=callback)
        model.eval()
        done[0] += steps
        if report:
            report(min(done[0], total), total)
        return tr

    def save(r: int) -> None:
        if sc is not None:
            sc.save({"round": r, "rounds": rounds, "done": done[0]},
                    tensors=_to_save(orig=originals, mask=masks, rewind=rewind_state.get("state", {})))

    got = sc.resumed if sc is not None else None
    k = 0 if step.rewind == "init" else step.rewind
    if got is not None:   # rounds done before an interruption: the model holds the last one's weights
        originals, masks = _saved(got.tensors, "orig/"), _saved(got.tensors, "mask/")
        rewind_state = {"state": _saved(got.tensors, "rewind/")}
        rounds, first, done[0] = list(got.pos["rounds"]), int(got.pos["round"]) + 1, int(got.pos["done"])
    else:
        originals = {t.name: t.weight_view().detach().float().clone() for t in targets}
        reinitialize(model, seed)
        rewind_state = {"state": copy.deepcopy(model.state_dict())} if step.rewind == "init" else {}

        def snapshot(i: int, m: nn.Module) -> None:
            if step.rewind != "init" and i == step.rewind:
                rewind_state["state"] = copy.deepcopy(m.state_dict())

        if step.rewind == 0:
            rewind_state["state"] = copy.deepcopy(model.state_dict())
        tr = train({}, step.steps, snapshot)
        rounds = [{"round": 0, "sparsity": 0.0, "training": tr.to_dict(),
                   **({"quality": evaluate(model)} if evaluate else {})}]
        masks, first = {}, 1
        save(0)
    for r, s in enumerate(schedule, 1):
        if r < first:
            continue
        masks = _masks(model, targets, s, "magnitude", step.scope, batches)
        model.load_state_dict(rewind_state["state"])
        pmasks = _apply(targets, masks)
        tr = train(pmasks, step.steps - k, s=r)
        rounds.append({"round": r, "sparsity": _sparsity(masks), "training": tr.to_dict(),
                       **({"quality": evaluate(model)} if evaluate else {})})
        save(r)
    rec.details["rounds"] = rounds
    rec.details["rewind"] = step.rewind
    rec.details["training_steps"] = step.steps + len(schedule) * (step.steps - k)
    if step.control:
        rec.details["control"] = _control(model, original, step, targets, masks, batches, evaluate, seed)
    _install_all(model, step, targets, masks, originals, rec,
                 f"lottery ticket: {len(schedule)} rounds of {step.per_round:.0%}, rewound to "
                 f"{'initialization' if step.rewind == 'init' else f'iteration {step.rewind}'}")


def _control(model, original, step: LotteryTicket, targets, masks, batches, evaluate, seed: int) -> dict:
    """The same mask on a different random initialization, trained the same number of steps:
    the lottery-ticket claim is that the ticket beats it."""
    twin = copy.deepcopy(model)
    reinitialize(twin, seed + 1000)
    named = dict(twin.named_modules())
    pmasks = {}
    for t in targets:
        w = named[t.name].weight
        pm = param_mask(t, masks[t.name])
        with torch.no_grad():
            w.mul_(pm.to(w.dtype))
        pmasks[w] = pm
    k = 0 if step.rewind == "init" else step.rewind
    tr = finetune(twin, batches, steps=step.steps - k, lr=step.lr, loss=step.loss, teacher=original,
                  masks=pmasks, seed=len(step.schedule()))
    twin.eval()
    out = {"what": "same mask, random re-initialization (seed + 1000), same training", "training": tr.to_dict()}
    if evaluate is not None:
        out["quality"] = evaluate(twin)
    return out
