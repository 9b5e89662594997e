"""Pruned models, non-uniform widths included, reload from a freshly built base + the
recorded shapes + a strict state-dict load, as shrink's compressed dirs do."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_model, save_model
from torch import nn

from shrink.surgery.heads import find_attention, remove_heads
from shrink.surgery.shapes import apply_resized, describe, resized_modules
from shrink.surgery.shrink_dims import find_neuron_groups, remove_layers, remove_units

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

from tests_support import tiny_bert, tiny_gpt2, tiny_llama  # noqa: E402

TOKENS = torch.randint(2, 64, (2, 9), generator=torch.Generator().manual_seed(1))


def llama():
    return tiny_llama()


def gpt2():
    return tiny_gpt2(scale_attn_by_inverse_layer_idx=True)


def bert():
    return tiny_bert()


def prune_transformer(model):
    """Different heads and widths per layer, and one layer gone."""
    for i, group in enumerate(find_attention(model)):
        remove_heads(model, group, list(range(i % group.units + 1)))
    for i, g in enumerate(find_neuron_groups(model)):
        remove_units(model, g, torch.arange(0, g.width, i + 2))
    remove_layers(model, [1])


def run(model):
    with torch.no_grad():
        out = model(TOKENS)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def round_trip(model, fresh, tmp_path):
    """Save, rebuild with `fresh()`, apply the JSON description, load strictly."""
    desc = json.loads(json.dumps(resized_modules(model, fresh())))
    save_model(model, str(tmp_path / "model.safetensors"))
    back = fresh()
    apply_resized(back, desc)
    missing, unexpected = load_model(back, str(tmp_path / "model.safetensors"), strict=True)
    assert not missing and not unexpected
    return back.eval(), desc


@pytest.mark.parametrize("build", [llama, gpt2, bert])
@pytest.mark.parametrize("base_config", ["pruned", "original"])
def test_transformers_round_trip(tmp_path, build, base_config):
    torch.manual_seed(0)
    model = build().eval()
    original = copy.deepcopy(model.config)
    prune_transformer(model)
    cfg = model.config if base_config == "pruned" else original  # remove_layers updated model.config
    back, desc = round_trip(model, lambda: type(model)(copy.deepcopy(cfg)), tmp_path)
    assert bool(desc["layers"]) == (base_config == "original")
    assert torch.equal(run(back), run(model))
    if build is llama:
        kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(back.generate(TOKENS, **kw), model.generate(TOKENS, **kw))
    if build is gpt2:  # the 1/(layer_idx+1) scaling of the original layer 2, now layer 1, is kept
        assert desc["attributes"]["transformer.h.1.attn"]["scaling"] == pytest.approx(8 ** -0.5 / 3)


def test_digits_round_trip(tmp_path):
    from shrink.models.digits import digits_cnn, digits_mlp

    x = torch.rand(8, 64, generator=torch.Generator().manual_seed(0))
    for build in (digits_mlp, digits_cnn):
        torch.manual_seed(0)
        model = build()
        model.train()
        model(torch.rand(32, 64))  # non-trivial BatchNorm running stats
        model.eval()
        for g in find_neuron_groups(model):
            remove_units(model, g, torch.arange(0, g.width, 3))
        back, desc = round_trip(model, build, tmp_path)
        assert desc["modules"] and not desc["layers"]
        with torch.no_grad():
            assert torch.equal(back(x), model(x))


def test_unpruned_model_has_an_empty_description():
    torch.manual_seed(0)
    desc = resized_modules(llama(), llama())
    assert (desc["layers"], desc["modules"], desc["attributes"]) == ({}, {}, {})


def test_records_and_errors():
    assert describe(nn.Conv2d(3, 5, (3, 1), padding="same")) == {
        "type": "Conv2d", "in_channels": 3, "out_channels": 5, "kernel_size": [3, 1], "stride": [1, 1],
        "padding": "same", "dilation": [1, 1], "groups": 1, "bias": True, "padding_mode": "zeros"}
    assert describe(nn.ReLU()) is None
    with pytest.raises(ValueError, match="not a shrink-resized"):
        apply_resized(nn.Linear(2, 2), {"modules": {}})
    bad = {"format": "shrink-resized", "version": 1, "layers": {}, "modules": {"0": {"type": "Linear"}}}
    with pytest.raises(ValueError, match="lacks or mistypes"):
        apply_resized(nn.Sequential(nn.Linear(2, 2)), bad)
    with pytest.raises(ValueError, match="more than the base"):
        resized_modules(llama(), _shorter())


def _shorter():
    m = llama()
    remove_layers(m, [0])
    return m
