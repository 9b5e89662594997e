"""The Llama-shaped model of issue 9's peer comparisons, built from a config (no download).

hidden 1024, intermediate 2816, 24 layers, 16 heads, vocab 32000: about 374M parameters
with untied embeddings. Weights are transformers' own random initialisation under a
fixed seed (the issue allows random weights), so every tool sees the same model.
"""
from __future__ import annotations

import torch


def config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                       num_attention_heads=16, num_key_value_heads=16, vocab_size=32000,
                       max_position_embeddings=2048, tie_word_embeddings=False)


def build(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A LlamaForCausalLM with the shape above and seeded random weights, in eval mode."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(config()).to(dtype).eval()
    return model


def save(path: str, seed: int = 0) -> str:
    """Write it as a Hugging Face directory (config.json + model.safetensors) for other tools."""
    build(seed).save_pretrained(path)
    return path


if __name__ == "__main__":
    m = build()
    print(f"{sum(p.numel() for p in m.parameters()) / 1e6:.1f}M parameters")
