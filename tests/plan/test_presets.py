"""Model presets: published numbers, lookup by any spelling, helpful misses."""
from __future__ import annotations

import pytest

from shrink.plan.lookup import key
from shrink.plan.presets import ALIASES, PRESETS, SOURCES, get_preset, is_preset

# Exact counts; every one but gpt-3-175b is also checked against transformers on
# the meta device in test_arch.py (GPT-3 too, through GPT-2's identical layout).
EXACT = {
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
    "bert-base": 109_482_240,
    "bert-large": 335_141_888,
    "minilm": 22_713_216,
    "llama-2-7b": 6_738_415_616,
    "llama-2-13b": 13_015_864_320,
    "llama-2-70b": 68_976_648_192,
    "llama-3-8b": 8_030_261_248,
    "llama-3-70b": 70_553_706_496,
    "mistral-7b": 7_241_732_096,
    "phi-3-mini": 3_821_079_552,
    "gpt-3-175b": 174_604_259_328,
}


def test_every_preset_has_an_exact_count_and_a_source():
    assert set(PRESETS) == set(EXACT) == set(SOURCES)
    for name, arch in PRESETS.items():
        assert arch.name == name
        assert arch.params() == EXACT[name], name


def test_gpt3_is_the_papers_175b():
    a = PRESETS["gpt-3-175b"]
    assert (a.num_layers, a.hidden_size, a.num_heads, a.head_dim, a.max_context, a.vocab_size) == \
        (96, 12288, 96, 128, 2048, 50257)
    assert 174e9 < a.params() < 175.5e9
    # 12 d^2 per layer is the paper's rule of thumb; the exact count adds embeddings, biases, norms
    assert a.linear_params() == 12 * 96 * 12288 ** 2


def test_seed_rules_of_thumb():
    # seed 004: "LLaMA-7B: 28GB" in FP32 -> 3.5 GB at 4 bits (decimal GB)
    p = PRESETS["llama-2-7b"].params()
    assert round(p * 4 / 1e9) == 27 and round(p * 0.5 / 1e9, 1) == 3.4
    # seed 004: "BERT: 440MB" in FP32
    assert round(PRESETS["bert-base"].params() * 4 / 1e6, -1) == 440


@pytest.mark.parametrize("spelling, name", [
    ("llama-2-7b", "llama-2-7b"), ("Llama-2-7B", "llama-2-7b"), ("llama2-7b", "llama-2-7b"),
    ("LLAMA2_7B", "llama-2-7b"), ("meta-llama/Llama-2-7b-hf", "llama-2-7b"), ("llama-2-70b", "llama-2-70b"),
    ("Meta-Llama-3-8B", "llama-3-8b"), ("llama3-70b", "llama-3-70b"), ("Mistral-7B-v0.1", "mistral-7b"),
    ("phi3-mini", "phi-3-mini"), ("microsoft/Phi-3-mini-4k-instruct", "phi-3-mini"),
    ("GPT2", "gpt2"), ("gpt-2", "gpt2"), ("gpt2_xl", "gpt2-xl"), ("bert-base-uncased", "bert-base"),
    ("all-MiniLM-L6-v2", "minilm"), ("GPT-3", "gpt-3-175b"), ("gpt3-175b", "gpt-3-175b"),
])
def test_lookup_any_spelling(spelling, name):
    assert get_preset(spelling) is PRESETS[name]
    assert is_preset(spelling)


def test_spellings_do_not_collide():
    keys = [key(n) for n in PRESETS]
    assert len(keys) == len(set(keys))
    for alias, target in ALIASES.items():
        assert get_preset(alias) is PRESETS[target], alias


@pytest.mark.parametrize("typo, first", [
    ("lama-2-7b", "llama-2-7b"), ("llama-2-7", "llama-2-7b"), ("mistral-8b", "mistral-7b"),
    ("bert-bass", "bert-base"), ("gpt2-larg", "gpt2-large"), ("phi-3-mni", "phi-3-mini"),
])
def test_unknown_names_suggest_the_closest(typo, first):
    with pytest.raises(ValueError) as e:
        get_preset(typo)
    msg = str(e.value)
    assert msg.startswith(f"unknown model preset {typo!r}; closest: {first}")
    assert "\n" not in msg
    assert not is_preset(typo)


def test_nothing_close_lists_the_known():
    with pytest.raises(ValueError, match=r"known: gpt2, .*llama-2-7b"):
        get_preset("zzzz")


@pytest.mark.parametrize("bad", ["", "   ", None, 7])
def test_empty_or_not_a_name(bad):
    with pytest.raises(ValueError, match="non-empty string"):
        get_preset(bad)
