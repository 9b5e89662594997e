"""Attention-head removal: the pruned model computes exactly what the original computes with
the removed heads' output-projection columns zeroed; configs that can say it round-trip
through plain transformers."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from shrink.surgery import get_module
from shrink.surgery.heads import AttentionGroup, find_attention, remove_heads, update_config
from shrink.surgery.shrink_dims import find_neuron_groups, remove_layers, remove_units, unit_columns

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

from tests_support import n_params, tiny_bert as bert, tiny_gpt2 as gpt2, tiny_llama as llama  # noqa: E402

TOKENS = torch.randint(2, 64, (2, 9), generator=torch.Generator().manual_seed(1))


def outputs(m, mask=None):
    with torch.no_grad():
        out = m(TOKENS, attention_mask=mask)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def masked(model: nn.Module, group: AttentionGroup, keep: list[int]) -> nn.Module:
    """The original with the o-projection input columns of the removed query heads zeroed."""
    out = copy.deepcopy(model)
    g = group.group_size
    drop = torch.tensor([h for u in range(group.units) if u not in keep for h in range(u * g, (u + 1) * g)])
    cols = unit_columns(drop, group.head_dim)
    o = get_module(out, group.o)
    with torch.no_grad():
        if type(o).__name__ == "Conv1D":
            o.weight[cols, :] = 0  # Conv1D stores [in, out]
        else:
            o.weight[:, cols] = 0
    return out


def test_find_attention_per_arch():
    a = find_attention(llama())[2]
    assert (a.name, a.layer, a.arch, a.q, a.o) == ("model.layers.2.self_attn", 2, "llama",
                                                    "model.layers.2.self_attn.q_proj", "model.layers.2.self_attn.o_proj")
    assert (a.num_heads, a.num_kv_heads, a.head_dim, a.units, a.group_size) == (4, 2, 8, 2, 2)
    g = find_attention(gpt2())[0]
    assert (g.arch, g.q, g.k, g.v, g.o, g.num_heads) == ("gpt2", *["transformer.h.0.attn.c_attn"] * 3,
                                                         "transformer.h.0.attn.c_proj", 4)
    b = find_attention(bert())[1]
    assert (b.name, b.arch, b.k, b.o, b.units) == ("encoder.layer.1.attention", "bert",
                                                  "encoder.layer.1.attention.self.key",
                                                  "encoder.layer.1.attention.output.dense", 4)


@pytest.mark.parametrize("build, keep", [
    (llama, [1]),                                  # GQA: one KV group of two query heads
    (lambda: llama(num_key_value_heads=4), [0, 3]),  # MHA
    (gpt2, [0, 2]),
    (bert, [1, 2, 3]),
])
def test_head_removal_equals_masked_and_shrinks(build, keep):
    model = build()
    group = find_attention(model)[1]
    mask = torch.tensor([[1] * 9, [1] * 6 + [0] * 3])
    ref = outputs(masked(model, group, keep), mask)
    assert not torch.allclose(outputs(model, mask), ref, atol=1e-3)
    before = n_params(model)
    remove_heads(model, group, keep)
    hidden, hd, g = model.config.hidden_size, group.head_dim, group.group_size
    gone_q, gone_kv = (group.units - len(keep)) * g, group.units - len(keep)
    bias = 0 if group.arch == "llama" else 1
    expected = gone_q * hd * (hidden + bias) + 2 * gone_kv * hd * (hidden + bias) + gone_q * hd * hidden
    assert n_params(model) == before - expected
    assert torch.allclose(outputs(model, mask), ref, atol=1e-5)
    now = find_attention(model)[1]
    assert (now.num_heads, now.num_kv_heads) == (len(keep) * g, len(keep))


def test_real_minilm_heads_by_row_norm():
    from shrink.models.io import load

    model = load("minilm")
    group = find_attention(model)[0]
    q = get_module(model, group.q).weight.detach()
    scores = q.view(group.num_heads, -1).norm(dim=1)
    keep = sorted(scores.argsort(descending=True)[:8].tolist())
    tokens = torch.randint(1000, 5000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = masked(model, group, keep)(tokens).last_hidden_state
        remove_heads(model, group, keep)
        got = model(tokens).last_hidden_state
    assert model.encoder.layer[0].attention.self.query.out_features == 8 * 32
    assert torch.allclose(got, ref, atol=1e-5)


def test_llama_generate_with_cache_after_nonuniform_heads_and_layers():
    model = llama(num_hidden_layers=4)
    for group, keep in zip(find_attention(model), ([0], [1], [0, 1], [0])):
        remove_heads(model, group, keep)
    remove_layers(model, [1])
    assert [a.num_heads for a in find_attention(model)] == [2, 4, 2]
    cached = model.generate(TOKENS, max_new_tokens=5, do_sample=False, use_cache=True)
    plain = model.generate(TOKENS, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)


def test_gpt2_generate_with_cache_after_heads():
    model = gpt2()
    for group in find_attention(model):
        remove_heads(model, group, [1, 3])
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=1)
    assert torch.equal(model.generate(TOKENS, use_cache=True, **kw), model.generate(TOKENS, use_cache=False, **kw))


@pytest.mark.parametrize("build, what", [(llama, "KV group"), (gpt2, "head"), (bert, "head")])
def test_removing_every_head_names_the_layer(build, what):
    model = build()
    group = find_attention(model)[2]
    with pytest.raises(ValueError, match=f"removing every {what} of {group.name}"):
        remove_heads(model, group, [])
    with pytest.raises(ValueError, match="must be in"):
        remove_heads(model, group, [group.units])


# ---------------------------------------------------------------- configs

def _reload(model, tmp_path):
    model.save_pretrained(tmp_path)
    return type(model).from_pretrained(tmp_path).eval()


def test_llama_heads_and_mlp_round_trip_through_transformers(tmp_path):
    model = llama()
    for group in find_attention(model):
        remove_heads(model, group, [1])
    for g in find_neuron_groups(model):
        remove_units(model, g, torch.arange(0, 48, 2))
    remove_layers(model, [0])
    assert update_config(model)["config_loadable"] is True
    c = model.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size,
            c.num_hidden_layers) == (2, 1, 8, 24, 2)
    back = _reload(model, tmp_path)
    assert n_params(back) == n_params(model)
    assert torch.allclose(outputs(back), outputs(model), atol=1e-6)
    kw = dict(max_new_tokens=4, do_sample=False)
    assert torch.equal(back.generate(TOKENS, **kw), model.generate(TOKENS, **kw))


@pytest.mark.parametrize("build, key", [(gpt2, "n_inner"), (bert, "intermediate_size")])
def test_mlp_only_round_trips_through_transformers(tmp_path, build, key):
    model = build()
    for g in find_neuron_groups(model):
        remove_units(model, g, torch.arange(20))
    remove_layers(model, [2])
    result = update_config(model)
    assert result["config_loadable"] is True, result
    assert getattr(model.config, key) == 20 and model.config.num_hidden_layers == 2
    back = _reload(model, tmp_path)
    assert torch.allclose(outputs(back), outputs(model), atol=1e-6)


@pytest.mark.parametrize("build", [gpt2, bert])
def test_gpt2_bert_heads_are_not_config_loadable(build):
    model = build()
    for group in find_attention(model):
        remove_heads(model, group, [0, 1])
    result = update_config(model)
    assert result["config_loadable"] is False
    assert "hidden_size / num_attention_heads" in result["reason"] and "pruned_heads" in result["reason"]
    assert model.config.num_attention_heads == 4  # unchanged: 2 would mean heads of size 16


def test_nonuniform_and_layer_scaling_are_reported():
    model = llama()
    remove_heads(model, find_attention(model)[0], [0])
    remove_units(model, find_neuron_groups(model)[2], torch.arange(7))
    result = update_config(model)
    assert result["config_loadable"] is False
    assert "head count differs by layer ([2, 4, 4])" in result["reason"] and "[48, 48, 7]" in result["reason"]
    # GPT-2 scales attention by 1/(layer_idx+1) fixed at build: a removed layer shifts it
    g = gpt2(scale_attn_by_inverse_layer_idx=True)
    remove_layers(g, [0])
    result = update_config(g)
    assert result["config_loadable"] is False and "scaling" in result["reason"]
    assert update_config(nn.Linear(2, 2))["config_loadable"] is False
