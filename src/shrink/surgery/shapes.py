"""Record how a pruned model's shapes differ from its base architecture, and rebuild them.

A shrink compressed dir is reloaded by building the base model from its config and
loading the state dict. After structured pruning the base no longer matches: widths may
differ per layer, which no config can say. `resized_modules(model, base)` describes, as
JSON, every module whose shape differs from the same-named module of a freshly built
base, every attention attribute the forward reads that differs (head counts, split size,
scaling, ...), and every layer list that is shorter. `apply_resized(base, desc)` puts
empty modules of the recorded sizes into a fresh base, sets the attributes and drops the
trailing layers, so that `load_state_dict(strict=True)` then succeeds and the model
computes what the pruned one did.

Order for a compressed dir: rebuild the base, `apply_resized`, then swap in compressed
modules (QuantLinear, ...), then load. A compressed module is described by its dense
equivalent (QuantLinear -> Linear of the same size), so the swap then finds the size it expects.

Recorded module types: Linear (and modules with int in_features/out_features), transformers
Conv1D, Conv2d (and modules with in_channels/out_channels/kernel_size), BatchNorm1d/2d/3d,
Embedding, Identity (a Sequential's layer that was dropped).
"""
from __future__ import annotations

import torch
from torch import nn

from shrink.surgery.replace import get_module, replace_module
from shrink.surgery.select import kind_of
from shrink.surgery.shrink_dims import remove_layers

FORMAT = "shrink-resized"
VERSION = 1
# What attention forwards read (transformers 5: Llama, GPT-2, BERT), plus the KV-cache slot.
ATTRIBUTES = ("num_heads", "num_key_value_heads", "num_key_value_groups", "head_dim", "split_size",
              "num_attention_heads", "attention_head_size", "all_head_size", "scaling", "layer_idx")
_BATCHNORMS = {"BatchNorm1d": nn.BatchNorm1d, "BatchNorm2d": nn.BatchNorm2d, "BatchNorm3d": nn.BatchNorm3d}


def _pair(v):
    return list(v) if isinstance(v, (tuple, list)) else v


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def describe(m: nn.Module) -> dict | None:
    """The JSON record of a module's shape, or None for a type that is not recorded."""
    inner = getattr(m, "inner", None)
    if isinstance(inner, nn.Module) and not isinstance(m, (nn.Linear, nn.Conv2d)):
        return describe(inner)  # a wrapper (InputScaled) has its inner module's shape
    if kind_of(m) == "conv1d":
        return {"type": "Conv1D", "nf": int(m.nf), "nx": int(m.weight.shape[0])}
    if type(m) is nn.Identity:   # a layer a distilled student dropped (keeping its neighbours' names)
        return {"type": "Identity"}
    if isinstance(m, nn.modules.batchnorm._BatchNorm) and type(m).__name__ in _BATCHNORMS:
        return {"type": type(m).__name__, "num_features": m.num_features, "eps": m.eps, "momentum": m.momentum,
                "affine": m.affine, "track_running_stats": m.track_running_stats}
    if isinstance(m, nn.Embedding):
        return {"type": "Embedding", "num_embeddings": m.num_embeddings, "embedding_dim": m.embedding_dim,
                "padding_idx": m.padding_idx}
    if all(_int(getattr(m, a, None)) for a in ("in_channels", "out_channels")) and hasattr(m, "kernel_size"):
        return {"type": "Conv2d", "in_channels": m.in_channels, "out_channels": m.out_channels,
                "kernel_size": _pair(m.kernel_size), "stride": _pair(m.stride), "padding": _pair(m.padding),
                "dilation": _pair(m.dilation), "groups": m.groups, "bias": getattr(m, "bias", None) is not None,
                "padding_mode": getattr(m, "padding_mode", "zeros")}
    if all(_int(getattr(m, a, None)) for a in ("in_features", "out_features")):
        return {"type": "Linear", "in_features": m.in_features, "out_features": m.out_features,
                "bias": getattr(m, "bias", None) is not None}
    return None


def resized_modules(model: nn.Module, base: nn.Module) -> dict:
    """How `model` differs in shape from `base`, a freshly built model of the same config.

    {"format", "version",
     "layers": {list name: kept length}       layer lists shorter than the base's,
     "modules": {name: describe(module)}      modules whose record differs from the base's,
     "attributes": {name: {attr: value}}}    ATTRIBUTES whose int/float value differs.
    Names are the model's (after remove_layers, the kept layers are 0..n-1).
    """
    ref = dict(base.named_modules())
    layers, modules, attributes = {}, {}, {}
    for name, m in model.named_modules():
        b = ref.get(name)
        if b is None:
            continue
        if isinstance(m, nn.ModuleList) and isinstance(b, nn.ModuleList) and len(m) != len(b):
            if len(m) > len(b):
                raise ValueError(f"resized_modules: {name or '<model>'} has {len(m)} entries, "
                                 f"more than the base's {len(b)}")
            layers[name] = len(m)
        d = describe(m)
        if d is not None and d != describe(b):
            modules[name] = d
        diff = {}
        for a in ATTRIBUTES:
            v, w = getattr(m, a, None), getattr(b, a, None)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and isinstance(w, (int, float)) and v != w:
                diff[a] = v
        if diff:
            attributes[name] = diff
    return {"format": FORMAT, "version": VERSION, "layers": layers, "modules": modules, "attributes": attributes}


def _like(m: nn.Module) -> tuple[torch.dtype, torch.device]:
    for t in (*m.parameters(), *m.buffers()):
        if t.is_floating_point():
            return t.dtype, t.device
    return torch.get_default_dtype(), torch.device("cpu")


def _conv1d_class(old: nn.Module):
    if kind_of(old) == "conv1d":
        return type(old)
    from transformers.pytorch_utils import Conv1D  # only reached for GPT-2-style models
    return Conv1D


def _geometry(v):
    return tuple(v) if isinstance(v, list) else v


def _empty(d: dict, old: nn.Module, where: str) -> nn.Module:
    """An uninitialised module of the recorded size, in `old`'s dtype and device."""
    t = d.get("type")
    try:
        if t == "Linear":
            build = lambda: nn.Linear(int(d["in_features"]), int(d["out_features"]), bias=bool(d["bias"]))  # noqa: E731
        elif t == "Conv1D":
            cls = _conv1d_class(old)
            build = lambda: cls(int(d["nf"]), int(d["nx"]))  # noqa: E731
        elif t == "Conv2d":
            build = lambda: nn.Conv2d(  # noqa: E731
                int(d["in_channels"]), int(d["out_channels"]), _geometry(d["kernel_size"]),
                stride=_geometry(d["stride"]), padding=_geometry(d["padding"]), dilation=_geometry(d["dilation"]),
                groups=int(d["groups"]), bias=bool(d["bias"]), padding_mode=d["padding_mode"])
        elif t in _BATCHNORMS:
            build = lambda: _BATCHNORMS[t](int(d["num_features"]), d["eps"], d["momentum"],  # noqa: E731
                                           bool(d["affine"]), bool(d["track_running_stats"]))
        elif t == "Identity":
            build = nn.Identity
        elif t == "Embedding":
            build = lambda: nn.Embedding(int(d["num_embeddings"]), int(d["embedding_dim"]),  # noqa: E731
                                         padding_idx=d["padding_idx"])
        else:
            raise ValueError(f"{where}: unknown module type {t!r}")
        with torch.device("meta"):
            new = build()
    except (KeyError, TypeError) as e:
        raise ValueError(f"{where}: a {t} record lacks or mistypes {e}") from None
    dtype, device = _like(old)
    return new.to_empty(device=device).to(dtype).train(old.training)


def apply_resized(model: nn.Module, desc: dict) -> None:
    """Make a freshly built base match `desc` (from resized_modules), in place: drop trailing
    layers, put empty modules of the recorded sizes, set the attributes. The new modules'
    values are uninitialised: load the pruned model's state dict next."""
    if not isinstance(desc, dict) or desc.get("format") != FORMAT or desc.get("version") != VERSION:
        raise ValueError(f"apply_resized: not a {FORMAT} v{VERSION} description")
    for path, count in (desc.get("layers") or {}).items():
        layers = get_module(model, path)
        if not isinstance(layers, nn.ModuleList) or not 0 < int(count) <= len(layers):
            raise ValueError(f"apply_resized: {path!r} cannot be cut to {count} layers "
                             f"(a {type(layers).__name__} of {len(layers)})")
        if int(count) < len(layers):
            remove_layers(model, range(int(count), len(layers)), path=path)
    for name, d in (desc.get("modules") or {}).items():
        replace_module(model, name, _empty(d, get_module(model, name), f"apply_resized: {name}"))
    for name, attrs in (desc.get("attributes") or {}).items():
        m = get_module(model, name)
        for a, v in attrs.items():
            if a not in ATTRIBUTES:
                raise ValueError(f"apply_resized: {name}: attribute {a!r} is not one shrink records")
            setattr(m, a, v)
