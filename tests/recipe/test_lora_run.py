"""The lora step end to end through shrink.compress: the evidence it records, QLoRA kept
apart (4-bit base + adapters, layer records, save/reload bit-exact, dense export) and
merged (float layers, the same outputs), GPT-2's Conv1D, the YAML spelling, and clear
errors for a rank too large and targets matching nothing."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from shrink.export.dense import carried_layers, plain_copy
from shrink.models.compressed import load_compressed, save_compressed
from shrink.modules import LoRALinear, QuantLinear
from shrink.recipe import compress
from shrink.recipe.records import model_params
from shrink.recipe.steps import parse_recipe
from shrink.recipe.train_steps import LoRA
from tests_support import tiny_gpt2, tiny_llama


def _batches(n=3, seq=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 64, (2, seq), generator=g)} for _ in range(n)]


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture(scope="module")
def qlora_kept():
    model = tiny_llama(hidden_size=64, intermediate_size=128)
    res = compress(model, [{"lora": {"rank": 4, "alpha": 8, "targets": ["q_proj", "v_proj", "down_proj"],
                                     "base_bits": 4, "base_format": "nf4", "merge": False, "steps": 4,
                                     "lr": 1e-2}}], calibration=_batches(), measure_speed=False)
    return model, res


def test_qlora_kept_apart_records_its_evidence(qlora_kept):
    model, res = qlora_kept
    rec = res.steps[0]
    d = rec.details
    names = [f"model.layers.{i}.{p}" for i in range(3) for p in ("self_attn.q_proj", "self_attn.v_proj",
                                                                  "mlp.down_proj")]
    assert [l.name for l in rec.layers] == names
    trainable = 4 * (64 + 64) * 3 + 4 * (64 + 32) * 3 + 4 * (128 + 64) * 3     # r (in + out) per layer
    assert d["trainable_params"] == trainable and d["model_params"] == model_params(model)
    assert d["trainable_percent"] == pytest.approx(100 * trainable / model_params(model))
    assert d["base_format"] == "nf4-g64" and d["merged"] is False and d["unmerge_exact"] is True
    assert d["loss"] == "lm" and d["training"]["steps_run"] == 4
    assert d["merged_vs_unmerged_max_abs_diff"] < 1e-4 * max(1.0, d["output_max_abs"])
    for l in rec.layers:
        mod = res.model.get_submodule(l.name)
        assert isinstance(mod, LoRALinear) and isinstance(mod.base, QuantLinear) and not mod.merged
        assert l.format == "nf4-g64+lora4" and l.bytes_stored == mod.base.nbytes + mod.adapter_nbytes
        assert l.bytes_stored < l.bytes_fp32 and 15 < l.sqnr_db < 30
    # the adapters learned, the rest of the model is still the original's and trainable again
    orig = dict(model.named_parameters())
    for n, p in res.model.named_parameters():
        if "lora_" in n:
            assert p.requires_grad
        elif ".base." in n:
            assert not p.requires_grad
        else:
            assert torch.equal(p, orig[n]) and p.requires_grad


def test_qlora_kept_apart_saves_and_reloads_bit_exactly(qlora_kept, tmp_path):
    _, res = qlora_kept
    d = save_compressed(res.model, tmp_path / "c", base={"kind": "hf"})
    back = load_compressed(d)
    b = _batches(1, seed=7)[0]
    assert torch.equal(_logits(back, b), _logits(res.model, b))
    for n, m in res.model.named_modules():
        if isinstance(m, LoRALinear):
            m2 = back.get_submodule(n)
            assert isinstance(m2, LoRALinear) and isinstance(m2.base, QuantLinear)
            assert torch.equal(m2.lora_A, m.lora_A) and torch.equal(m2.lora_B, m.lora_B)
            assert torch.equal(m2.base.codes, m.base.codes) and m2.base.spec == m.base.spec
    # a model saved while merged reloads merged, with the same bytes
    layer = next(m for m in res.model.modules() if isinstance(m, LoRALinear))
    layer.merge()
    try:
        back2 = load_compressed(save_compressed(res.model, tmp_path / "m", base={"kind": "hf"}))
        assert torch.equal(_logits(back2, b), _logits(res.model, b))
    finally:
        layer.unmerge()


def test_qlora_kept_apart_exports_the_merged_weight(qlora_kept):
    _, res = qlora_kept
    plain = plain_copy(res.model)
    assert not any(isinstance(m, (LoRALinear, QuantLinear)) for m in plain.modules())
    b = _batches(1, seed=3)[0]
    assert torch.allclose(_logits(plain, b), _logits(res.model, b), atol=1e-4)
    grids, why = carried_layers(res.model)
    assert not grids and all("LoRA" in why[n] for n in why)


def test_qlora_merged_leaves_float_layers_with_the_same_outputs():
    model = tiny_llama()
    res = compress(model, [{"lora": {"rank": 2, "base_bits": 4, "base_format": "int4", "steps": 3,
                                     "lr": 1e-2}}], calibration=_batches(), measure_speed=False)
    d = res.steps[0].details
    assert d["merged"] is True and d["merged_layers"] == 21 and "float layers" in d["merged_note"]
    assert not any(isinstance(m, (LoRALinear, QuantLinear)) for m in res.model.modules())
    assert type(res.model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert d["folded_vs_unmerged_max_abs_diff"] < 1e-4 * max(1.0, d["output_max_abs"])
    assert res.steps[0].layers == [] and res.metrics["compressed"]["params"] == res.metrics["baseline"]["params"]


def test_gpt2_conv1d_merged_keeps_its_layout():
    model = tiny_gpt2()
    res = compress(model, [{"lora": {"rank": 2, "targets": "c_attn", "steps": 2, "lr": 1e-2}}],
                   calibration=_batches(), measure_speed=False)
    assert res.steps[0].details["adapted_layers"] == 3
    for i in range(3):
        assert type(res.model.transformer.h[i].attn.c_attn) is Conv1D
    assert set(res.model.state_dict()) == set(model.state_dict())


def test_yaml_spelling():
    (step,) = parse_recipe([{"lora": {"rank": 16, "alpha": 32, "targets": "q_proj", "base_bits": 4,
                                      "merge": False, "steps": 10}}])
    assert step == LoRA(rank=16, alpha=32.0, targets=("q_proj",), base_bits=4, merge=False, steps=10)
    with pytest.raises(ValueError, match="targets"):
        LoRA(targets=("q_proj", 3), steps=1)


def test_rank_too_large_and_no_matching_targets_are_clear_errors():
    with pytest.raises(ValueError, match=r"rank 20 is larger than layer model\.layers\.0\.self_attn\.k_proj"):
        compress(tiny_llama(), [{"lora": {"rank": 20, "steps": 1}}], calibration=_batches(1), measure_speed=False)
    with pytest.raises(ValueError, match=r"no layer of the model matches targets \['query'\]"):
        compress(tiny_llama(), [{"lora": {"targets": ["query"], "steps": 1}}], calibration=_batches(1),
                 measure_speed=False)
