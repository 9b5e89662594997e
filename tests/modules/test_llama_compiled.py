"""LlamaStepper(compile=True): the torch.compile'd decode step computes what transformers does.

Logits of every step against the model's own forward with a DynamicCache (to float
rounding: inductor may sum in another order), greedy tokens equal to generate(), one
compiled graph reused by a second stepper of the same shapes (no recompile), and the
models it must refuse with a reason. Each new shape compiles C++ (tens of seconds), so
the models here share two shapes.
"""
from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from shrink.modules import QuantLinear, greedy_decode
from shrink.modules.llama_stepper import LlamaStepper
from shrink.quant import QuantSpec
from tests_support import cached_forward_logits, stepper_logits, tiny_llama

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                                reason="torch.compile's CPU backend needs a C++ compiler")

SPEC4 = QuantSpec(bits=4, granularity="group", group_size=32)


def _model(bits: int, head: bool = False):
    torch.manual_seed(0)
    model = tiny_llama(hidden_size=128, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    model.generation_config.eos_token_id = None
    if bits == 32:
        return model
    spec = SPEC4 if bits == 4 else QuantSpec(bits=8)
    for block in model.model.layers:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, QuantLinear.from_linear(child, spec))
    if head:
        model.lm_head = QuantLinear.from_linear(model.lm_head, spec)
    return model


# fp32 (nn.Linear) agrees to fp32 rounding; the int4/int8 kernels take bf16 activations, so a
# last-bit difference in a layer's fp32 input (another summation order) can flip one bf16
# rounding of it: differences of ~1e-3 of the logits' range, as between any two fp32 orders.
@pytest.mark.parametrize("bits,head,tol", [(32, False, 1e-5), (4, False, 1e-2), (8, True, 1e-2)])
def test_compiled_logits_match_transformers_and_the_graph_is_reused(bits, head, tol):
    from torch._dynamo.utils import counters

    model = _model(bits, head)
    ids = torch.randint(0, 128, (2, 14), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = cached_forward_logits(model, ids, 8)
        eager = stepper_logits(model, ids, 8, compile=False)
        got = stepper_logits(model, ids, 8, compile=True)
        frames = counters["frames"]["ok"]
        # a second stepper and a second model of the same shapes: no new graph
        again = stepper_logits(model, ids, 8, compile=True)
        other = _model(bits, head)
        stepper_logits(other, ids, 8, compile=True)
        # another length in the same 256-position bucket
        longer = torch.randint(0, 128, (2, 30), generator=torch.Generator().manual_seed(3))
        stepper_logits(model, longer, 20, compile=True)
        assert counters["frames"]["ok"] == frames, "a new stepper of the same shapes recompiled"
    assert got.shape == ref.shape == (2, 8, 128)
    err = (got - ref).abs().max().item() / ref.abs().max().item()
    assert err <= tol, f"{bits} bits: compiled logits differ from transformers' by {err:.3g}"
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    assert torch.equal(again, got)
    # the prompt runs eagerly: the first position is the eager stepper's exactly
    assert torch.equal(got[:, 0], eager[:, 0])


def test_greedy_decode_compiled_tokens_equal_generate():
    model = _model(4)
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(4))
    res = greedy_decode(model, ids, 12, runtime="compiled")
    assert res.runtime == "compiled" and res.runtime_note is None
    with torch.inference_mode():
        gen = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(res.tokens, gen)


def test_compiled_refuses_layers_it_cannot_take():
    model = _model(4)
    # a QuantLinear on the dequantize path (no kernel) and a bias on a fused group
    model.model.layers[1].mlp.down_proj = QuantLinear.from_linear(nn.Linear(192, 128, bias=False), SPEC4,
                                                                  kernel="reference")
    with pytest.raises(ValueError, match="compile=True.*QuantLinear"):
        LlamaStepper(model, 1, 8, compile=True)
    LlamaStepper(model, 1, 8)   # the eager stepper still takes it
    ids = torch.randint(0, 128, (1, 4), generator=torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match="compile=True"):
        greedy_decode(model, ids, 3, runtime="compiled")
    with pytest.raises(ValueError, match="runtime must be one of"):
        greedy_decode(model, ids, 3, runtime="fast")


def test_one_compiled_function_per_signature():
    from shrink.modules.llama_compiled import _signature, compiled_decode

    model = _model(4)
    with torch.inference_mode():
        a, b = LlamaStepper(model, 1, 20, compile=True), LlamaStepper(model, 1, 200, compile=True)
        c = LlamaStepper(model, 1, 300, compile=True)       # the next 256-position bucket
        d = LlamaStepper(model, 2, 20, compile=True)        # another batch size
    assert a._plan["layers"][0][-3].shape[2] == b._plan["layers"][0][-3].shape[2] == 256
    assert c._plan["layers"][0][-3].shape[2] == 512
    # the plan takes the eager calls' fused q/k/v and gate/up weights, not second copies
    assert a._plan["layers"][0][2][1] is a.parts[0][0][1] and a._plan["layers"][0][4][1] is a.parts[0][2][1]
    assert _signature(a._plan) == _signature(b._plan) and a._compiled is b._compiled
    assert len({_signature(x._plan) for x in (a, c, d)}) == 3
    assert len({id(compiled_decode(x._plan)) for x in (a, c, d)}) == 3
    # each signature's function has its own code object (dynamo's per-code graph limit)
    assert a._compiled is not c._compiled
