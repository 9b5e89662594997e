"""Attention-head pruning that physically shrinks q/k/v/o, and writing the result into the config.

`find_attention` recognises, by module structure:
  - "llama": a module with q_proj, k_proj, v_proj, o_proj nn.Linear and an int head_dim
    (Llama, Mistral, Qwen, ...; GQA included);
  - "gpt2": a module with fused c_attn and c_proj transformers Conv1D and num_heads,
    head_dim, split_size (GPT-2 self-attention; cross-attention, with q_attn, is skipped);
  - "bert": a module whose `self` has query/key/value nn.Linear and attention_head_size,
    and whose `output.dense` is an nn.Linear (BERT self- and cross-attention).

Units. For multi-head attention a unit is a head. For grouped-query attention
(num_kv_heads < num_heads) a unit is a KV group: one key/value head together with the
num_heads/num_kv_heads query heads that read it (query head h reads kv head
h // group_size), so the grouping stays valid; `keep` then indexes KV groups, 0..num_kv_heads-1.

Removing heads slices the q/k/v output rows (GPT-2's fused c_attn: each of its q, k, v
sections; Conv1D stores [in, out], so those are columns of its weight) and the o input
columns (rows of GPT-2's c_proj weight), and updates what the forward reads: GPT-2
num_heads and split_size, BERT num_attention_heads and all_head_size, Llama
num_key_value_groups (unchanged by construction). Head size never changes. The KV cache of
generate() (DynamicCache) sizes itself from the tensors, so it works with any head count
per layer; a StaticCache, sized from the config, needs uniform counts and `update_config`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from shrink.surgery.replace import get_module, replace_module
from shrink.surgery.select import kind_of
from shrink.surgery.shrink_dims import (
    check_keep, find_blocks, find_neuron_groups, in_sliced, out_sliced, unit_columns,
)


@dataclass(frozen=True)
class AttentionGroup:
    """One attention module. q, k and v all name the fused c_attn for GPT-2; o is the
    output projection (o_proj, c_proj, output.dense). layer: index in the layer list, -1
    when the model has none that `find_blocks` recognises."""

    name: str
    layer: int
    arch: str
    q: str
    k: str
    v: str
    o: str
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def units(self) -> int:
        """Removable units: heads for MHA, KV groups for GQA."""
        return self.num_kv_heads

    @property
    def group_size(self) -> int:
        """Query heads per unit (1 for MHA)."""
        return self.num_heads // self.num_kv_heads


def _int(m, attr: str) -> int | None:
    v = getattr(m, attr, None)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _recognise(name: str, m: nn.Module):
    """(arch, q, k, v, o, num_heads, num_kv_heads, head_dim) or None."""
    j = (lambda a: f"{name}.{a}" if name else a)
    q, k, v, o = (getattr(m, a, None) for a in ("q_proj", "k_proj", "v_proj", "o_proj"))
    hd = _int(m, "head_dim")
    if all(isinstance(x, nn.Linear) for x in (q, k, v, o)) and hd:
        nh, nkv = q.out_features // hd, k.out_features // hd
        if (q.out_features == nh * hd == o.in_features and k.out_features == v.out_features == nkv * hd
                and nkv and nh % nkv == 0):
            return "llama", j("q_proj"), j("k_proj"), j("v_proj"), j("o_proj"), nh, nkv, hd
    c_attn, c_proj = getattr(m, "c_attn", None), getattr(m, "c_proj", None)
    nh, split = _int(m, "num_heads"), _int(m, "split_size")
    if (isinstance(c_attn, nn.Module) and kind_of(c_attn) == "conv1d" and isinstance(c_proj, nn.Module)
            and kind_of(c_proj) == "conv1d" and hd and nh and split and not getattr(m, "is_cross_attention", False)
            and not hasattr(m, "q_attn") and split == nh * hd and c_attn.nf == 3 * split
            and c_proj.weight.shape[0] == split):
        return "gpt2", j("c_attn"), j("c_attn"), j("c_attn"), j("c_proj"), nh, nh, hd
    s, out = getattr(m, "self", None), getattr(m, "output", None)
    if isinstance(s, nn.Module) and isinstance(out, nn.Module):
        q, k, v = (getattr(s, a, None) for a in ("query", "key", "value"))
        o, hd = getattr(out, "dense", None), _int(s, "attention_head_size")
        if all(isinstance(x, nn.Linear) for x in (q, k, v, o)) and hd and q.out_features % hd == 0:
            nh = q.out_features // hd
            if k.out_features == v.out_features == q.out_features == o.in_features:
                return "bert", j("self.query"), j("self.key"), j("self.value"), j("output.dense"), nh, nh, hd
    return None


def find_attention(model: nn.Module) -> list[AttentionGroup]:
    """Every recognised attention module (see the module docstring), in model order."""
    try:
        stack, _ = find_blocks(model)
    except ValueError:
        stack = None
    out = []
    for name, m in model.named_modules():
        found = _recognise(name, m)
        if found is None:
            continue
        layer = -1
        if stack is not None and name.startswith(stack + "."):
            layer = int(name[len(stack) + 1:].split(".", 1)[0])
        out.append(AttentionGroup(name, layer, *found))
    return out


def remove_heads(model: nn.Module, group: AttentionGroup, keep) -> None:
    """Keep only units `keep` of `group` (heads; KV groups under GQA), in place."""
    keep = check_keep(keep, group.units, group.name, "head" if group.group_size == 1 else "KV group")
    attn = get_module(model, group.name)
    now = _recognise(group.name, attn)
    if now is None or now[5:] != (group.num_heads, group.num_kv_heads, group.head_dim):
        raise ValueError(f"{group.name}: the module no longer has {group.num_heads} heads "
                         "(find the attention modules again after changing the model)")
    hd, g = group.head_dim, group.group_size
    q_heads = (keep[:, None] * g + torch.arange(g)).flatten()
    q_rows, kv_rows = unit_columns(q_heads, hd), unit_columns(keep, hd)
    if group.arch == "gpt2":
        split = group.num_heads * hd
        qkv = torch.cat([q_rows, q_rows + split, q_rows + 2 * split])
        replace_module(model, group.q, out_sliced(get_module(model, group.q), qkv))
    else:
        for name, rows in ((group.q, q_rows), (group.k, kv_rows), (group.v, kv_rows)):
            replace_module(model, name, out_sliced(get_module(model, name), rows))
    replace_module(model, group.o, in_sliced(get_module(model, group.o), q_rows))
    n_q, n_kv = len(q_heads), len(keep)
    if group.arch == "gpt2":
        attn.num_heads, attn.split_size = n_q, n_q * hd
    elif group.arch == "bert":
        attn.self.num_attention_heads, attn.self.all_head_size = n_q, n_q * hd
    else:
        attn.num_key_value_groups = n_q // n_kv
        for attr, value in (("num_heads", n_q), ("num_attention_heads", n_q), ("num_key_value_heads", n_kv)):
            if _int(attn, attr) is not None:  # older or Llama-like classes that keep the counts
                setattr(attn, attr, value)


# ---------------------------------------------------------------- config

# where a config cannot say the shapes, what still loads the model (export/hf_resized.py)
EXPORT_NOTE = ("shrink's own directory records the shapes, and `shrink export --format safetensors` writes a "
               "directory that transformers loads with trust_remote_code=True (the shapes in config.json, a "
               "generated shrink_resized.py)")


def _uniform(values: list) -> bool:
    return len(set(values)) == 1


def update_config(model: nn.Module) -> dict:
    """Write uniform per-layer sizes into model.config after pruning.

    Llama: num_attention_heads, num_key_value_heads, an explicit head_dim, intermediate_size,
    num_hidden_layers; GPT-2: n_inner, n_layer; BERT: intermediate_size, num_hidden_layers.
    A size that differs by layer is left as it is. Returns {"config_loadable": bool,
    "reason": str}: True when a model built from the config alone (as `from_pretrained`
    of a save_pretrained dir does) has every module's shape and attention attribute as
    this one, checked by building it on the meta device. When the shapes are why not, the
    reason ends with EXPORT_NOTE: the safetensors export adds code that rebuilds them.
    """
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "num_hidden_layers"):
        return {"config_loadable": False, "reason": "the model has no transformers config"}
    notes = []
    try:
        stack, layers = find_blocks(model)
        cfg.num_hidden_layers = len(layers)
    except ValueError:
        stack = None
    attn = find_attention(model)
    mlps = [g for g in find_neuron_groups(model) if stack is not None and g.name.startswith(stack + ".")]
    if mlps:
        widths = [g.width for g in mlps]
        key = "n_inner" if hasattr(cfg, "n_inner") else "intermediate_size"
        if _uniform(widths):
            setattr(cfg, key, widths[0])
        else:
            notes.append(f"the MLP width differs by layer ({widths}); a config has one {key}")
    if attn:
        arch, heads = attn[0].arch, [(a.num_heads, a.num_kv_heads) for a in attn]
        if arch == "llama":
            if _uniform(heads) and _uniform([a.head_dim for a in attn]):
                old = (cfg.num_attention_heads, cfg.num_key_value_heads, getattr(cfg, "head_dim", None))
                cfg.num_attention_heads, cfg.num_key_value_heads = heads[0]
                cfg.head_dim = attn[0].head_dim
                why = _invalid(cfg)
                if why:   # transformers refuses to save it (e.g. hidden_size % num_attention_heads != 0)
                    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = old
                    notes.append(f"{heads[0][0]} heads per layer: transformers' config validation refuses it "
                                 f"({why})")
            else:
                notes.append(f"the head count differs by layer ({[h for h, _ in heads]}); "
                             "a config has one num_attention_heads")
        elif any(h != cfg.num_attention_heads for h, _ in heads):
            notes.append(f"{arch.upper()} heads were removed ({[h for h, _ in heads]} per layer): transformers 5 "
                         "derives the head size as hidden_size / num_attention_heads and no longer reads "
                         "pruned_heads, so a config cannot express fewer heads of the same size")
    if notes:
        notes.append(EXPORT_NOTE)
    else:
        notes += _config_mismatch(model, cfg)
    if notes:
        return {"config_loadable": False, "reason": "; ".join(notes)}
    return {"config_loadable": True, "reason": "a model built from model.config has this model's shapes"}


def _invalid(cfg) -> str | None:
    """Why transformers' own config validation (run by save_pretrained) rejects cfg, or None."""
    validate = getattr(cfg, "validate", None)
    if not callable(validate):
        return None
    try:
        validate()
    except Exception as e:  # noqa: BLE001 — huggingface_hub raises its own validation error types
        return str(getattr(e, "__cause__", None) or e).strip().splitlines()[-1]
    return None


def _config_mismatch(model: nn.Module, cfg) -> list[str]:
    from shrink.surgery.shapes import resized_modules

    build = getattr(type(model), "_from_config", None)
    if build is None:
        return [f"{type(model).__name__} cannot be built from a config"]
    try:
        with torch.device("meta"):
            fresh = build(copy.deepcopy(cfg))
    except Exception as e:  # noqa: BLE001 — any failure means "not loadable", with its reason
        return [f"building {type(model).__name__} from the config fails ({type(e).__name__}: {e})"]
    desc = resized_modules(model, fresh)
    diffs = [*desc["layers"], *desc["modules"], *(f"{n}.{a}" for n, d in desc["attributes"].items() for a in d)]
    if diffs:
        return [f"{len(diffs)} modules or attributes differ from a model built from the config "
                f"(e.g. {', '.join(diffs[:3])})", EXPORT_NOTE]
    return []
