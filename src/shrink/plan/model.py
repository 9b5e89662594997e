"""What `shrink plan` is planning for: a preset, a config, a file, or a bare count."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .arch import Arch, from_hf_config
from .numbers import parse_count
from .presets import get_preset, is_preset


@dataclass(frozen=True)
class ModelInfo:
    name: str
    params: int
    arch: Arch | None     # None: only a parameter count (--params), no architecture
    source: str           # where the numbers came from


def resolve_model(model: str | Path | Arch | None = None, params: object = None) -> ModelInfo:
    """A preset name, a Hugging Face config.json / model directory / .safetensors with
    its config beside it, an Arch, or only --params."""
    if model is not None and params is not None:
        raise ValueError("give a MODEL or --params, not both (the model's own count is exact)")
    if model is None:
        if params is None:
            raise ValueError("nothing to plan: give a MODEL (a preset such as llama-2-7b, or a "
                             "config.json / model directory) or --params N (e.g. 7B)")
        n = parse_count(params, "--params")
        return ModelInfo(name=f"{_short(n)} parameters", params=n, arch=None, source="--params")
    if isinstance(model, Arch):
        return ModelInfo(model.name, model.params(), model, "architecture given")
    text = str(model)
    path = Path(text)
    if path.exists():
        if path.suffix == ".gguf":
            raise ValueError(f"{path}: planning from a .gguf file is not supported yet; "
                             "point at the Hugging Face directory or config.json instead")
        arch = from_hf_config(path, name=path.stem if path.is_file() and path.name != "config.json"
                              else (path.parent.name if path.is_file() else path.name))
        return ModelInfo(arch.name, arch.params(), arch, f"{path} (config.json)")
    if is_preset(text):
        arch = get_preset(text)
        return ModelInfo(arch.name, arch.params(), arch, "preset (published config.json numbers)")
    if any(sep in text for sep in ("/", "\\")) or text.endswith((".json", ".safetensors", ".gguf")):
        raise FileNotFoundError(f"{text}: no such file or directory")
    return _preset_or_suggest(text)


def _preset_or_suggest(name: str) -> ModelInfo:
    arch = get_preset(name)  # raises ValueError naming the closest presets
    return ModelInfo(arch.name, arch.params(), arch, "preset")


def _short(n: int) -> str:
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.3g}{suffix}"
    return str(n)
