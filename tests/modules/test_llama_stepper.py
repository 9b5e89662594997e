"""LlamaStepper: the lean decode step computes what transformers' forward computes.

Logits of every step against the model's own forward with a DynamicCache (fp32 models to
rounding, bf16 within bf16 rounding), tokens equal to generate(), the fused q/k/v and
gate/up kernel calls equal to the separate QuantLinear calls, head-pruned layers with their
own head counts, GQA, and every model the stepper must refuse.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from shrink.modules import QuantLinear, greedy_decode
from shrink.modules.llama_stepper import LlamaStepper, _fused, why_not
from shrink.quant import QuantSpec
from tests_support import cached_forward_logits, stepper_logits, tiny_gpt2, tiny_llama

transformers = pytest.importorskip("transformers")


def _quantized(model, bits=4):
    spec = QuantSpec(bits=4, granularity="group", group_size=32) if bits == 4 else QuantSpec(bits=8)
    for block in model.model.layers:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, QuantLinear.from_linear(child, spec))
    return model


def _llama(**kw):
    # q 128, k/v 64, gate/up 192 rows: whole blocks of the int4 layout, so q/k/v and gate/up fuse
    cfg = dict(hidden_size=128, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    return tiny_llama(**{**cfg, **kw})


@pytest.mark.parametrize("variant", ["fp32", "int4", "int8", "bf16", "int4 bf16", "mha"])
def test_logits_match_transformers(variant):
    model = _llama(num_key_value_heads=4) if variant == "mha" else _llama()
    if "int4" in variant:
        model = _quantized(model, 4)
    if "int8" in variant:
        model = _quantized(model, 8)
    if "bf16" in variant:
        model = model.to(torch.bfloat16)
    assert why_not(model) is None
    ids = torch.randint(0, 128, (2, 14), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = cached_forward_logits(model, ids, 8).float()
        got = stepper_logits(model, ids, 8).float()
    assert got.shape == ref.shape == (2, 8, 128)
    tol = 2e-2 if "bf16" in variant else 1e-5
    err = (got - ref).abs().max().item() / ref.abs().max().item()
    assert err <= tol, f"{variant}: max relative difference {err:.3g}"


def test_fused_kernel_call_equals_separate_calls():
    model = _quantized(_llama(), 4)
    attn = model.model.layers[0].self_attn
    mods = [attn.q_proj, attn.k_proj, attn.v_proj]
    call = _fused(mods)
    assert call is not None
    x = torch.randn(3, 128)
    with torch.inference_mode():
        for got, m in zip(call(x), mods):
            assert torch.equal(got, m(x))
        # one module (any row count): its kernel called directly, on its own packed weight
        odd = QuantLinear.from_linear(nn.Linear(128, 96, bias=False), QuantSpec(bits=4, granularity="group",
                                                                                group_size=32))
        assert torch.equal(_fused([odd])(x), odd(x))
    spec = QuantSpec(bits=4, granularity="group", group_size=32)
    # not fusable: a float layer, a bias, different groups, rows not whole blocks of 64
    assert _fused([nn.Linear(128, 64), attn.k_proj]) is None
    assert _fused([QuantLinear.from_linear(nn.Linear(128, 64), spec), attn.k_proj]) is None
    g64 = QuantLinear.from_linear(nn.Linear(128, 64, bias=False), QuantSpec(bits=4, granularity="group",
                                                                          group_size=64))
    assert _fused([g64, attn.k_proj]) is None
    assert _fused([QuantLinear.from_linear(nn.Linear(128, 96, bias=False), spec), attn.k_proj]) is None


@pytest.mark.parametrize("quant", [False, True])
def test_greedy_decode_uses_it_with_the_same_tokens_as_generate(quant):
    model = _llama()
    model.generation_config.eos_token_id = None
    if quant:
        model = _quantized(model, 4)
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(4))
    fast = greedy_decode(model, ids, 10)
    slow = greedy_decode(model, ids, 10, runtime="transformers")
    assert fast.runtime == "stepper" and fast.runtime_note is None
    assert slow.runtime == "transformers" and "asked" in slow.runtime_note
    with torch.inference_mode():
        gen = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(fast.tokens, gen) and torch.equal(slow.tokens, gen)


def test_heads_pruned_per_layer():
    from shrink.surgery.heads import find_attention, remove_heads

    model = _llama(num_key_value_heads=4)
    groups = find_attention(model)
    remove_heads(model, groups[0], [0, 2, 3])
    remove_heads(model, groups[2], [1])
    assert [model.model.layers[i].self_attn.q_proj.out_features for i in range(3)] == [96, 128, 32]
    assert why_not(model) is None
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        ref = cached_forward_logits(model, ids, 5)
        got = stepper_logits(model, ids, 5)
    assert (got - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


def test_refusals_fall_back_to_transformers():
    gpt2 = tiny_gpt2()
    assert "GPT2LMHeadModel is not" in why_not(gpt2)
    ids = torch.zeros(1, 3, dtype=torch.long)
    res = greedy_decode(gpt2, ids, 2)
    assert res.runtime == "transformers" and res.runtime_note
    with pytest.raises(ValueError, match="stepper cannot run"):
        greedy_decode(gpt2, ids, 2, runtime="stepper")
    with pytest.raises(ValueError, match="runtime"):
        greedy_decode(gpt2, ids, 2, runtime="fast")

    model = _llama()
    handle = model.model.layers[1].post_attention_layernorm.register_forward_hook(lambda *a: None)
    assert "hooks" in why_not(model)
    assert greedy_decode(model, ids, 2).runtime == "transformers"
    handle.remove()
    assert why_not(model) is None
    model.train()
    assert "training" in why_not(model)
    model.eval()
    assert "rotary" in why_not(_llama(rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                       "rope_theta": 10000.0}))


def test_cache_bounds():
    model = _llama()
    st = LlamaStepper(model, 1, 4)
    with torch.inference_mode():
        st.step(torch.zeros(1, 3, dtype=torch.long))
        with pytest.raises(ValueError, match="only as the prompt"):
            st.step(torch.zeros(1, 2, dtype=torch.long))
        st.step(torch.zeros(1, 1, dtype=torch.long))
        with pytest.raises(ValueError, match="past the 4"):
            st.step(torch.zeros(1, 1, dtype=torch.long))
