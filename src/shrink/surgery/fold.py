"""Fold a per-channel input scale into the module that produces a layer's input.

AWQ and SmoothQuant rewrite y = W x as y = (W diag(s)) (x / s). The division
is free at run time when it can be moved into whatever computes x: a
LayerNorm / RMSNorm (scale its weight and bias) or a Linear whose outputs
reach the layer only through linear steps (scale its rows and bias) — v_proj
before o_proj through the attention average, up_proj before down_proj through
SiLU(gate) * up.

Which module that is depends on the architecture, and a wrong guess silently
changes the model (e.g. BERT's LayerNorm output is also the residual stream).
So nothing is guessed by name: every norm or Linear in the block whose output
width matches is tried on a copy of the block with a probe scale of powers of
two (exact in floating point), and accepted only if the block's output on a
real calibration batch is unchanged. A correct fold leaves it unchanged to
rounding; a wrong one moves it by a large factor.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from shrink.surgery.select import Target, kind_of

BlockForward = Callable[[nn.Module], torch.Tensor]
TOLERANCE = 1e-5  # relative to the output's largest magnitude


@dataclass(frozen=True)
class FoldSource:
    """The module whose output channels absorb the scale: kind "norm" or "linear"."""

    name: str
    kind: str


def _norm_like(m: nn.Module, width: int) -> bool:
    w = getattr(m, "weight", None)
    if not isinstance(w, nn.Parameter) or w.dim() != 1 or w.numel() != width:
        return False
    if any(True for _ in m.children()):
        return False
    return isinstance(m, (nn.LayerNorm, nn.GroupNorm)) or "norm" in type(m).__name__.lower()


def candidates(block: nn.Module, width: int, exclude: Sequence[str] = ()) -> list[tuple[str, str]]:
    """(name relative to the block, kind) of every module that could produce a `width`-wide input."""
    out = []
    for name, m in block.named_modules():
        if not name or name in exclude:
            continue
        if _norm_like(m, width):
            out.append((name, "norm"))
        elif kind_of(m) in ("linear", "conv1d") and _out_features(m) == width:
            out.append((name, "linear"))
    out.sort(key=lambda c: c[1] != "norm")  # norms first: the usual source, and the cheapest check
    return out


def _out_features(m: nn.Module) -> int:
    w = m.weight
    return w.shape[1] if kind_of(m) == "conv1d" else w.shape[0]


@torch.no_grad()
def scale_outputs(module: nn.Module, kind: str, s: torch.Tensor) -> None:
    """Divide the module's output channels by s, in place."""
    s = s.to(module.weight.device)
    if kind == "norm":
        module.weight.div_(s.to(module.weight.dtype))
    elif kind_of(module) == "conv1d":  # transformers' Conv1D keeps [in, out]
        module.weight.div_(s.to(module.weight.dtype)[None, :])
    else:
        module.weight.div_(s.to(module.weight.dtype)[:, None])
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.div_(s.to(bias.dtype))


@torch.no_grad()
def _scale_inputs(target: nn.Module, s: torch.Tensor) -> None:
    w = target.weight
    s = s.to(w.device)
    if kind_of(target) == "conv1d":
        w.mul_(s.to(w.dtype)[:, None])
    else:
        w.mul_(s.to(w.dtype)[None, :])


def probe_scale(width: int, seed: int = 0) -> torch.Tensor:
    """Powers of two in {1/4, 1/2, 2, 4}: never 1, so a wrong fold always shows."""
    g = torch.Generator().manual_seed(seed)
    e = torch.randint(0, 4, (width,), generator=g)
    return torch.tensor([0.25, 0.5, 2.0, 4.0])[e]


def find_fold_source(block: nn.Module, block_name: str, group: Sequence[Target],
                     forward: BlockForward) -> FoldSource | None:
    """The module of `block` that can absorb a scale on the shared input of `group`, or None.

    forward(block) runs a block (the real one or a copy) on a calibration batch and
    returns its hidden states. The block is not modified.
    """
    prefix = block_name + "." if block_name else ""
    rel = [t.name[len(prefix):] for t in group]
    if any(not t.name.startswith(prefix) for t in group) or any(t.kind not in ("linear", "conv1d") for t in group):
        return None
    width = group[0].in_features
    if any(t.in_features != width for t in group):
        raise ValueError("find_fold_source: the group's layers take inputs of different widths "
                         f"({', '.join(f'{t.name}: {t.in_features}' for t in group)}); they cannot share a scale")
    with torch.no_grad():
        ref = forward(block).float()
    limit = TOLERANCE * max(float(ref.abs().max()), 1e-30)
    s = probe_scale(width)
    for name, kind in candidates(block, width, exclude=rel):
        trial = copy.deepcopy(block)
        scale_outputs(trial.get_submodule(name), kind, s)
        for r in rel:
            _scale_inputs(trial.get_submodule(r), s)
        with torch.no_grad():
            out = forward(trial).float()
        if out.shape == ref.shape and float((out - ref).abs().max()) <= limit:
            return FoldSource(prefix + name, kind)
    return None


def fold_into(model: nn.Module, source: FoldSource, s: torch.Tensor) -> None:
    """Divide `source`'s outputs by s in place; the consumers' weights must take the factor s."""
    scale_outputs(model.get_submodule(source.name), source.kind, s)
