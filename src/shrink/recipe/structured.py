"""Run the structured pruning step: remove MLP neurons, conv channels, attention heads or
whole transformer layers, so the tensors shrink and the model runs faster as a dense model.

Scores: l1 / l2 norms of a unit's weights (its producer rows and consumer columns), or
"activation": the norm of the unit's output over the calibration data times the norm of
its consumer column (how much it adds to the next layer). Layers are scored by how much
they change the hidden state, 1 - cos(input, output) averaged over calibration tokens
(the least-changing layers go first). Each group's record gives the widths before and
after, the parameters removed, and the relative output error of the removal on calibration.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from shrink.algos.structured import group_scores, keep_indices, neuron_scores
from shrink.surgery import find_blocks
from shrink.surgery.capture import run_with_hooks
from shrink.surgery.heads import find_attention, remove_heads, update_config
from shrink.surgery.select import _compile, _matches, kind_of
from shrink.surgery.shrink_dims import find_neuron_groups, remove_layers, remove_units

from .prune_steps import Prune
from .records import StepRecord

MAX_SCORE_BATCHES = 8


def run_structured(model: nn.Module, step: Prune, batches, rec: StepRecord, report) -> None:
    inc = _compile(step.include, "include")
    exc = _compile(step.exclude, "exclude")

    def wanted(name: str) -> bool:
        return (inc is None or _matches(name, inc)) and not (exc is not None and _matches(name, exc))

    before = _params(model)
    if step.method in ("neurons", "channels"):
        kind = "neurons" if step.method == "neurons" else "channels"
        groups = [g for g in find_neuron_groups(model) if g.kind == kind and wanted(g.name)]
        if not groups:
            raise ValueError(f"prune: method {step.method} found no {kind} to remove in this model "
                             f"(recognised: transformer MLPs for neurons, Conv2d chains for channels)")
        acts = _unit_activations(model, [g.consumers[0] for g in groups], batches) if step.score == "activation" \
            else {}
        for n, g in enumerate(groups, 1):
            t0 = time.perf_counter()
            mods = dict(model.named_modules())
            prods = [_rows(mods[p]) for p in g.producers]
            cons = _cols(mods[g.consumers[0]], g.width) if g.consumers else None
            act = _per_unit(acts.get(g.consumers[0]), g.width) if acts else None
            scores = neuron_scores(prods, cons, score=step.score, act_norm=act)
            keep = keep_indices(scores, step.sparsity, name=g.name)
            remove_units(model, g, keep)
            rec.details.setdefault("removed", []).append(
                {"group": g.name, "kind": kind, "width": g.width, "kept": int(keep.numel()),
                 "seconds": time.perf_counter() - t0})
            if report:
                report(n, len(groups))
    elif step.method == "heads":
        groups = [g for g in find_attention(model) if wanted(g.name)]
        if not groups:
            raise ValueError("prune: method heads found no attention to prune (recognised: BERT, GPT-2 and "
                             "Llama attention)")
        acts = _unit_activations(model, [g.o for g in groups], batches) if step.score == "activation" else {}
        for n, g in enumerate(groups, 1):
            units = g.num_kv_heads if g.num_kv_heads < g.num_heads else g.num_heads
            mods = dict(model.named_modules())
            width = g.num_heads * g.head_dim
            cons = _cols(mods[g.o], width)
            act = _per_unit(acts.get(g.o), width) if acts else None
            per_col = neuron_scores([], cons, score=step.score, act_norm=act)
            scores = group_scores(per_col, width // units)
            keep = keep_indices(scores, step.sparsity, name=g.name)
            remove_heads(model, g, keep)
            rec.details.setdefault("removed", []).append(
                {"group": g.name, "kind": "kv groups" if units < g.num_heads else "heads", "units": units,
                 "kept": int(keep.numel()), "head_dim": g.head_dim})
            if report:
                report(n, len(groups))
    else:
        scores = layer_scores(model, batches)
        keep = keep_indices(torch.tensor(scores), step.sparsity, name="the layer stack")
        drop = sorted(set(range(len(scores))) - set(keep.tolist()))
        remove_layers(model, drop)
        rec.details["removed"] = [{"layer": i, "score": scores[i]} for i in drop]
        rec.details["layer_scores"] = scores
        if report:
            report(1, 1)
    rec.details["config"] = update_config(model)
    rec.details["params_before"], rec.details["params_after"] = before, _params(model)


def layer_scores(model: nn.Module, batches) -> list[float]:
    """1 - mean cosine(block input, block output) per transformer block, on calibration tokens."""
    if not batches:
        raise ValueError("prune: method layers scores each layer on calibration data: give some")
    _, blocks = find_blocks(model)
    sums = [0.0] * len(blocks)
    counts = [0] * len(blocks)

    def hook(i):
        def fn(mod, args, kwargs, out):
            x = args[0] if args else kwargs.get("hidden_states")
            y = out[0] if isinstance(out, (tuple, list)) else out
            cos = torch.nn.functional.cosine_similarity(x.float().reshape(-1, x.shape[-1]),
                                                        y.float().reshape(-1, y.shape[-1]), dim=-1)
            sums[i] += float((1 - cos).sum())
            counts[i] += cos.numel()
        return fn

    run_with_hooks(model, batches, [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)],
                   MAX_SCORE_BATCHES)
    return [s / max(1, c) for s, c in zip(sums, counts)]


def _unit_activations(model: nn.Module, names: list[str], batches) -> dict[str, torch.Tensor]:
    """The L2 norm over calibration data of each input feature (channel for a conv) of the named modules."""
    if not batches:
        raise ValueError("prune: score activation measures activations: give calibration data")
    mods = dict(model.named_modules())
    sq: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(mod, args):
            x = args[0].detach().float()
            v = (x ** 2).sum(dim=(0, 2, 3)) if x.dim() == 4 else (x ** 2).reshape(-1, x.shape[-1]).sum(0)
            sq[name] = v if name not in sq else sq[name] + v
        return fn

    run_with_hooks(model, batches, [mods[n].register_forward_pre_hook(hook(n)) for n in set(names)], MAX_SCORE_BATCHES)
    return {n: v.sqrt() for n, v in sq.items()}


def _per_unit(norms: torch.Tensor | None, width: int) -> torch.Tensor | None:
    """Input-feature norms folded to `width` units (a flattened conv output: blocks of spatial columns)."""
    if norms is None or norms.numel() == width:
        return norms
    return norms.reshape(width, -1).pow(2).sum(1).sqrt()


def _rows(mod: nn.Module) -> torch.Tensor:
    """A producer's weight as [units, ...] rows."""
    k = kind_of(mod)
    w = mod.weight.detach().float()
    if k == "conv1d":
        return w.t()
    return w.reshape(w.shape[0], -1)


def _cols(mod: nn.Module, width: int) -> torch.Tensor:
    """A consumer's weight as [out, width] columns per unit (a conv's kernel taps and a
    Linear's per-channel spatial blocks summed in quadrature)."""
    k = kind_of(mod)
    w = mod.weight.detach().float()
    if k == "conv1d":
        w = w.t()
    if k == "conv2d":
        w = w.transpose(0, 1).reshape(w.shape[1], -1).t()   # [out*kh*kw, in]
    if w.shape[1] != width:
        w = w.reshape(w.shape[0], width, -1).pow(2).sum(-1).sqrt()
    return w


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
