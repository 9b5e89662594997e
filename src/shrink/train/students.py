"""Students for knowledge distillation, built from the teacher (which is never modified).

- `{width: f}`: every MLP's hidden units (and a CNN's conv channels) narrowed to round(f x
  width) of them, keeping the teacher's units with the largest weight norms (the l2 norm
  of the unit's producer rows plus its consumer column, shrink.algos.structured) and their
  weights. The residual stream, embeddings and output layer keep their sizes, so the
  student's outputs have the teacher's shape.
- `{layers: [i, ...]}`: the teacher's layers i kept, in order (DistilBERT: every other
  layer), by shrink.surgery's layer removal and config update for a transformer. For an
  nn.Sequential a layer is a hidden block: a Linear or Conv2d with the BatchNorm,
  activation and dropout after it (the last Linear, the classifier, always stays); a
  dropped block becomes nn.Identity so the kept modules keep their names (and a
  compressed DIR can record the change), and a kept module whose input no longer matches
  the module before it is re-initialized at the right size (listed in `reinitialized`).
- a path: loaded with shrink.load; an nn.Module: used as it is.

A student's `layer_map[j]` is the teacher layer whose output its layer j learns from;
`kept[j]` (width students of a Sequential) the teacher units its layer j carries, so a
hidden-state loss compares like with like.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from shrink.algos.structured import keep_indices, neuron_scores
from shrink.surgery.heads import update_config
from shrink.surgery.select import kind_of
from shrink.surgery.shrink_dims import find_blocks, find_neuron_groups, in_size, out_size, remove_layers, remove_units

_ATTACHED = (nn.modules.batchnorm._BatchNorm, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh,
             nn.Sigmoid, nn.ELU, nn.SELU, nn.CELU, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish,
             nn.Softplus, nn.PReLU, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity)


@dataclass
class Student:
    model: nn.Module
    source: str                                   # "width 0.5", "layers [0, 2, 4]", "path ...", "given"
    layer_map: list[int] | None = None            # student layer j learns from teacher layer layer_map[j]
    kept: dict[int, torch.Tensor] = field(default_factory=dict)   # student layer j -> teacher units it carries
    reinitialized: list[str] = field(default_factory=list)
    config: dict | None = None                    # surgery.heads.update_config's verdict (transformers)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- layers of a model

def _weighted(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)


def sequential_blocks(seq: nn.Sequential) -> tuple[list[list[int]], int]:
    """([child indices of each hidden block], index of the output layer) of a Sequential
    classifier: a block is a Linear/Conv2d and the BatchNorm/activation/dropout after it."""
    children = list(seq.children())
    weighted = [i for i, c in enumerate(children) if _weighted(c)]
    if len(weighted) < 1:
        raise ValueError("distill: the Sequential has no Linear or Conv2d layer to distill")
    blocks = []
    for i in weighted[:-1]:
        block = [i]
        for j in range(i + 1, len(children)):
            if not isinstance(children[j], _ATTACHED) or _weighted(children[j]):
                break
            block.append(j)
        blocks.append(block)
    return blocks, weighted[-1]


def layer_taps(model: nn.Module) -> list[nn.Module]:
    """The modules whose outputs are the model's layer outputs: a transformer's blocks, or
    the last module of each hidden block of a Sequential."""
    if isinstance(model, nn.Sequential):
        blocks, _ = sequential_blocks(model)
        return [model[b[-1]] for b in blocks]
    try:
        return list(find_blocks(model)[1])
    except ValueError:
        return []


def default_layer_map(n_student: int, n_teacher: int) -> list[int]:
    """Student layer j <- teacher layer: the same index when the depths agree, else evenly
    spaced with the last student layer on the last teacher layer."""
    if n_student == n_teacher:
        return list(range(n_student))
    return [round((j + 1) * n_teacher / n_student) - 1 for j in range(n_student)]


# ---------------------------------------------------------------- width

def _rows(m: nn.Module) -> torch.Tensor:
    w = m.weight.detach().float()
    return w.t() if kind_of(m) == "conv1d" else w.reshape(w.shape[0], -1)


def _cols(m: nn.Module, width: int) -> torch.Tensor:
    """A consumer's weight as [out, width] (conv taps and per-channel blocks after a Flatten in quadrature)."""
    w = m.weight.detach().float()
    k = kind_of(m)
    if k == "conv1d":
        w = w.t()
    elif k == "conv2d":
        w = w.transpose(0, 1).reshape(w.shape[1], -1).t()
    if w.shape[1] != width:
        w = w.reshape(w.shape[0], width, -1).pow(2).sum(-1).sqrt()
    return w


def width_student(teacher: nn.Module, width: float) -> Student:
    """The teacher with every MLP/conv hidden group narrowed to round(width x units)."""
    if not 0 < width < 1:
        raise ValueError(f"distill: student width must be in (0, 1), got {width!r}")
    model = copy.deepcopy(teacher)
    groups = find_neuron_groups(model)
    if not groups:
        raise ValueError(f"distill: a {{width: {width:g}}} student narrows MLP hidden units or conv channels, and "
                         f"{type(teacher).__name__} has none shrink recognises (transformer MLPs, Sequential "
                         "Linear/Conv2d chains); give {layers: [...]} or a student model")
    mods = dict(model.named_modules())
    keeps = []
    for g in groups:   # scores on the teacher's weights, before any group is cut
        scores = neuron_scores([_rows(mods[p]) for p in g.producers], _cols(mods[g.consumers[0]], g.width),
                               score="l2", name=g.name)
        kept = max(1, round(width * g.width))
        keeps.append(keep_indices(scores, count=g.width - kept, name=g.name))
    for g, keep in zip(groups, keeps):
        remove_units(model, g, keep)
    kept_by_layer = {}
    if isinstance(model, nn.Sequential):
        blocks, _ = sequential_blocks(model)
        start = {str(b[0]): j for j, b in enumerate(blocks)}
        kept_by_layer = {start[g.name]: k for g, k in zip(groups, keeps) if g.name in start}
    n = len(layer_taps(model))
    return Student(model.eval(), f"width {width:g}", list(range(n)) if n else None, kept_by_layer,
                   config=update_config(model) if getattr(model, "config", None) is not None else None)


# ---------------------------------------------------------------- layers

def layer_student(teacher: nn.Module, layers, seed: int = 0) -> Student:
    """The teacher's layers `layers` (indices, kept in order)."""
    layers = sorted({int(i) for i in layers})
    if isinstance(teacher, nn.Sequential):
        return _sequential_layers(teacher, layers, seed)
    try:
        path, stack = find_blocks(teacher)
    except ValueError:
        raise ValueError(f"distill: a {{layers: {layers}}} student keeps transformer layers or the hidden blocks of "
                         f"an nn.Sequential; {type(teacher).__name__} has neither") from None
    _check_layers(layers, len(stack), path)
    model = copy.deepcopy(teacher)
    remove_layers(model, [i for i in range(len(stack)) if i not in layers], path=path)
    cfg = update_config(model) if getattr(model, "config", None) is not None else None
    return Student(model.eval(), f"layers {layers}", list(layers), config=cfg)


def _check_layers(layers: list[int], n: int, where: str) -> None:
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise ValueError(f"distill: student layers {bad} are out of range: the teacher's {where} has {n} layers "
                         f"(0..{n - 1})")
    if len(layers) == n:
        raise ValueError(f"distill: student layers {layers} keep every layer of the teacher's {where}; keep fewer "
                         "(e.g. every other one) or give {width: f}")


def _fresh(m: nn.Module, in_units: int) -> nn.Module:
    """A newly initialised Linear/Conv2d like m reading in_units inputs."""
    bias = m.bias is not None
    if isinstance(m, nn.Linear):
        new = nn.Linear(in_units, m.out_features, bias=bias)
    else:
        new = nn.Conv2d(in_units, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, 1, bias,
                        m.padding_mode)
    return new.to(device=m.weight.device, dtype=m.weight.dtype)


def _sequential_layers(teacher: nn.Sequential, layers: list[int], seed: int) -> Student:
    blocks, head = sequential_blocks(teacher)
    _check_layers(layers, len(blocks), "Sequential (hidden blocks)")
    model = copy.deepcopy(teacher)
    for i, block in enumerate(blocks):
        if i not in layers:
            for c in block:
                model[c] = nn.Identity()
    # re-wire: a kept layer must read what the kept layer before it computes
    weighted = [i for i, c in enumerate(teacher) if _weighted(c)]
    t_prev = s_prev = in_size(teacher[weighted[0]])   # the model input's units
    reinit = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for k in weighted:
            t = teacher[k]
            ratio, rest = divmod(in_size(t), t_prev)
            if rest:
                raise ValueError(f"distill: cannot re-wire the Sequential: layer {k} reads {in_size(t)} inputs, not a "
                                 f"multiple of the {t_prev} units before it")
            t_prev = out_size(t)
            if not _weighted(model[k]):
                continue
            if in_size(model[k]) != s_prev * ratio:
                model[k] = _fresh(model[k], s_prev * ratio)
                reinit.append(str(k))
            s_prev = out_size(model[k])
    return Student(model.eval(), f"layers {layers}", list(layers), reinitialized=reinit)


# ---------------------------------------------------------------- any spec

def build_student(teacher: nn.Module, spec, seed: int = 0) -> Student:
    """A Student from {width: f}, {layers: [...]}, a path (shrink.load), an nn.Module, or None
    (the teacher's own copy: distilling a model into itself, e.g. after it was compressed)."""
    if spec is None:
        model = copy.deepcopy(teacher)
        n = len(layer_taps(model))
        return Student(model, "the model itself", list(range(n)) if n else None)
    if isinstance(spec, nn.Module):
        return Student(spec, "given", None)
    if isinstance(spec, dict) and set(spec) == {"width"}:
        return width_student(teacher, spec["width"])
    if isinstance(spec, dict) and set(spec) == {"layers"}:
        return layer_student(teacher, spec["layers"], seed)
    if isinstance(spec, str):
        from shrink.models.io import load

        return Student(load(spec), f"path {spec}", None)
    raise ValueError(f"distill: student must be {{width: f}}, {{layers: [...]}}, a path or a model, got {spec!r}")

