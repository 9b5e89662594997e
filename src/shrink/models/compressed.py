"""A compressed model on disk: weights (safetensors), the base architecture's config and
a manifest saying which modules are compressed and how. Reloads bit-exactly.

DIR/
  model.safetensors   every tensor of the compressed model (packed codes, scales, ...); a
                      streamed run (recipe/stream.py) writes model-0000k-of-0000N.safetensors
                      shards and model.safetensors.index.json instead
  config.json         the base model's Hugging Face config (for transformers models)
  manifest.json       format version, how to build the base, per-module type and spec (a
                      QuantConv2d also its geometry: kernel, stride, padding, ...; a SparseLinear
                      or SparseConv2d its layout, nnz, n:m and dtype; a LowRankLinear its rank,
                      its factors listed again where a later step quantized them; a LoRALinear its
                      rank, alpha, base kind and whether it ran merged, a QuantLinear base listed
                      again; a SparseQuantLinear or SparseQuantConv2d also its layout, nnz and
                      n:m), recipe, metrics;
                      an early-exit model (EarlyExitModel around a built-in Sequential) its
                      exits, threshold and heads under "early_exit"
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shrink.fsutil import replace_dir
from shrink.models.checks import check_compressed_layout, check_finite_state, check_manifest, one_line
from shrink.modules import (EarlyExitModel, InputScaled, LoRALinear, LowRankLinear, QuantConv2d, QuantLinear,
                            SparseConv2d, SparseLinear, SparseQuantConv2d, SparseQuantLinear, W8A8Linear)
from shrink.quant import QuantSpec
from shrink.surgery import replace_module

FORMAT = "shrink-compressed"
VERSION = 1
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


def spec_to_dict(spec: QuantSpec) -> dict:
    out = {}
    for f in fields(spec):
        v = getattr(spec, f.name)
        if isinstance(v, torch.dtype):
            v = str(v).removeprefix("torch.")
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


def spec_from_dict(d: dict, where: str) -> QuantSpec:
    known = {f.name for f in fields(QuantSpec)}
    kw: dict[str, Any] = {}
    for k, v in d.items():
        if k not in known:
            raise ValueError(f"{where}: unknown QuantSpec field {k!r}")
        if k in ("scale_dtype", "codebook_dtype"):
            if v not in _DTYPES:
                raise ValueError(f"{where}: {k} {v!r} is not one of {', '.join(_DTYPES)}")
            v = _DTYPES[v]
        elif k == "codebook" and v is not None:
            v = tuple(float(x) for x in v)
        kw[k] = v
    return QuantSpec(**kw)


def compressed_modules(model: nn.Module) -> dict[str, dict]:
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, W8A8Linear):
            out[name] = {"type": "W8A8Linear", "in_features": mod.in_features, "out_features": mod.out_features,
                         "bias": mod.bias is not None, "smoothed": mod.input_scale is not None}
            continue
        if isinstance(mod, QuantConv2d):
            out[name] = {"type": "QuantConv2d", "in_channels": mod.in_channels, "out_channels": mod.out_channels,
                         "kernel_size": list(mod.kernel_size), "stride": list(mod.stride),
                         "padding": mod.padding if isinstance(mod.padding, str) else list(mod.padding),
                         "dilation": list(mod.dilation), "groups": mod.groups, "padding_mode": mod.padding_mode,
                         "bias": mod.bias is not None, "spec": spec_to_dict(mod.spec),
                         "weight_dtype": str(mod.weight_dtype).removeprefix("torch.")}
            if isinstance(mod, SparseQuantConv2d):   # the kept weights' codes + the pattern
                out[name].update({"type": "SparseQuantConv2d", "layout": mod.layout, "nnz": mod.nnz, "n": mod.n,
                                  "m": mod.m})
            continue
        if isinstance(mod, (SparseLinear, SparseConv2d)):
            out[name] = _sparse_entry(mod)
            continue
        if isinstance(mod, LowRankLinear):   # its factors are children: a later step may have quantized them
            dtype = next((p.dtype for p in mod.parameters() if p.is_floating_point()), torch.float32)
            out[name] = {"type": "LowRankLinear", "in_features": mod.in_features, "out_features": mod.out_features,
                         "rank": mod.rank, "bias": mod.bias is not None, "dtype": str(dtype).removeprefix("torch."),
                         "source": mod.source}
            continue
        if isinstance(mod, LoRALinear):   # saved unmerged (base + A, B); a QuantLinear base is its own entry
            out[name] = {"type": "LoRALinear", "in_features": mod.in_features, "out_features": mod.out_features,
                         "rank": mod.rank, "alpha": mod.alpha, "dropout": mod.dropout_p, "bias": mod.bias is not None,
                         "dtype": str(mod.lora_A.dtype).removeprefix("torch."), "source": mod.source,
                         "base": mod.base_kind, "merged": mod.merged}
            continue
        scaled = isinstance(mod, InputScaled)
        ql = mod.inner if scaled else mod
        if isinstance(ql, QuantLinear) and not (not scaled and _parent_is_scaled(model, name)):
            out[name] = {"type": "QuantLinear", "in_features": ql.in_features, "out_features": ql.out_features,
                         "bias": ql.bias is not None, "spec": spec_to_dict(ql.spec), "input_scaled": scaled,
                         "weight_dtype": str(ql.weight_dtype).removeprefix("torch.")}
            if isinstance(ql, SparseQuantLinear):   # the kept weights' codes + the pattern
                out[name].update({"type": "SparseQuantLinear", "layout": ql.layout, "nnz": ql.nnz, "n": ql.n,
                                  "m": ql.m})
    return out


def save_compressed(model: nn.Module, directory: str | Path, *, base: dict, extra: dict | None = None) -> Path:
    """Write DIR atomically (a temporary sibling, then a rename). `base` says how to rebuild the
    uncompressed architecture: {"kind": "hf"} (the model's .config is saved) or
    {"kind": "builtin", "name": ...}."""
    from safetensors.torch import save_model

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        if base.get("kind") == "hf":
            cfg = getattr(model, "config", None)
            if cfg is None:
                raise ValueError("save_compressed: base kind 'hf' needs a transformers model with .config")
            cfg.save_pretrained(tmp)
            base = {**base, "class": type(model).__name__}
        save_model(model, str(tmp / "model.safetensors"))
        manifest = {"format": FORMAT, "version": VERSION, "base": base,
                    "modules": compressed_modules(model), **(extra or {})}
        if isinstance(model, EarlyExitModel):   # the heads wrap the base: shapes are compared on the base
            manifest["early_exit"] = model.describe()
        resized = _resized(model.base if isinstance(model, EarlyExitModel) else model, base, tmp)
        if resized is not None:
            manifest["resized"] = resized
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def is_compressed_dir(path: str | Path) -> bool:
    p = Path(path)
    from .shards import has_weights   # model.safetensors, or shards with an index (a streamed run)

    return (p / "manifest.json").is_file() and has_weights(p)


def load_compressed(directory: str | Path, build_builtin=None, _meta: bool = False) -> nn.Module:
    """Rebuild the base architecture, put empty compressed modules where the manifest says,
    and load every tensor (strict: a missing or extra tensor is an error). The manifest and
    the file are checked first (models/checks.py): the whole model is assembled on the meta
    device and compared with the file's tensors before anything is allocated."""
    directory = Path(directory)
    where = directory / "manifest.json"
    try:
        manifest = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{where}: cannot read the manifest ({one_line(e)})") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{where}: a manifest must be a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(f"{where}: not a shrink-compressed v{VERSION} manifest "
                         f"(format={manifest.get('format')!r}, version={manifest.get('version')!r})")
    if not _meta:
        from .shards import weight_files

        weights = weight_files(directory)   # model.safetensors, or a streamed run's shards
        manifest = check_manifest(manifest, where, weights)
        check_compressed_layout(_layout_model(directory, manifest, build_builtin), weights, where,
                                manifest.get("modules") or {})
    base = manifest.get("base") or {}
    if base.get("kind") == "hf":
        model = _build_hf(directory, base.get("class"))
    elif base.get("kind") == "builtin" and build_builtin is not None:
        model = build_builtin(base["name"])
    else:
        raise ValueError(f"{where}: cannot rebuild base {base!r}")
    if manifest.get("resized"):   # structurally pruned: shrink the fresh base to the saved shapes first
        from shrink.surgery.shapes import apply_resized

        try:
            apply_resized(model, manifest["resized"])
        except (ValueError, KeyError, AttributeError, TypeError) as e:
            raise ValueError(f"{where}: cannot rebuild the pruned shapes ({e})") from None
    if manifest.get("early_exit"):   # exit heads around the base; module names below are the wrapper's
        model = EarlyExitModel.shell(model, manifest["early_exit"], f"{where}: early_exit")
    sparse: dict[str, dict] = {}
    entries = (manifest.get("modules") or {}).items()   # low-rank and LoRA shells first: their children may be listed
    merged = []
    for name, m in sorted(entries, key=lambda e: e[1].get("type") not in ("LowRankLinear", "LoRALinear")):
        if m.get("type") == "LoRALinear":
            replace_module(model, name, _lora_shell(m, f"{where}: module {name}"))
            if m.get("merged"):
                merged.append(name)
            continue
        if m.get("type") == "LowRankLinear":
            replace_module(model, name, _lowrank_shell(m, f"{where}: module {name}"))
            continue
        if m.get("type") == "W8A8Linear":
            replace_module(model, name, W8A8Linear(int(m["in_features"]), int(m["out_features"]),
                                                   bias=bool(m["bias"]), smoothed=bool(m["smoothed"])))
            continue
        if m.get("type") in ("QuantConv2d", "SparseQuantConv2d"):
            replace_module(model, name, _conv_shell(m, f"{where}: module {name}"))
            continue
        if m.get("type") in ("SparseLinear", "SparseConv2d"):
            replace_module(model, name, _sparse_shell(m, f"{where}: module {name}"))
            sparse[name] = m
            continue
        if m.get("type") not in ("QuantLinear", "SparseQuantLinear"):
            raise ValueError(f"{where}: module {name} has unknown type {m.get('type')!r}")
        spec = spec_from_dict(m["spec"], f"{where}: module {name}")
        dims = (int(m["in_features"]), int(m["out_features"]), spec)
        dtype = _DTYPES[m.get("weight_dtype", "float32")]
        if m["type"] == "SparseQuantLinear":
            try:
                shell = SparseQuantLinear(*dims, m["layout"], int(m["nnz"]), bias=bool(m["bias"]), n=m.get("n"),
                                          m=m.get("m"), weight_dtype=dtype)
            except (KeyError, ValueError) as e:
                raise ValueError(f"{where}: module {name}: bad SparseQuantLinear entry ({one_line(e)})") from None
        else:
            shell = QuantLinear(*dims, bias=bool(m["bias"]), weight_dtype=dtype)
        if m.get("input_scaled"):
            shell = InputScaled(shell, torch.ones(int(m["in_features"])))
        replace_module(model, name, shell)
    if _meta:
        return model
    _check_sparse_sizes(model, sparse, directory / "model.safetensors", where)
    from .shards import load_weights

    missing, unexpected = load_weights(model, directory)   # one file, or shard by shard
    if missing or unexpected:
        raise ValueError(f"{directory / 'model.safetensors'}: tensors do not match the manifest "
                         f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    check_finite_state(model.state_dict(), weights[0] if len(weights) == 1 else directory)   # NaN/inf: named
    for name in merged:   # W' is recomputed from the saved base and adapters: the same bytes
        model.get_submodule(name).merge()
    return model.eval()


def _layout_model(directory: Path, manifest: dict, build_builtin) -> nn.Module:
    """The model the manifest describes, on the meta device: its tensors' names, shapes and
    dtypes without their memory (for real where a module's constructor computes on its
    values: the manifest's sizes are bounded by the weights' by then). A built-in base
    (shrink's own, small) is built for real. Whatever goes wrong assembling it is the
    files' fault: one ValueError naming the manifest."""
    def attempt(device: str) -> nn.Module:
        build = build_builtin
        if manifest["base"]["kind"] == "builtin" and build_builtin is not None:
            real = build_builtin(manifest["base"]["name"])
            build = lambda name: real  # noqa: E731
        with torch.device(device):
            return load_compressed(directory, build, _meta=True)

    try:
        try:
            return attempt("meta")
        except (RuntimeError, NotImplementedError) as e:
            if "meta" not in str(e):
                raise
        return attempt("cpu")
    except FileNotFoundError:
        raise
    except ValueError as e:   # a module's own message may not say which directory
        if str(directory) in str(e):
            raise
        raise ValueError(f"{directory / 'manifest.json'}: {one_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - a manifest or config that does not fit the model it names
        raise ValueError(f"{directory / 'manifest.json'}: the manifest does not fit the model it describes "
                         f"({type(e).__name__}: {one_line(e)}); the directory is corrupt: compress again") from None


def _conv_shell(m: dict, where: str) -> QuantConv2d:
    """An empty QuantConv2d (or SparseQuantConv2d: also its layout, nnz, n:m) with the geometry
    and spec of a manifest entry, for load_state_dict to fill."""
    try:
        dims = (int(m["in_channels"]), int(m["out_channels"]), _geometry(m["kernel_size"]),
                spec_from_dict(m["spec"], where))
        kw = dict(stride=_geometry(m["stride"]), padding=_geometry(m["padding"]), dilation=_geometry(m["dilation"]),
                  groups=int(m["groups"]), bias=bool(m["bias"]), padding_mode=m["padding_mode"],
                  weight_dtype=_DTYPES[m.get("weight_dtype", "float32")])
        if m["type"] == "SparseQuantConv2d":
            return SparseQuantConv2d(*dims, m["layout"], int(m["nnz"]), n=m.get("n"), m=m.get("m"), **kw)
        return QuantConv2d(*dims, **kw)
    except KeyError as e:
        raise ValueError(f"{where}: {m['type']} entry lacks {e} (or names an unknown dtype)") from None
    except ValueError as e:   # the constructors' messages name the class and what is wrong
        raise ValueError(f"{where}: bad {m['type']} entry ({one_line(e)})") from None


def _lowrank_shell(m: dict, where: str) -> LowRankLinear:
    try:
        if m.get("dtype") not in _DTYPES:
            raise ValueError(f"LowRankLinear entry: dtype {m.get('dtype')!r} is not one of {', '.join(_DTYPES)}")
        return LowRankLinear(int(m["in_features"]), int(m["out_features"]), int(m["rank"]), bias=bool(m["bias"]),
                             dtype=_DTYPES[m["dtype"]], source=m.get("source", "linear"))
    except KeyError as e:
        raise ValueError(f"{where}: LowRankLinear entry lacks {e}") from None
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _lora_shell(m: dict, where: str) -> LoRALinear:
    try:
        if m.get("dtype") not in _DTYPES:
            raise ValueError(f"LoRALinear entry: dtype {m.get('dtype')!r} is not one of {', '.join(_DTYPES)}")
        return LoRALinear.shell(int(m["in_features"]), int(m["out_features"]), int(m["rank"]), float(m["alpha"]),
                                float(m.get("dropout", 0.0)), bias=bool(m["bias"]), dtype=_DTYPES[m["dtype"]],
                                source=m.get("source", "linear"), base=m["base"])
    except KeyError as e:
        raise ValueError(f"{where}: LoRALinear entry lacks {e}") from None
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: {e}") from None


def _sparse_entry(mod) -> dict:
    entry = {"type": type(mod).__name__}
    if isinstance(mod, SparseConv2d):
        entry.update({"in_channels": mod.in_channels, "out_channels": mod.out_channels,
                      "kernel_size": list(mod.kernel_size), "stride": list(mod.stride),
                      "padding": mod.padding if isinstance(mod.padding, str) else list(mod.padding),
                      "dilation": list(mod.dilation), "groups": mod.groups, "padding_mode": mod.padding_mode})
    else:
        entry.update({"in_features": mod.in_features, "out_features": mod.out_features})
    return {**entry, "layout": mod.layout, "nnz": mod.nnz, "n": mod.n, "m": mod.m, "bias": mod.bias is not None,
            "dtype": str(mod.values.dtype).removeprefix("torch.")}


def _sparse_shell(m: dict, where: str) -> SparseLinear | SparseConv2d:
    """An empty SparseLinear / SparseConv2d of a manifest entry's sizes, for load_state_dict to fill."""
    try:
        if m.get("dtype") not in _DTYPES:
            raise ValueError(f"{m['type']} entry: dtype {m.get('dtype')!r} is not one of {', '.join(_DTYPES)}")
        kw = {"layout": m["layout"], "nnz": int(m["nnz"]), "bias": bool(m["bias"]), "n": m.get("n"),
              "m": m.get("m"), "dtype": _DTYPES[m["dtype"]]}
        if m["type"] == "SparseLinear":
            return SparseLinear(int(m["in_features"]), int(m["out_features"]), **kw)
        return SparseConv2d(int(m["in_channels"]), int(m["out_channels"]), _geometry(m["kernel_size"]),
                            stride=_geometry(m["stride"]), padding=_geometry(m["padding"]),
                            dilation=_geometry(m["dilation"]), groups=int(m["groups"]),
                            padding_mode=m["padding_mode"], **kw)
    except KeyError as e:
        raise ValueError(f"{where}: {m['type']} entry lacks {e}") from None
    except ValueError as e:  # the constructors' messages name the class and what is wrong
        raise ValueError(f"{where}: {e}") from None
    except TypeError as e:
        raise ValueError(f"{where}: bad {m['type']} entry: {e}") from None


def _check_sparse_sizes(model: nn.Module, sparse: dict[str, dict], weights: Path, where: Path) -> None:
    """Each sparse module's stored tensors in the file have the sizes its manifest entry implies
    (else load_state_dict would fail with a bare size mismatch)."""
    if not sparse:
        return
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        keys = set(f.keys())
        for name, entry in sparse.items():
            mod = model.get_submodule(name)
            for tname, t in [("values", mod.values), *mod.named_buffers(recurse=False)]:
                key = f"{name}.{tname}"
                if key not in keys:
                    continue  # reported as missing by the strict load below
                shape = list(f.get_slice(key).get_shape())
                if shape != list(t.shape):
                    raise ValueError(
                        f"{where}: module {name} ({entry['type']} {entry['layout']}, nnz={entry['nnz']}) expects "
                        f"{key} of shape {list(t.shape)}, but {weights.name} holds {shape}: the manifest's nnz "
                        "(or shape) does not match the weights")


def _geometry(v):
    """A manifest's [a, b] pair as nn.Conv2d takes it; strings ('same', 'valid') as they are."""
    return tuple(v) if isinstance(v, list) else v


def _resized(model: nn.Module, base: dict, saved: Path) -> dict | None:
    """How the model's shapes differ from the base that load_compressed rebuilds (structured
    pruning: fewer neurons, heads or layers, per layer), or None when they do not. The
    base: a transformers model built on the meta device from the config saved beside the
    weights (no memory), or the built-in model of that name."""
    from shrink.surgery.shapes import resized_modules

    if base.get("kind") == "hf":
        with torch.device("meta"):
            ref = _build_hf(saved, base.get("class"))
    elif base.get("kind") == "builtin":
        from shrink.models.io import load

        try:
            ref = load(base["name"])
        except (FileNotFoundError, ValueError):   # a caller's own builder: nothing to compare against
            return None
    else:
        return None
    desc = resized_modules(model, ref)
    return desc if any(desc.get(k) for k in ("layers", "modules", "attributes")) else None


def _build_hf(directory: Path, class_name: str | None) -> nn.Module:
    import transformers

    config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    cls = getattr(transformers, class_name or "", None) or transformers.AutoModel
    if cls is transformers.AutoModel:
        return transformers.AutoModel.from_config(config)
    return cls._from_config(config)


def _parent_is_scaled(model: nn.Module, name: str) -> bool:
    if "." not in name:
        return False
    parent = model.get_submodule(name.rsplit(".", 1)[0])
    return isinstance(parent, InputScaled)
