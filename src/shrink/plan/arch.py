"""A transformer's architecture numbers, and its exact parameter count from them.

`Arch` is what `shrink plan` needs to know about a model without its weights:
every weight matrix with its shape (so per-channel and per-group quantization
overhead is exact: rows = out_features, groups run along in_features), the
embedding table, and the small rest (norms, biases, learned positions). The
counts equal transformers' own (`sum(p.numel())` with tied weights counted
once); the tests check that on the meta device for every preset.

`from_hf_config` reads a Hugging Face config.json (llama, mistral, qwen2, phi3,
gpt2, bert); a field it needs and cannot find is a one-line ValueError.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, NamedTuple

FAMILIES = ("llama", "mistral", "qwen2", "phi3", "gpt2", "gpt3", "bert")
BIASES = ("none", "qkv", "attention", "mlp", "all")
NORMS = ("rmsnorm", "layernorm")

# Module names as transformers spells them, per layout; roles absent from a
# layout are never produced for it.
_LLAMA = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
          "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
          "down": "mlp.down_proj"}
_NAMES: dict[str, dict[str, str]] = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA,
    "phi3": {"qkv": "self_attn.qkv_proj", "o": "self_attn.o_proj",
             "gate_up": "mlp.gate_up_proj", "down": "mlp.down_proj"},
    "gpt2": {"qkv": "attn.c_attn", "o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"},
    "bert": {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
             "o": "attention.output.dense", "up": "intermediate.dense", "down": "output.dense"},
}
_NAMES["gpt3"] = _NAMES["gpt2"]
_BIASED = {
    "none": set(),
    "qkv": {"q", "k", "v", "qkv"},
    "attention": {"q", "k", "v", "qkv", "o"},
    "mlp": {"gate", "up", "gate_up", "down"},
    "all": {"q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down"},
}


class LinearShape(NamedTuple):
    """One weight matrix, repeated `count` times (once per layer): [out_features, in_features]."""
    name: str
    out_features: int
    in_features: int
    count: int

    @property
    def params(self) -> int:
        return self.out_features * self.in_features * self.count


@dataclass(frozen=True)
class Arch:
    """Architecture numbers of a transformer; `params()` is its exact parameter count.

    biases: which linear layers carry a bias — "none" (Llama), "qkv" (Qwen2),
    "attention" (q, k, v, o), "mlp", "all" (GPT-2, BERT). The LM head never has one.
    norm: "rmsnorm" (a weight per channel) or "layernorm" (weight and bias);
    there are 2 per layer plus one (final norm, or BERT's embedding norm).
    """
    name: str
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_context: int | None
    tied_embeddings: bool
    gated_mlp: bool
    biases: str
    norm: str
    learned_positions: bool = False   # a [max_context, hidden] position table (GPT-2, BERT)
    type_vocab_size: int = 0          # BERT's token-type (segment) table
    pooler: bool = False              # BERT's pooler: a hidden x hidden dense with bias

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"arch {self.name!r}: family {self.family!r} is not one of {', '.join(FAMILIES)}")
        if self.biases not in BIASES:
            raise ValueError(f"arch {self.name!r}: biases {self.biases!r} is not one of {', '.join(BIASES)}")
        if self.norm not in NORMS:
            raise ValueError(f"arch {self.name!r}: norm {self.norm!r} is not one of {', '.join(NORMS)}")
        for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                      "head_dim", "intermediate_size"):
            _check_positive(getattr(self, field), f"arch {self.name!r}: {field}")
        if self.max_context is not None:
            _check_positive(self.max_context, f"arch {self.name!r}: max_context")
        if self.type_vocab_size < 0 or isinstance(self.type_vocab_size, bool):
            raise ValueError(f"arch {self.name!r}: type_vocab_size must be >= 0, got {self.type_vocab_size!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"arch {self.name!r}: num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if self.learned_positions and self.max_context is None:
            raise ValueError(f"arch {self.name!r}: learned position embeddings need max_context")
        if self.gated_mlp and self.family in ("gpt2", "gpt3", "bert"):
            raise ValueError(f"arch {self.name!r}: the {self.family} layout has no gated MLP")

    # -- shapes -------------------------------------------------------------
    def _linears(self) -> list[tuple[str, LinearShape, bool]]:
        """(role, shape, has_bias) for every weight matrix."""
        names, biased, L = _NAMES[self.family], _BIASED[self.biases], self.num_layers
        d, inter = self.hidden_size, self.intermediate_size
        q_out, kv_out = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        rows: list[tuple[str, int, int]] = []
        if "qkv" in names:
            rows.append(("qkv", q_out + 2 * kv_out, d))
        else:
            rows += [("q", q_out, d), ("k", kv_out, d), ("v", kv_out, d)]
        rows.append(("o", d, q_out))
        if self.gated_mlp and "gate_up" in names:
            rows.append(("gate_up", 2 * inter, d))
        elif self.gated_mlp:
            rows += [("gate", inter, d), ("up", inter, d)]
        else:
            rows.append(("up", inter, d))
        rows.append(("down", d, inter))
        out = [(role, LinearShape(names[role], o, i, L), role in biased) for role, o, i in rows]
        if self.pooler:
            out.append(("pooler", LinearShape("pooler.dense", d, d, 1), True))
        if not self.tied_embeddings:
            out.append(("lm_head", LinearShape("lm_head", self.vocab_size, d, 1), False))
        return out

    def linear_shapes(self) -> list[LinearShape]:
        """Every weight matrix as (name, out_features, in_features, count), the untied LM head included."""
        return [shape for _, shape, _ in self._linears()]

    def linear_params(self) -> int:
        """Weights of all linear layers (what a weight-quantization recipe compresses)."""
        return sum(s.params for s in self.linear_shapes())

    def embedding_params(self) -> int:
        """The token embedding table (vocab x hidden); with tied embeddings it is also the LM head."""
        return self.vocab_size * self.hidden_size

    def bias_params(self) -> int:
        return sum(shape.out_features * shape.count for _, shape, has in self._linears() if has)

    def norm_params(self) -> int:
        per_norm = self.hidden_size * (2 if self.norm == "layernorm" else 1)
        return (2 * self.num_layers + 1) * per_norm

    def other_params(self) -> int:
        """Norms, biases, learned position and token-type tables: usually kept in 16 bits."""
        positions = self.max_context * self.hidden_size if self.learned_positions else 0
        return (self.norm_params() + self.bias_params() + positions
                + self.type_vocab_size * self.hidden_size)

    def params(self) -> int:
        """Exact parameter count, tied weights counted once."""
        return self.linear_params() + self.embedding_params() + self.other_params()

    # -- derived figures ----------------------------------------------------
    @property
    def is_decoder(self) -> bool:
        return self.family != "bert"

    def kv_cache_elements_per_token(self) -> int:
        """Keys and values cached per token: 2 x layers x kv_heads x head_dim (0 for an encoder)."""
        if not self.is_decoder:
            return 0
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim

    # -- reading a Hugging Face config ---------------------------------------
    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any] | str | Path, name: str | None = None) -> "Arch":
        """An Arch from a config.json: a dict, the file, the model directory, or a .safetensors beside it."""
        cfg, where = _load_config(config)
        return _parse_config(cfg, where, name)


def from_hf_config(config: Mapping[str, Any] | str | Path, name: str | None = None) -> Arch:
    return Arch.from_hf_config(config, name)


def _check_positive(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return value


def _load_config(config: Mapping[str, Any] | str | Path) -> tuple[Mapping[str, Any], str]:
    if isinstance(config, Mapping):
        return config, "config"
    path = Path(config)
    if path.is_dir():
        path = path / "config.json"
    elif path.suffix == ".safetensors":  # a weights file with its config beside it
        path = path.with_name("config.json")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; a model directory needs its config.json")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(cfg).__name__}")
    return cfg, str(path)


_ARCHITECTURE_TYPES = {"Llama": "llama", "Mistral": "mistral", "Qwen2": "qwen2", "Phi3": "phi3",
                       "GPT2": "gpt2", "Bert": "bert"}


def _model_type(cfg: Mapping[str, Any], where: str) -> str:
    kind = cfg.get("model_type")
    if kind is None:  # older files name only the class: "architectures": ["LlamaForCausalLM"]
        for arch in cfg.get("architectures") or []:
            for prefix, family in _ARCHITECTURE_TYPES.items():  # not Qwen2Moe..., only Qwen2For...
                if isinstance(arch, str) and re.match(rf"{prefix}(For|Model|LMHead)", arch):
                    return family
        raise ValueError(f"{where}: 'model_type' is missing; shrink needs it to count parameters")
    return str(kind)


def _parse_config(cfg: Mapping[str, Any], where: str, name: str | None) -> Arch:
    kind = _model_type(cfg, where)

    def need(*keys: str) -> int:  # the first key present; all are spellings of one field
        for key in keys:
            if cfg.get(key) is not None:
                return _check_positive(cfg[key], f"{where}: {key!r}")
        raise ValueError(f"{where}: {keys[0]!r} is missing; shrink needs it to count parameters")

    def optional(key: str, default: int | None) -> int | None:
        value = cfg.get(key)
        return default if value is None else _check_positive(value, f"{where}: {key!r}")

    label = name or str(cfg.get("_name_or_path") or kind)
    if kind in ("llama", "mistral", "qwen2", "phi3"):
        hidden, heads = need("hidden_size"), need("num_attention_heads")
        head_dim = optional("head_dim", None) or _divide(hidden, heads, where)
        if kind == "qwen2":
            biases = "qkv"
        elif kind == "llama":
            attn, mlp = bool(cfg.get("attention_bias")), bool(cfg.get("mlp_bias"))
            biases = {(False, False): "none", (True, False): "attention",
                      (False, True): "mlp", (True, True): "all"}[(attn, mlp)]
        else:
            biases = "none"
        return Arch(name=label, family=kind, vocab_size=need("vocab_size"), hidden_size=hidden,
                    num_layers=need("num_hidden_layers"), num_heads=heads,
                    num_kv_heads=optional("num_key_value_heads", heads), head_dim=head_dim,
                    intermediate_size=need("intermediate_size"),
                    max_context=optional("max_position_embeddings", None),
                    tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                    gated_mlp=True, biases=biases, norm="rmsnorm")
    if kind == "gpt2":
        hidden, heads = need("n_embd", "hidden_size"), need("n_head", "num_attention_heads")
        return Arch(name=label, family="gpt2", vocab_size=need("vocab_size"), hidden_size=hidden,
                    num_layers=need("n_layer", "num_hidden_layers"), num_heads=heads, num_kv_heads=heads,
                    head_dim=_divide(hidden, heads, where),
                    intermediate_size=optional("n_inner", None) or 4 * hidden,
                    max_context=need("n_positions", "max_position_embeddings"),
                    tied_embeddings=bool(cfg.get("tie_word_embeddings", True)),
                    gated_mlp=False, biases="all", norm="layernorm", learned_positions=True)
    if kind == "bert":
        position = cfg.get("position_embedding_type", "absolute")
        if position not in (None, "absolute"):
            raise ValueError(f"{where}: position_embedding_type {position!r} is not supported "
                             "(shrink counts 'absolute' BERT models)")
        hidden, heads = need("hidden_size"), need("num_attention_heads")
        type_vocab = cfg.get("type_vocab_size", 2)
        if isinstance(type_vocab, bool) or not isinstance(type_vocab, int) or type_vocab < 0:
            raise ValueError(f"{where}: 'type_vocab_size' must be a whole number >= 0, got {type_vocab!r}")
        return Arch(name=label, family="bert", vocab_size=need("vocab_size"), hidden_size=hidden,
                    num_layers=need("num_hidden_layers"), num_heads=heads, num_kv_heads=heads,
                    head_dim=_divide(hidden, heads, where), intermediate_size=need("intermediate_size"),
                    max_context=need("max_position_embeddings"), tied_embeddings=True,
                    gated_mlp=False, biases="all", norm="layernorm", learned_positions=True,
                    type_vocab_size=type_vocab, pooler=True)
    raise ValueError(f"{where}: model_type {kind!r} is not supported (shrink counts llama, mistral, "
                     "qwen2, phi3, gpt2, bert); give the parameter count with --params instead")


def _divide(hidden: int, heads: int, where: str) -> int:
    if hidden % heads:
        raise ValueError(f"{where}: hidden size {hidden} is not a multiple of the {heads} attention heads; "
                         "give 'head_dim'")
    return hidden // heads
