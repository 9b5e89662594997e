"""Structured pruning that physically shrinks tensors: neurons, channels and whole layers.

A pruned model is an ordinary dense model with smaller matrices, so it has fewer
parameters and runs faster anywhere, with no sparse kernel.

Neurons and channels. A `NeuronGroup` is a set of units (hidden neurons of an MLP,
output channels of a convolution) with the modules they index:
  producers  compute the units: their OUTPUT rows are sliced (weight and bias);
  followers  hold one entry per unit (BatchNorm weight, bias, running stats);
  consumers  read the units: their INPUT columns are sliced. After a Flatten each
             channel owns a contiguous block of the next Linear's columns; the block
             size is that Linear's in_features / the producer's channels.

`find_neuron_groups` recognises, by module structure (not by class name):
  - Llama-style MLPs (Llama, Mistral, Qwen, ...): a module with gate_proj, up_proj and
    down_proj nn.Linear -> producers gate_proj + up_proj, consumer down_proj;
  - GPT-2 MLPs: a module with c_fc and c_proj transformers Conv1D -> c_fc / c_proj;
  - BERT layers: intermediate.dense and output.dense nn.Linear -> group "<layer>.intermediate";
  - nn.Sequential chains, child by child: Linear -> [elementwise act, Dropout, BatchNorm1d]
    -> Linear; Conv2d -> [BatchNorm2d, elementwise act, Dropout, pools] -> Conv2d; and
    Conv2d -> ... -> Flatten -> Linear. Grouped convolutions are not taken.
The residual stream width and the output layer's rows (logits, classes) are never a
group: only units that a later module of the same block reads are. Anything else
(LayerNorm between producer and consumer, nested Sequentials, Softmax) is not returned.

Layers. `find_blocks` names the transformer layer list (Llama model.layers, GPT-2
transformer.h, BERT encoder.layer) and `remove_layers` drops entries of it, renumbering
the `layer_idx` attributes the KV cache is indexed by and updating the config's layer count.

Everything here changes the model given; callers that must keep it deep-copy it first.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from shrink.surgery.replace import get_module, replace_module
from shrink.surgery.select import kind_of

_ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.SELU, nn.CELU,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus, nn.Softsign, nn.Tanhshrink,
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
LAYER_LISTS = ("layers", "h", "layer")  # Llama model.layers, GPT-2 transformer.h, BERT encoder.layer


@dataclass(frozen=True)
class NeuronGroup:
    """Units that producers compute, followers carry and consumers read (see the module doc).

    name: the MLP ("model.layers.0.mlp", "transformer.h.0.mlp", "encoder.layer.0.intermediate")
    or, in an nn.Sequential, the producer ("0"). kind: "neurons" | "channels".
    """

    name: str
    producers: tuple[str, ...]
    followers: tuple[str, ...]
    consumers: tuple[str, ...]
    width: int
    kind: str


# ---------------------------------------------------------------- finding groups

def _linear(m) -> bool:
    return isinstance(m, nn.Linear)


def _conv1d(m) -> bool:
    return isinstance(m, nn.Module) and kind_of(m) == "conv1d"


def _plain_conv(m) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups == 1


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _transformer_mlp(name: str, m: nn.Module) -> NeuronGroup | None:
    g, u, d = (getattr(m, a, None) for a in ("gate_proj", "up_proj", "down_proj"))
    if _linear(g) and _linear(u) and _linear(d) and g.out_features == u.out_features == d.in_features:
        return NeuronGroup(name, (_join(name, "gate_proj"), _join(name, "up_proj")), (),
                           (_join(name, "down_proj"),), g.out_features, "neurons")
    fc, proj = getattr(m, "c_fc", None), getattr(m, "c_proj", None)
    if _conv1d(fc) and _conv1d(proj) and fc.nf == proj.weight.shape[0]:
        return NeuronGroup(name, (_join(name, "c_fc"),), (), (_join(name, "c_proj"),), fc.nf, "neurons")
    inter, out = getattr(m, "intermediate", None), getattr(m, "output", None)
    if isinstance(inter, nn.Module) and isinstance(out, nn.Module):
        a, b = getattr(inter, "dense", None), getattr(out, "dense", None)
        if _linear(a) and _linear(b) and a.out_features == b.in_features:
            return NeuronGroup(_join(name, "intermediate"), (_join(name, "intermediate.dense"),), (),
                               (_join(name, "output.dense"),), a.out_features, "neurons")
    return None


def _sequential_groups(prefix: str, seq: nn.Sequential) -> list[NeuronGroup]:
    children = list(seq.named_children())
    out = []
    for i, (pname, p) in enumerate(children):
        if _linear(p):
            kind, width, bn = "neurons", p.out_features, nn.BatchNorm1d
        elif _plain_conv(p):
            kind, width, bn = "channels", p.out_channels, nn.BatchNorm2d
        else:
            continue
        followers, flattened = [], False
        for cname, c in children[i + 1:]:
            if isinstance(c, _ELEMENTWISE) or (isinstance(c, nn.PReLU) and c.weight.numel() == 1):
                continue
            if isinstance(c, bn) and not flattened and c.num_features == width:
                followers.append(_join(prefix, cname))
                continue
            if kind == "channels" and not flattened:
                if isinstance(c, _POOLS):
                    continue
                if isinstance(c, nn.Flatten) and c.start_dim == 1 and c.end_dim == -1:
                    flattened = True
                    continue
            consumer = (
                (kind == "neurons" and _linear(c) and c.in_features == width)
                or (kind == "channels" and not flattened and _plain_conv(c) and c.in_channels == width)
                or (kind == "channels" and flattened and _linear(c) and c.in_features % width == 0)
            )
            if consumer:
                out.append(NeuronGroup(_join(prefix, pname), (_join(prefix, pname),), tuple(followers),
                                       (_join(prefix, cname),), width, kind))
            break
    return out


def find_neuron_groups(model: nn.Module) -> list[NeuronGroup]:
    """Every recognised group (see the module docstring), in model order."""
    groups = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Sequential):
            groups += _sequential_groups(name, m)
            continue
        g = _transformer_mlp(name, m)
        if g is not None:
            groups.append(g)
    return groups


# ---------------------------------------------------------------- slicing modules

def _param(t: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(t.contiguous().clone(), requires_grad=like.requires_grad)


def _shell(build, old: nn.Module) -> nn.Module:
    """A module built without allocating or initialising: every tensor is assigned after."""
    with torch.device("meta"):
        new = build()
    return new.train(old.training)


def out_sliced(m: nn.Module, idx: torch.Tensor) -> nn.Module:
    """A copy of m keeping output rows `idx` (Linear, transformers Conv1D, Conv2d)."""
    idx = idx.to(m.weight.device)
    bias = m.bias is not None
    if _linear(m):
        new = _shell(lambda: nn.Linear(m.in_features, len(idx), bias=bias), m)
        new.weight = _param(m.weight[idx], m.weight)
    elif _conv1d(m):
        new = _shell(lambda: type(m)(len(idx), m.weight.shape[0]), m)
        new.weight = _param(m.weight[:, idx], m.weight)
    elif isinstance(m, nn.Conv2d) and m.groups == 1:
        new = _shell(lambda: nn.Conv2d(m.in_channels, len(idx), m.kernel_size, m.stride, m.padding,
                                       m.dilation, 1, bias, m.padding_mode), m)
        new.weight = _param(m.weight[idx], m.weight)
    else:
        raise TypeError(f"cannot slice the output of a {type(m).__name__}")
    if bias:
        new.bias = _param(m.bias[idx], m.bias)
    return new


def in_sliced(m: nn.Module, idx: torch.Tensor) -> nn.Module:
    """A copy of m keeping input columns `idx` (Linear, transformers Conv1D, Conv2d channels)."""
    idx = idx.to(m.weight.device)
    bias = m.bias is not None
    if _linear(m):
        new = _shell(lambda: nn.Linear(len(idx), m.out_features, bias=bias), m)
        new.weight = _param(m.weight[:, idx], m.weight)
    elif _conv1d(m):
        new = _shell(lambda: type(m)(m.nf, len(idx)), m)
        new.weight = _param(m.weight[idx], m.weight)
    elif isinstance(m, nn.Conv2d) and m.groups == 1:
        new = _shell(lambda: nn.Conv2d(len(idx), m.out_channels, m.kernel_size, m.stride, m.padding,
                                       m.dilation, 1, bias, m.padding_mode), m)
        new.weight = _param(m.weight[:, idx], m.weight)
    else:
        raise TypeError(f"cannot slice the input of a {type(m).__name__}")
    if bias:
        new.bias = _param(m.bias, m.bias)
    return new


def _bn_sliced(m: nn.modules.batchnorm._BatchNorm, idx: torch.Tensor) -> nn.Module:
    idx = idx.to((m.weight if m.weight is not None else m.running_mean).device)
    new = _shell(lambda: type(m)(len(idx), m.eps, m.momentum, m.affine, m.track_running_stats), m)
    if m.affine:
        new.weight, new.bias = _param(m.weight[idx], m.weight), _param(m.bias[idx], m.bias)
    if m.track_running_stats:
        new.running_mean = m.running_mean[idx].clone()
        new.running_var = m.running_var[idx].clone()
        new.num_batches_tracked = m.num_batches_tracked.clone()
    return new


def out_size(m: nn.Module) -> int:
    """Rows a producer computes: Linear out_features, Conv1D nf, Conv2d out_channels."""
    if _linear(m):
        return m.out_features
    if _conv1d(m):
        return m.nf
    if isinstance(m, nn.Conv2d):
        return m.out_channels
    raise TypeError(f"{type(m).__name__} is not a Linear, Conv1D or Conv2d")


def in_size(m: nn.Module) -> int:
    """Columns a consumer reads: Linear in_features, Conv1D rows of its [in, out] weight, Conv2d in_channels."""
    if _linear(m):
        return m.in_features
    if _conv1d(m):
        return int(m.weight.shape[0])
    if isinstance(m, nn.Conv2d) and m.groups == 1:
        return m.in_channels
    raise TypeError(f"{type(m).__name__} is not a Linear, Conv1D or ungrouped Conv2d")


def check_keep(keep, units: int, name: str, what: str = "unit") -> torch.Tensor:
    """`keep` as a sorted LongTensor of distinct indices in [0, units), or a ValueError naming `name`."""
    keep = torch.as_tensor(keep if not isinstance(keep, range) else list(keep), dtype=torch.long).flatten().cpu()
    if keep.numel() == 0:
        raise ValueError(f"removing every {what} of {name}: keep at least one of its {units}")
    if int(keep.min()) < 0 or int(keep.max()) >= units:
        raise ValueError(f"{name}: keep indices must be in [0, {units}), got {keep.tolist()}")
    uniq = torch.unique(keep)  # sorted
    if uniq.numel() != keep.numel():
        raise ValueError(f"{name}: keep has repeated indices {keep.tolist()}")
    return uniq


def unit_columns(units: torch.Tensor, block: int) -> torch.Tensor:
    """Indices of the contiguous blocks of `block` rows or columns that units own."""
    return (units[:, None] * block + torch.arange(block)).flatten()


def remove_units(model: nn.Module, group: NeuronGroup, keep) -> None:
    """Keep only units `keep` of `group`, in place; every other module is untouched.

    Producers lose rows, followers entries, consumers columns (a block of columns per
    channel after a Flatten); each is replaced by a new module of the smaller size with
    the same dtype, device, training mode and requires_grad.
    """
    keep = check_keep(keep, group.width, group.name)
    mods = {n: get_module(model, n) for n in (*group.producers, *group.followers, *group.consumers)}
    for n in group.producers:  # check everything before changing anything
        if out_size(mods[n]) != group.width:
            raise ValueError(f"{group.name}: {n} has {out_size(mods[n])} outputs, the group says {group.width} "
                             "(find the groups again after changing the model)")
    for n in group.followers:
        if not isinstance(mods[n], nn.modules.batchnorm._BatchNorm) or mods[n].num_features != group.width:
            raise ValueError(f"{group.name}: follower {n} is not a BatchNorm of {group.width} features")
    blocks = {}
    for n in group.consumers:
        cols = in_size(mods[n])
        if cols % group.width:
            raise ValueError(f"{group.name}: consumer {n} reads {cols} columns, not a multiple of {group.width}")
        blocks[n] = cols // group.width
    for n in group.producers:
        replace_module(model, n, out_sliced(mods[n], keep))
    for n in group.followers:
        replace_module(model, n, _bn_sliced(mods[n], keep))
    for n in group.consumers:
        replace_module(model, n, in_sliced(mods[n], unit_columns(keep, blocks[n])))


# ---------------------------------------------------------------- whole layers

def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, the list) of a transformer's layers: the outermost nn.ModuleList named
    layers / h / layer whose entries share one type (Llama model.layers, GPT-2
    transformer.h, BERT encoder.layer). Unlike shrink.surgery.find_blocks (calibration),
    a Sequential model is not a layer list: its children cannot be dropped."""
    for name, m in model.named_modules():
        if (isinstance(m, nn.ModuleList) and name.rsplit(".", 1)[-1] in LAYER_LISTS and len(m) > 0
                and len({type(c) for c in m}) == 1):
            return name, m
    raise ValueError(f"find_blocks: no transformer layer list (model.layers, transformer.h, encoder.layer) "
                     f"in {type(model).__name__}")


def _configs(model: nn.Module) -> list:
    seen, out = set(), []
    for m in model.modules():
        c = getattr(m, "config", None)
        if c is not None and not isinstance(c, nn.Module) and id(c) not in seen:
            seen.add(id(c))
            out.append(c)
    return out


def remove_layers(model: nn.Module, indices: Iterable[int], path: str | None = None) -> None:
    """Drop the layers at `indices` from the layer list (`path`, else `find_blocks`), in place.

    The kept layers are renumbered 0..n-1, and so are their modules' `layer_idx` (the KV
    cache slot); config.num_hidden_layers (GPT-2's n_layer) and config.layer_types follow.
    Per-layer constants fixed at construction (GPT-2's scale_attn_by_inverse_layer_idx
    scaling) keep their values, so the model computes what it did minus the layers.
    """
    if path is None:
        path, layers = find_blocks(model)
    else:
        layers = get_module(model, path)
        if not isinstance(layers, nn.ModuleList):
            raise ValueError(f"remove_layers: {path!r} is a {type(layers).__name__}, not an nn.ModuleList")
    n = len(layers)
    drop = {int(i) for i in indices}
    bad = sorted(i for i in drop if not 0 <= i < n)
    if bad:
        raise ValueError(f"remove_layers: {path} has {n} layers; indices {bad} are out of range")
    if len(drop) == n:
        raise ValueError(f"removing every layer of {path} ({n} layers): keep at least one")
    kept_idx = [i for i in range(n) if i not in drop]
    kept = [layers[i] for i in kept_idx]
    replace_module(model, path, nn.ModuleList(kept))
    for j, block in enumerate(kept):
        for m in block.modules():
            if isinstance(getattr(m, "layer_idx", None), int) and not isinstance(m.layer_idx, bool):
                m.layer_idx = j
    for cfg in _configs(model):
        if getattr(cfg, "num_hidden_layers", None) == n:
            types = getattr(cfg, "layer_types", None)
            if isinstance(types, (list, tuple)) and len(types) == n:
                cfg.layer_types = [types[i] for i in kept_idx]
            cfg.num_hidden_layers = len(kept)
