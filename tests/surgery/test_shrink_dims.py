"""Neuron/channel and layer removal: the pruned model computes exactly what the original
computes with the removed units' consumer columns zeroed (the "masked" model)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from shrink.surgery import get_module
from shrink.surgery.shrink_dims import (
    NeuronGroup, find_blocks, find_neuron_groups, remove_layers, remove_units, unit_columns,
)

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

from tests_support import n_params, tiny_bert as bert, tiny_gpt2 as gpt2, tiny_llama as llama  # noqa: E402


def zero_inputs(model: nn.Module, name: str, cols: torch.Tensor) -> None:
    """Zero the input columns `cols` of a Linear / Conv1D / Conv2d consumer."""
    m = get_module(model, name)
    with torch.no_grad():
        if type(m).__name__ == "Conv1D":
            m.weight[cols, :] = 0
        else:
            m.weight[:, cols] = 0


def masked(model: nn.Module, group: NeuronGroup, keep: torch.Tensor) -> nn.Module:
    out = copy.deepcopy(model)
    drop = torch.tensor(sorted(set(range(group.width)) - set(keep.tolist())), dtype=torch.long)
    for c in group.consumers:
        m = get_module(out, c)
        cols = m.weight.shape[0] if type(m).__name__ == "Conv1D" else m.weight.shape[1]
        zero_inputs(out, c, unit_columns(drop, cols // group.width))
    return out


def random_keep(width: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randperm(width, generator=torch.Generator().manual_seed(seed))[:n]


TOKENS = torch.randint(2, 64, (2, 9), generator=torch.Generator().manual_seed(1))


def logits(m):
    with torch.no_grad():
        out = m(TOKENS)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


# ---------------------------------------------------------------- transformers MLPs

@pytest.mark.parametrize("build, producers, consumers", [
    (llama, ("gate_proj", "up_proj"), ("down_proj",)),
    (gpt2, ("c_fc",), ("c_proj",)),
    (bert, ("intermediate.dense",), ("output.dense",)),
])
def test_transformer_mlps_are_found_by_structure(build, producers, consumers):
    model = build()
    groups = find_neuron_groups(model)
    assert len(groups) == 3 and all(g.kind == "neurons" for g in groups)
    g = groups[1]
    assert all(p.endswith(x) for p, x in zip(g.producers, producers))
    assert all(c.endswith(x) for c, x in zip(g.consumers, consumers))
    # never the residual stream or the output head
    hidden = model.config.hidden_size
    assert all(g.width != hidden for g in groups)
    assert not any("lm_head" in p or "o_proj" in p or "attn" in p for g in groups for p in g.producers)


@pytest.mark.parametrize("build", [llama, gpt2, bert])
def test_mlp_removal_equals_masked_and_shrinks(build):
    model = build()
    g = find_neuron_groups(model)[1]
    keep = random_keep(g.width, 20)
    ref = logits(masked(model, g, keep))
    assert not torch.allclose(logits(model), ref, atol=1e-3)  # the removed units mattered
    before = n_params(model)
    remove_units(model, g, keep)
    hidden, removed = model.config.hidden_size, g.width - 20
    per_unit = sum(hidden + (get_module(model, p).bias is not None) for p in g.producers) + hidden
    assert n_params(model) == before - removed * per_unit
    assert torch.allclose(logits(model), ref, atol=1e-5)
    assert find_neuron_groups(model)[1].width == 20


def test_llama_generate_after_mlp_and_layer_removal():
    model = llama()
    for g in find_neuron_groups(model):
        remove_units(model, g, torch.arange(0, g.width, 3))
    remove_layers(model, [0])
    cached = model.generate(TOKENS, max_new_tokens=5, do_sample=False, use_cache=True)
    plain = model.generate(TOKENS, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain) and cached.shape == (2, 14)


def test_errors_name_the_group():
    model = llama()
    g = find_neuron_groups(model)[0]
    with pytest.raises(ValueError, match="removing every unit of model.layers.0.mlp"):
        remove_units(model, g, torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match=r"model.layers.0.mlp: keep indices must be in \[0, 48\)"):
        remove_units(model, g, torch.tensor([0, 48]))
    with pytest.raises(ValueError, match="repeated"):
        remove_units(model, g, torch.tensor([1, 1]))
    remove_units(model, g, torch.arange(10))
    with pytest.raises(ValueError, match="find the groups again"):
        remove_units(model, g, torch.arange(5))  # stale: the group still says 48


# ---------------------------------------------------------------- Sequential chains

def test_digits_mlp_groups_and_removal():
    from shrink.models.io import load

    model = load("digits-mlp")
    groups = find_neuron_groups(model)
    assert [(g.producers, g.consumers, g.width) for g in groups] == [(("0",), ("2",), 128), (("2",), ("4",), 64)]
    x = torch.rand(16, 64, generator=torch.Generator().manual_seed(0))
    for g, n in zip(groups, (50, 30)):
        keep = random_keep(g.width, n)
        with torch.no_grad():
            ref = masked(model, g, keep)(x)
        before = n_params(model)
        remove_units(model, g, keep)
        prod, cons = get_module(model, g.producers[0]), get_module(model, g.consumers[0])
        assert n_params(model) == before - (g.width - n) * (prod.in_features + 1 + cons.out_features)
        with torch.no_grad():
            assert torch.allclose(model(x), ref, atol=1e-5)
    assert [m.weight.shape for m in model if isinstance(m, nn.Linear)] == [(50, 64), (30, 50), (10, 30)]


def test_digits_cnn_channels_with_batchnorm_and_flatten():
    from shrink.models.io import load

    model = load("digits-cnn")
    groups = find_neuron_groups(model)
    assert [(g.producers, g.followers, g.consumers, g.kind) for g in groups] == [
        (("1",), ("2",), ("4",), "channels"), (("4",), ("5",), ("9",), "channels")]
    x = torch.rand(16, 64, generator=torch.Generator().manual_seed(0))
    for g, n in zip(groups, (9, 20)):
        keep = random_keep(g.width, n, seed=3)
        with torch.no_grad():
            ref = masked(model, g, keep)(x)
        before = n_params(model)
        prod, cons = get_module(model, g.producers[0]), get_module(model, g.consumers[0])
        per_unit = prod.weight[0].numel() + 1 + 2 + cons.weight.numel() // g.width
        remove_units(model, g, keep)
        assert n_params(model) == before - (g.width - n) * per_unit
        with torch.no_grad():
            assert torch.allclose(model(x), ref, atol=1e-5)
    bn = model[5]
    assert bn.num_features == 20 and bn.running_mean.shape == (20,) and model[9].in_features == 20 * 16


def test_sequential_chain_rules():
    seq = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4),        # LayerNorm: not per unit
                        nn.Linear(4, 6), nn.BatchNorm1d(6), nn.GELU(), nn.Dropout(), nn.Linear(6, 3))
    groups = find_neuron_groups(seq)
    assert [(g.name, g.followers, g.consumers) for g in groups] == [("2", (), ("3",)), ("3", ("4",), ("7",))]
    conv = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=2), nn.ReLU(), nn.Conv2d(8, 4, 1))
    assert [g.name for g in find_neuron_groups(conv)] == []  # grouped convs are neither producer nor consumer
    pooled = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    g, = find_neuron_groups(pooled)
    x = torch.randn(2, 3, 6, 6)
    keep = torch.tensor([1, 4, 6])
    ref = masked(pooled, g, keep)(x)
    remove_units(pooled, g, keep)
    assert torch.allclose(pooled(x), ref, atol=1e-6) and pooled[4].in_features == 3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_dtype_training_mode_and_requires_grad_are_kept(dtype):
    seq = nn.Sequential(nn.Conv2d(2, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4, 3)).to(dtype)
    seq[0].weight.requires_grad_(False)
    g, = find_neuron_groups(seq)
    remove_units(seq, g, [0, 5])
    assert all(t.dtype == dtype for t in (seq[0].weight, seq[1].running_var, seq[4].weight))
    assert seq[1].num_batches_tracked.dtype == torch.long and seq[1].training
    assert not seq[0].weight.requires_grad and seq[4].weight.requires_grad
    assert seq(torch.randn(2, 2, 4, 4, dtype=dtype)).shape == (2, 3)


# ---------------------------------------------------------------- layers

def _identity_layers(model, drop):
    """The original with layers `drop` passing their input through: what removing them computes."""
    ref = copy.deepcopy(model)
    _, layers = find_blocks(ref)
    for i in drop:
        layers[i].register_forward_hook(
            lambda mod, args, kwargs, out: args[0] if args else kwargs["hidden_states"], with_kwargs=True)
    return ref


@pytest.mark.parametrize("build, path", [(llama, "model.layers"), (gpt2, "transformer.h"), (bert, "encoder.layer")])
def test_remove_layers(build, path):
    model = build(**({"scale_attn_by_inverse_layer_idx": True} if build is gpt2 else {}))
    assert find_blocks(model)[0] == path
    ref = logits(_identity_layers(model, [1]))
    per_layer = n_params(find_blocks(model)[1][1])
    before = n_params(model)
    remove_layers(model, [1])
    assert n_params(model) == before - per_layer
    assert model.config.num_hidden_layers == 2 and len(find_blocks(model)[1]) == 2
    idx = [m.layer_idx for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    assert sorted(set(idx)) == [0, 1]
    assert torch.allclose(logits(model), ref, atol=1e-5)
    with pytest.raises(ValueError, match=f"removing every layer of {path}"):
        remove_layers(model, [0, 1])
    with pytest.raises(ValueError, match="out of range"):
        remove_layers(model, [2])


@pytest.mark.parametrize("build", [llama, gpt2])
def test_generate_with_cache_after_layer_removal(build):
    model = build()
    remove_layers(model, [0, 2])
    cached = model.generate(TOKENS, max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=1)
    plain = model.generate(TOKENS, max_new_tokens=4, do_sample=False, use_cache=False, pad_token_id=1)
    assert torch.equal(cached, plain)


def test_find_blocks_refuses_sequential():
    with pytest.raises(ValueError, match="no transformer layer list"):
        find_blocks(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))
