"""Model sources: built-in names and files on disk."""
from shrink.models.zoo import minilm_dir, read_safetensors

__all__ = ["minilm_dir", "read_safetensors"]
