"""A resized transformers model (structured pruning) as a directory transformers loads.

transformers builds a model from its config alone, and a config cannot say "3 heads in
layer 0, 4 in layer 1" or "MLP width 40 here, 48 there" (transformers 5 also derives the
head size as hidden_size / num_heads and ignores pruned_heads). So when the model's shapes
differ from a model freshly built from its config, the export adds transformers' standard
mechanism for custom architectures:

- config.json gets "shrink_resized" (`shrink.surgery.shapes.resized_modules`: which
  modules have which sizes, which attention attributes differ, which layer lists are
  shorter), "auto_map" (AutoModel and every Auto class that maps to the model's own class,
  e.g. AutoModelForCausalLM, -> shrink_resized.ShrinkResized<Class>) and "architectures";
- shrink_resized.py, generated from hf_resized_template.py with only the base class name
  substituted: a subclass that builds the model as usual, then puts modules of the recorded
  sizes in place. It imports only torch and transformers.

`AutoModel.from_pretrained(path, trust_remote_code=True)` then loads the directory (offline,
from the local files). A model whose shapes match its config is written as before.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from shrink.surgery.shapes import resized_modules

MODULE_FILE = "shrink_resized.py"
CONFIG_KEY = "shrink_resized"
TEMPLATE = Path(__file__).with_name("hf_resized_template.py")
PLACEHOLDER = "__BASE__"
# module records the template rebuilds (its MODULE_TYPES; a test keeps the two equal)
MODULE_TYPES = ("Linear", "Conv1D", "Embedding", "Identity")


def transformers_base(model: nn.Module) -> type:
    """The transformers class the model is (or derives from: a model loaded with remote code)."""
    import transformers

    for cls in type(model).__mro__:
        if cls.__name__.isidentifier() and getattr(transformers, cls.__name__, None) is cls \
                and issubclass(cls, transformers.PreTrainedModel):
            return cls
    raise ValueError(f"safetensors export: {type(model).__name__} is not a transformers model class, so no "
                     "remote code can rebuild its pruned shapes; use --format safetensors:packed")


def resized_description(model: nn.Module) -> dict | None:
    """`resized_modules(model, fresh)` with fresh the model's transformers class built from its
    config (on the meta device), or None when every shape and attribute matches. Raises
    ValueError for a record the generated code cannot rebuild."""
    base = transformers_base(model)
    with torch.device("meta"):
        fresh = base._from_config(copy.deepcopy(model.config))
    desc = resized_modules(model, fresh)
    if not (desc["layers"] or desc["modules"] or desc["attributes"]):
        return None
    bad = {name: d["type"] for name, d in desc["modules"].items() if d["type"] not in MODULE_TYPES}
    if bad:
        shown = ", ".join(f"{n} ({t})" for n, t in list(bad.items())[:3])
        raise ValueError(f"safetensors export: {len(bad)} resized modules are of a type the generated "
                         f"transformers code does not rebuild (it knows {', '.join(MODULE_TYPES)}): {shown}; "
                         "use --format safetensors:packed (shrink.load rebuilds them)")
    return desc


def modeling_code(base_name: str) -> str:
    """shrink_resized.py for a subclass of transformers.<base_name>."""
    import transformers

    cls = getattr(transformers, base_name, None) if base_name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(f"safetensors export: {base_name!r} is not a transformers model class")
    return TEMPLATE.read_text(encoding="utf-8").replace(PLACEHOLDER, base_name)


def auto_classes(base: type, config) -> list[str]:
    """AutoModel, and every transformers Auto class whose mapping gives `base` for this config."""
    import transformers

    found = {"AutoModel"}
    for name in dir(transformers):
        if not name.startswith("AutoModel"):
            continue
        mapping = getattr(getattr(transformers, name, None), "_model_mapping", None)
        try:
            if mapping is not None and mapping[type(config)] is base:
                found.add(name)
        except (KeyError, ValueError, ImportError, AttributeError):
            continue
    return sorted(found)


def add_remote_code(model: nn.Module, directory: Path, desc: dict) -> str:
    """Write shrink_resized.py into `directory` (saved by save_pretrained) and point its
    config.json at it. Returns the class name."""
    base = transformers_base(model)
    name = f"ShrinkResized{base.__name__}"
    (directory / MODULE_FILE).write_text(modeling_code(base.__name__), encoding="utf-8")
    path = directory / "config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    ref = f"{Path(MODULE_FILE).stem}.{name}"
    cfg["auto_map"] = {auto: ref for auto in auto_classes(base, model.config)}
    cfg["architectures"] = [name]
    cfg[CONFIG_KEY] = desc
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return name


def has_remote_code(directory: Path) -> bool:
    try:
        cfg = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and bool(cfg.get("auto_map"))
