"""The qat recipe step on digits-mlp: QAT recovers what int2 PTQ lost, gptq -> qat refines
the PTQ layers, per-layer records, a saved DIR that reloads to equal outputs, bad input."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import shrink
from shrink.data.labeled import labeled_batches
from shrink.models.digits import accuracy, digits_data
from shrink.modules.quant_linear import QuantLinear
from shrink.recipe import compress
from shrink.recipe.rules import check_order
from shrink.recipe.steps import parse_recipe
from shrink.recipe.train_steps import QAT

INT2 = {"bits": 2, "group_size": None, "symmetric": True}


@pytest.fixture(scope="module")
def digits():
    split = digits_data()
    train = labeled_batches(split.x_train, split.y_train)
    calib = [split.x_train[i:i + 64] for i in range(0, 256, 64)]

    def metric(m):
        return {"name": "accuracy", "value": accuracy(m, split.x_test, split.y_test), "higher_is_better": True}

    return shrink.load("digits-mlp"), train, calib, metric


def test_qat_recovers_what_int2_ptq_lost(digits):
    model, train, calib, metric = digits
    ptq = compress(model, [{"rtn": INT2}], calibration=calib, evaluate=metric, measure_speed=False)
    qat = compress(model, [{"qat": {**INT2, "steps": 30, "lr": 1e-3}}], calibration=calib, train_data=train,
                   evaluate=metric, measure_speed=False)
    base = ptq.metrics["baseline"]["quality"]["value"]
    lost = ptq.metrics["compressed"]["quality"]["value"]
    got = qat.metrics["compressed"]["quality"]["value"]
    assert lost < base - 0.2 and got > lost + 0.3 and got > base - 0.1
    rec = qat.steps[0]
    assert rec.details["loss"] == "ce+distill" and rec.details["freeze_step"] == 3
    assert rec.details["training"]["steps_run"] == 30
    assert [l.name for l in rec.layers] == ["0", "2", "4"]
    for layer in rec.layers:
        q = qat.model.get_submodule(layer.name)
        assert isinstance(q, QuantLinear) and layer.format == "int2-channel" and layer.kernel == q.kernel
        assert layer.bytes_stored == q.nbytes < layer.bytes_fp32 / 8
        assert layer.error > 0 and "ranges frozen at step 3" in layer.note
    assert all(isinstance(p, torch.Tensor) for p in model.parameters())   # the input model is untouched
    assert isinstance(model[0], nn.Linear)


def test_gptq_then_qat_refines_the_ptq_layers(digits):
    model, train, calib, metric = digits
    steps = parse_recipe([{"gptq": {"bits": 2}}, {"qat": {"bits": 2, "steps": 20, "lr": 1e-3, "lsq": True}}])
    assert check_order(steps) == []
    res = compress(model, steps, calibration=calib, train_data=train, evaluate=metric, measure_speed=False)
    rec = res.steps[1]
    assert rec.details["lsq"] is True and len(rec.layers) == 3 and not rec.skipped
    assert all("PTQ layer's codes and scales" in l.note and l.format == "int2-g128" for l in rec.layers)
    assert all(isinstance(res.model.get_submodule(n), QuantLinear) for n in ("0", "2", "4"))
    with pytest.raises(ValueError, match="would find no float layers"):   # two PTQ steps on every layer
        check_order(parse_recipe([{"rtn": {}}, {"gptq": {}}]))
    assert [type(s).__name__ for s in parse_recipe("w4-gptq+qat")] == ["GPTQ", "QAT"]
    assert [type(s).__name__ for s in parse_recipe("w4-qat")] == ["QAT"]


def test_activation_quantization_is_recorded_honestly(digits):
    model, train, calib, metric = digits
    res = compress(model, [{"qat": {"bits": 4, "act_bits": 4, "steps": 10, "lr": 1e-3}}], calibration=calib,
                   train_data=train, evaluate=metric, measure_speed=False)
    d = res.steps[0].details
    assert "activations run in float after conversion" in d["activations_note"]
    assert set(d["activations"]) == {"0", "2", "4"} and all(a["frozen"] for a in d["activations"].values())
    assert d["activations"]["0"]["lo"] == 0.0 and 0.9 < d["activations"]["0"]["hi"] <= 1.0   # pixels in [0, 1]
    assert 0 < d["quality_fake_quant_activations"]["value"] <= 1


def test_job_saves_a_dir_that_reloads_to_equal_outputs(tmp_path):
    from shrink.recipe.job import run_job

    doc = run_job("digits-mlp", [QAT(steps=20, lr=1e-3)], tmp_path / "out")
    loaded = shrink.load(str(tmp_path / "out"))
    assert all(isinstance(loaded.get_submodule(n), QuantLinear) for n in ("0", "2", "4"))
    split = digits_data()
    assert accuracy(loaded, split.x_test, split.y_test) == pytest.approx(doc["compressed"]["quality"]["value"], abs=1e-6)
    again = shrink.load(str(tmp_path / "out" / "model"))
    x = split.x_test[:50]
    with torch.no_grad():
        assert torch.equal(loaded(x), again(x))
    assert doc["steps"][0]["details"]["loss"] == "ce+distill"


def test_bad_input(digits):
    model, train, calib, metric = digits
    with pytest.raises(ValueError, match="no layer to train"):
        compress(model, [{"qat": {"include": ["nothing.*"], "steps": 2}}], calibration=calib, train_data=train,
                 measure_speed=False)
    with pytest.raises(ValueError, match="needs labeled batches"):
        compress(model, [{"qat": {"loss": "ce", "steps": 2}}], calibration=calib, measure_speed=False)
    with pytest.raises(ValueError, match="act_bits must be an integer in 2..8"):
        parse_recipe([{"qat": {"act_bits": 16}}])
    with pytest.raises(ValueError, match="loss must be"):
        QAT(loss="kl")


def test_a_causal_lm_distills_from_the_original_and_converts_its_conv1d_layers():
    from tests_support import tiny_gpt2

    model = tiny_gpt2()
    torch.manual_seed(0)
    calib = [{"input_ids": torch.randint(0, model.config.vocab_size, (4, 16))} for _ in range(2)]
    res = compress(model, [{"qat": {"bits": 4, "group_size": 32, "steps": 3, "lr": 1e-3}}], calibration=calib,
                   measure_speed=False)
    rec = res.steps[0]
    assert rec.details["loss"] == "distill"
    assert rec.layers and all(isinstance(res.model.get_submodule(l.name), QuantLinear) for l in rec.layers)
    assert any(l.name.endswith("c_attn") for l in rec.layers)
    with torch.no_grad():
        out = res.model(**calib[0]).logits
        ref = model(**calib[0]).logits
    assert torch.isfinite(out).all() and (out - ref).abs().max() < 1.0
