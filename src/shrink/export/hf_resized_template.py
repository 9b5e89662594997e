"""A transformers model whose layers were resized by structured pruning.

Written by shrink's `safetensors` export beside the weights; config.json's "auto_map" points
transformers here, so the directory loads with
`AutoModel.from_pretrained(path, trust_remote_code=True)` (or the Auto class of the task).
This file needs only torch and transformers.

config.json's "shrink_resized" says how the pruned model differs from the model its config
builds: "layers" (layer lists cut to their first n entries), "modules" (modules of another
size: Linear, Conv1D, Embedding, or Identity for a dropped layer) and "attributes" (head
counts and sizes that attention forwards read). After the usual construction, the model
below puts modules of those sizes in place and sets those attributes; from_pretrained then
loads the weights into them.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import __BASE__
from transformers.pytorch_utils import Conv1D

FORMAT, VERSION = "shrink-resized", 1
# attributes an attention forward reads (head counts, split size, scaling, KV-cache slot)
ATTRIBUTES = ("num_heads", "num_key_value_heads", "num_key_value_groups", "head_dim", "split_size",
              "num_attention_heads", "attention_head_size", "all_head_size", "scaling", "layer_idx")
MODULE_TYPES = ("Linear", "Conv1D", "Embedding", "Identity")


class ShrinkResized__BASE__(__BASE__):
    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        apply_resized(self, getattr(config, "shrink_resized", None))


def apply_resized(model: nn.Module, desc) -> None:
    if not isinstance(desc, dict) or desc.get("format") != FORMAT or desc.get("version") != VERSION:
        raise ValueError(f"config.json: shrink_resized is not a {FORMAT} v{VERSION} description")
    for path, count in (desc.get("layers") or {}).items():
        layers = model.get_submodule(path)
        if not isinstance(layers, nn.ModuleList) or not 0 < int(count) <= len(layers):
            raise ValueError(f"shrink_resized: {path!r} cannot be cut to {count} layers")
        _put(model, path, nn.ModuleList(list(layers)[: int(count)]))
    for name, record in (desc.get("modules") or {}).items():
        _put(model, name, _module(record, model.get_submodule(name), name))
    for name, attrs in (desc.get("attributes") or {}).items():
        m = model.get_submodule(name)
        for attr, value in attrs.items():
            if attr not in ATTRIBUTES:
                raise ValueError(f"shrink_resized: {name}: attribute {attr!r} is not one this file sets")
            setattr(m, attr, value)


def _module(record: dict, old: nn.Module, name: str) -> nn.Module:
    """A module of the recorded size, on the device and in the dtype of the one it replaces."""
    kind = record.get("type") if isinstance(record, dict) else None
    if kind not in MODULE_TYPES:
        raise ValueError(f"shrink_resized: {name}: module type {kind!r} is not one this file rebuilds "
                         f"({', '.join(MODULE_TYPES)}); load the directory with shrink instead")
    like = next((t for t in (*old.parameters(), *old.buffers()) if t.is_floating_point()), None)
    device = like.device if like is not None else torch.device("cpu")
    try:
        with torch.device(device):
            if kind == "Linear":
                new = nn.Linear(int(record["in_features"]), int(record["out_features"]), bias=bool(record["bias"]))
            elif kind == "Conv1D":
                new = Conv1D(int(record["nf"]), int(record["nx"]))
            elif kind == "Embedding":
                new = nn.Embedding(int(record["num_embeddings"]), int(record["embedding_dim"]),
                                   padding_idx=record["padding_idx"])
            else:
                new = nn.Identity()
    except (KeyError, TypeError) as e:
        raise ValueError(f"shrink_resized: {name}: a {kind} record lacks or mistypes {e}") from None
    if like is not None:
        new = new.to(like.dtype)
    return new.train(old.training)


def _put(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
