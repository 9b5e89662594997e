"""apply_lora / train_lora on small transformers models: which layers get adapters, only the
adapters train, the QLoRA base equals the quantizer's reference, the task loss falls with
the base untouched, merge / unmerge / fold, the loss choice, and clear errors."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from shrink import calc
from shrink.data.labeled import Labeled
from shrink.modules import LoRALinear, QuantLinear
from shrink.quant import QuantSpec, dequantize, quantize
from shrink.train.engine import TrainOptions
from shrink.train.lora import (apply_lora, fold_lora, lora_loss_kind, lora_parameters, merge_lora, train_lora,
                               unmerge_lora)
from shrink.train.loop import lm_loss
from tests_support import tiny_bert, tiny_gpt2, tiny_llama


def _ids(n=2, seq=16, seed=1):
    return torch.randint(0, 64, (n, seq), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_default_targets_every_linear_but_the_head():
    m = tiny_llama()
    y0 = _logits(m, _ids())
    info = apply_lora(m, rank=4, alpha=8)
    linears = [n for n, x in tiny_llama().named_modules() if isinstance(x, nn.Linear) and n != "lm_head"]
    assert info.names == linears and len(linears) == 21
    assert isinstance(m.lm_head, nn.Linear) and not isinstance(m.model.embed_tokens, LoRALinear)
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable == [f"{n}.lora_{x}" for n in linears for x in "AB"]
    expected = sum(calc.lora_params(l.in_features, l.out_features, 4) for l in info.layers)
    assert info.adapter_params == expected == sum(p.numel() for p in lora_parameters(m))
    assert torch.equal(_logits(m, _ids()), y0)                       # B = 0: the model is unchanged


def test_targets_by_name_glob_and_regex():
    m = tiny_llama()
    assert apply_lora(m, ["q_proj", "v_proj"], rank=2).names == [
        f"model.layers.{i}.self_attn.{p}" for i in range(3) for p in ("q_proj", "v_proj")]
    assert apply_lora(tiny_llama(), "*.mlp.*", rank=2).names == [
        f"model.layers.{i}.mlp.{p}" for i in range(3) for p in ("gate_proj", "up_proj", "down_proj")]
    assert apply_lora(tiny_llama(), ["re:layers\\.0\\..*o_proj"], rank=2).names == ["model.layers.0.self_attn.o_proj"]


def test_nothing_matching_and_rank_too_large_are_clear_errors():
    with pytest.raises(ValueError, match=r"no layer of the model matches targets \['c_fc'\]"):
        apply_lora(tiny_llama(), ["c_fc"], rank=2)
    m = tiny_llama()
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(ValueError, match=r"rank 20 is larger than layer model\.layers\.0\.self_attn\.k_proj"):
        apply_lora(m, rank=20)        # k_proj is [16, 32]; q_proj [32, 32] would take it
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())   # nothing changed
    with pytest.raises(ValueError, match="base_bits"):
        apply_lora(tiny_llama(), base_bits=8)
    with pytest.raises(ValueError, match="base_format"):
        apply_lora(tiny_llama(), base_bits=4, base_format="fp4")


@pytest.mark.parametrize("fmt,spec", [("nf4", QuantSpec(format="nf4", granularity="group", group_size=64)),
                                      ("int4", QuantSpec(bits=4, symmetric=False, granularity="group",
                                                         group_size=128))])
def test_qlora_base_is_the_quantizers_reference(fmt, spec):
    ref = tiny_llama(hidden_size=128, intermediate_size=128)
    m = copy.deepcopy(ref)
    info = apply_lora(m, ["q_proj", "down_proj"], rank=4, base_bits=4, base_format=fmt)
    for layer in info.layers:
        lora = m.get_submodule(layer.name)
        assert isinstance(lora.base, QuantLinear) and lora.base.spec == spec
        w = ref.get_submodule(layer.name).weight.detach()
        expect = dequantize(quantize(w, spec))
        assert torch.equal(lora.base.dequantized_weight(), expect)
        assert layer.base_format == f"{fmt}-g{spec.group_size}" and layer.base_bytes == lora.base.nbytes
        assert layer.base_mse == pytest.approx(float(((expect - w) ** 2).mean()), rel=1e-6)
        assert layer.base_bytes < layer.base_bytes_before / 6
    assert [n for n, p in m.named_parameters() if p.requires_grad] == [
        f"{n}.lora_{x}" for n in info.names for x in "AB"]


def test_training_lowers_the_task_loss_and_moves_only_the_adapters():
    m = tiny_llama()
    apply_lora(m, rank=4, alpha=8, base_bits=4)
    frozen = {k: v.clone() for k, v in m.state_dict().items() if "lora_" not in k}
    ids = [_ids(seed=s) for s in range(4)]
    before = float(sum(lm_loss(_logits(m, b), b) for b in ids))
    rec = train_lora(m, ids, TrainOptions(steps=12, lr=2e-2))
    after = float(sum(lm_loss(_logits(m, b), b) for b in ids))
    assert rec.loss == "lm" and after < before - 0.1
    state = m.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())
    assert all(float(x.lora_B.detach().abs().sum()) > 0 for x in m.modules() if isinstance(x, LoRALinear))


def test_merge_unmerge_and_fold_on_gpt2_conv1d():
    m = tiny_gpt2()
    info = apply_lora(m, rank=4, alpha=8)
    assert {l.source for l in info.layers} == {"conv1d"}
    train_lora(m, [_ids(seed=s) for s in range(3)], TrainOptions(steps=5, lr=1e-2))
    ids = _ids(seed=9)
    y = _logits(m, ids)
    assert merge_lora(m) == len(info.layers)
    assert torch.allclose(_logits(m, ids), y, atol=1e-4)
    unmerge_lora(m)
    assert torch.equal(_logits(m, ids), y)
    merge_lora(m)
    names = fold_lora(m)
    assert names == info.names and not any(isinstance(x, LoRALinear) for x in m.modules())
    assert all(type(m.get_submodule(n)) is Conv1D for n in names)
    assert torch.allclose(_logits(m, ids), y, atol=1e-4)


def test_auto_loss_is_the_task_loss():
    llama, bert = tiny_llama(), tiny_bert()
    ids = _ids()
    assert lora_loss_kind("auto", llama, ids, quantized_base=False) == "lm"
    assert lora_loss_kind("auto", llama, Labeled(ids, torch.zeros(2, dtype=torch.long)), quantized_base=False) == "ce"
    with pytest.raises(ValueError, match="no task signal"):
        lora_loss_kind("auto", bert, {"input_ids": ids}, quantized_base=False)
    assert lora_loss_kind("auto", bert, {"input_ids": ids}, quantized_base=True) == "distill"
    assert lora_loss_kind("distill", llama, ids, quantized_base=False) == "distill"


def test_qlora_encoder_distills_towards_the_original():
    ref = tiny_bert()
    m = copy.deepcopy(ref)
    apply_lora(m, rank=4, base_bits=4, base_format="nf4")
    batches = [{"input_ids": _ids(seed=s)} for s in range(3)]
    rec = train_lora(m, batches, TrainOptions(steps=8, lr=2e-2), teacher=ref)
    assert rec.loss == "distill" and rec.losses[-1] < rec.losses[0]


def test_train_lora_errors():
    with pytest.raises(ValueError, match="no LoRA adapters"):
        train_lora(tiny_llama(), [_ids()], TrainOptions(steps=1))
    m = tiny_llama()
    apply_lora(m, rank=2)
    with pytest.raises(ValueError, match="labeled"):
        train_lora(m, [_ids()], TrainOptions(steps=1), loss="ce")
    with pytest.raises(ValueError, match="teacher"):
        train_lora(m, [_ids()], TrainOptions(steps=1), loss="distill")
