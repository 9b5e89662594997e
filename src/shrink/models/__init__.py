"""Model sources: built-in names and files on disk.

`load(name_or_path)` gives an nn.Module in eval mode; `load_tokenizer` the
tokenizer of a text model. Heavy libraries (transformers, scikit-learn) are
imported on first use, so importing this package stays light.
"""
from shrink.models.io import BUILTIN_NAMES, cache_root, load, load_tokenizer, models_cache
from shrink.models.zoo import minilm_dir, read_safetensors

__all__ = [
    "BUILTIN_NAMES", "cache_root", "load", "load_tokenizer", "minilm_dir", "models_cache", "read_safetensors",
]
