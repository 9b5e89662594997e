"""Well-known models as data: their published config.json numbers as `Arch`.

Counts are for the model a user deploys: the causal LM (untied head counted)
for decoders, `BertModel` with its pooler for BERT. Lookup is case-insensitive
and ignores dashes, underscores and spaces ("Llama-2-7B", "llama2_7b" and
"meta-llama/Llama-2-7b-hf" all find llama-2-7b); an unknown name is a
ValueError that lists the closest known ones.
"""
from __future__ import annotations

from .arch import Arch
from .lookup import build_index, find, key


def _gpt2(name: str, d: int, layers: int, heads: int, ctx: int = 1024, family: str = "gpt2") -> Arch:
    return Arch(name=name, family=family, vocab_size=50257, hidden_size=d, num_layers=layers,
                num_heads=heads, num_kv_heads=heads, head_dim=d // heads, intermediate_size=4 * d,
                max_context=ctx, tied_embeddings=True, gated_mlp=False, biases="all",
                norm="layernorm", learned_positions=True)


def _bert(name: str, d: int, layers: int, heads: int, inter: int) -> Arch:
    return Arch(name=name, family="bert", vocab_size=30522, hidden_size=d, num_layers=layers,
                num_heads=heads, num_kv_heads=heads, head_dim=d // heads, intermediate_size=inter,
                max_context=512, tied_embeddings=True, gated_mlp=False, biases="all",
                norm="layernorm", learned_positions=True, type_vocab_size=2, pooler=True)


def _llama(name: str, vocab: int, d: int, layers: int, heads: int, kv: int, inter: int, ctx: int,
           family: str = "llama") -> Arch:
    return Arch(name=name, family=family, vocab_size=vocab, hidden_size=d, num_layers=layers,
                num_heads=heads, num_kv_heads=kv, head_dim=d // heads, intermediate_size=inter,
                max_context=ctx, tied_embeddings=False, gated_mlp=True, biases="none", norm="rmsnorm")


PRESETS: dict[str, Arch] = {a.name: a for a in (
    # openai-community/gpt2{,-medium,-large,-xl} config.json
    _gpt2("gpt2", 768, 12, 12),
    _gpt2("gpt2-medium", 1024, 24, 16),
    _gpt2("gpt2-large", 1280, 36, 20),
    _gpt2("gpt2-xl", 1600, 48, 25),
    # google-bert/bert-{base,large}-uncased config.json
    _bert("bert-base", 768, 12, 12, 3072),
    _bert("bert-large", 1024, 24, 16, 4096),
    # sentence-transformers/all-MiniLM-L6-v2 config.json (the built-in `minilm`)
    _bert("minilm", 384, 6, 12, 1536),
    # meta-llama/Llama-2-{7b,13b,70b}-hf config.json
    _llama("llama-2-7b", 32000, 4096, 32, 32, 32, 11008, 4096),
    _llama("llama-2-13b", 32000, 5120, 40, 40, 40, 13824, 4096),
    _llama("llama-2-70b", 32000, 8192, 80, 64, 8, 28672, 4096),
    # meta-llama/Meta-Llama-3-{8B,70B} config.json
    _llama("llama-3-8b", 128256, 4096, 32, 32, 8, 14336, 8192),
    _llama("llama-3-70b", 128256, 8192, 80, 64, 8, 28672, 8192),
    # mistralai/Mistral-7B-v0.1 config.json (sliding window 4096 within 32768 positions)
    _llama("mistral-7b", 32000, 4096, 32, 32, 8, 14336, 32768, family="mistral"),
    # microsoft/Phi-3-mini-4k-instruct config.json (fused qkv_proj and gate_up_proj)
    _llama("phi-3-mini", 32064, 3072, 32, 32, 32, 8192, 4096, family="phi3"),
    # Brown et al. 2020, Table 2.1: 96 layers, d_model 12288, 96 heads of 128, context 2048;
    # GPT-2's layout and its 50257-token vocabulary (tied), d_ff = 4 d_model
    _gpt2("gpt-3-175b", 12288, 96, 96, ctx=2048, family="gpt3"),
)}

SOURCES: dict[str, str] = {
    "gpt2": "openai-community/gpt2 config.json",
    "gpt2-medium": "openai-community/gpt2-medium config.json",
    "gpt2-large": "openai-community/gpt2-large config.json",
    "gpt2-xl": "openai-community/gpt2-xl config.json",
    "bert-base": "google-bert/bert-base-uncased config.json (BertModel with pooler)",
    "bert-large": "google-bert/bert-large-uncased config.json (BertModel with pooler)",
    "minilm": "sentence-transformers/all-MiniLM-L6-v2 config.json (BertModel with pooler)",
    "llama-2-7b": "meta-llama/Llama-2-7b-hf config.json",
    "llama-2-13b": "meta-llama/Llama-2-13b-hf config.json",
    "llama-2-70b": "meta-llama/Llama-2-70b-hf config.json",
    "llama-3-8b": "meta-llama/Meta-Llama-3-8B config.json",
    "llama-3-70b": "meta-llama/Meta-Llama-3-70B config.json",
    "mistral-7b": "mistralai/Mistral-7B-v0.1 config.json",
    "phi-3-mini": "microsoft/Phi-3-mini-4k-instruct config.json",
    "gpt-3-175b": "Brown et al. 2020 (Language Models are Few-Shot Learners), Table 2.1",
}

ALIASES: dict[str, str] = {
    "gpt2-small": "gpt2", "gpt-2": "gpt2", "openai-community/gpt2": "gpt2", "gpt2-124m": "gpt2",
    "gpt2-355m": "gpt2-medium", "gpt2-774m": "gpt2-large", "gpt2-1.5b": "gpt2-xl",
    "bert": "bert-base", "bert-base-uncased": "bert-base", "bert-base-cased": "bert-base",
    "bert-large-uncased": "bert-large", "bert-large-cased": "bert-large",
    "all-minilm-l6-v2": "minilm", "minilm-l6": "minilm", "minilm-l6-h384": "minilm",
    "llama-2-7b-chat": "llama-2-7b",
    "llama-2-13b-chat": "llama-2-13b", "llama-2-70b-chat": "llama-2-70b",
    "meta-llama-3-8b": "llama-3-8b", "llama-3-8b-instruct": "llama-3-8b",
    "meta-llama-3-70b": "llama-3-70b", "llama-3-70b-instruct": "llama-3-70b",
    "mistral": "mistral-7b", "mistral-7b-v0.1": "mistral-7b",
    "phi-3": "phi-3-mini", "phi-3-mini-4k": "phi-3-mini", "phi-3-mini-4k-instruct": "phi-3-mini",
    "gpt-3": "gpt-3-175b", "gpt3-175b": "gpt-3-175b", "davinci": "gpt-3-175b",
}


_INDEX = build_index(PRESETS, ALIASES)


def is_preset(name: object) -> bool:
    return isinstance(name, str) and key(name) in _INDEX


def get_preset(name: str) -> Arch:
    """The preset called `name` (any spelling or alias); ValueError naming the closest otherwise."""
    return PRESETS[find("model preset", name, _INDEX, PRESETS)]
