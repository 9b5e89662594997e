"""The distill step end to end: compress -> the student is the result, its evidence is
recorded, and the compressed DIR saves and reloads it with identical outputs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import shrink
from shrink.data.labeled import labeled_batches
from shrink.eval.quality import accuracy_metric
from shrink.models.compressed import load_compressed, save_compressed
from shrink.recipe import compress, parse_recipe
from shrink.recipe.rules import check_order
from shrink.recipe.steps import BUILTIN
from shrink.recipe.train_steps import Distill
from tests_support import tiny_bert, tiny_gpt2


@pytest.fixture(scope="module")
def digits():
    from shrink.models.digits import digits_data

    d = digits_data()
    train = labeled_batches(d.x_train[:640], d.y_train[:640])
    return shrink.load("digits-mlp"), train, d


def _accuracy(d):
    return accuracy_metric(d.x_test, d.y_test)


def test_width_student_of_digits_mlp_round_trips(digits, tmp_path):
    teacher, train, d = digits
    res = compress(teacher, [{"distill": {"student": {"width": 0.25}, "temperature": 4, "steps": 40, "lr": 3e-3}}],
                   train_data=train, evaluate=_accuracy(d), measure_speed=False)
    det = res.steps[0].details
    assert det["student"]["params"] == 2778 and det["student"]["teacher_params"] == 17226
    assert det["setup"]["alpha"] == 0.5 and det["setup"]["kind"] == "classifier"   # alpha null, labels -> 0.5
    assert det["layer_map"] == [0, 1] and det["student"]["kept_units"] == {"0": 32, "1": 16}
    assert len(det["training"]["evaluations"]) == 10
    assert det["training"]["evaluations"][-1]["value"] > det["quality_before"]["value"]
    assert res.metrics["compressed"]["params"] == 2778
    assert [m.out_features for m in res.model if isinstance(m, nn.Linear)] == [32, 16, 10]
    save_compressed(res.model, tmp_path / "m", base={"kind": "builtin", "name": "digits-mlp"})
    back = shrink.load(tmp_path / "m")
    assert torch.equal(back(d.x_test), res.model(d.x_test))


def test_layer_student_of_digits_mlp_round_trips(digits, tmp_path):
    teacher, train, d = digits
    res = compress(teacher, [{"distill": {"student": {"layers": [1]}, "alpha": 0.0, "steps": 5}}],
                   train_data=train, measure_speed=False)
    det = res.steps[0].details
    assert det["student"]["reinitialized"] == ["2"] and det["setup"]["alpha"] == 0.0
    assert isinstance(res.model[0], nn.Identity)
    save_compressed(res.model, tmp_path / "m", base={"kind": "builtin", "name": "digits-mlp"})
    back = shrink.load(tmp_path / "m")
    assert isinstance(back[0], nn.Identity)
    assert torch.equal(back(d.x_test), res.model(d.x_test))


def test_bert_layer_student_round_trips(tmp_path):
    teacher = tiny_bert()
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(2, 64, (4, 8), generator=g),
                "attention_mask": torch.ones(4, 8, dtype=torch.long)} for _ in range(3)]
    res = compress(teacher, [{"distill": {"student": {"layers": [0, 2]}, "hidden_loss": "cosine", "steps": 4,
                                          "lr": 1e-4}}], calibration=batches, measure_speed=False)
    det = res.steps[0].details
    assert det["setup"]["kind"] == "encoder" and det["setup"]["alpha"] == 1.0
    assert det["layer_map"] == [0, 2] and det["student"]["config"]["config_loadable"]
    assert res.model.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 3
    save_compressed(res.model, tmp_path / "m", base={"kind": "hf"})
    back = load_compressed(tmp_path / "m")
    assert len(back.encoder.layer) == 2
    with torch.no_grad():
        assert torch.equal(back(**batches[0]).last_hidden_state, res.model(**batches[0]).last_hidden_state)


def test_causal_lm_width_student_and_student_null(tmp_path):
    teacher = tiny_gpt2()
    batches = [{"input_ids": torch.randint(0, 64, (4, 10))} for _ in range(3)]
    res = compress(teacher, [{"distill": {"student": {"width": 0.5}, "steps": 3}}], calibration=batches,
                   measure_speed=False)
    assert res.steps[0].details["setup"]["kind"] == "causal" and res.steps[0].details["setup"]["alpha"] == 0.5
    save_compressed(res.model, tmp_path / "m", base={"kind": "hf"})
    back = load_compressed(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(back(**batches[0]).logits, res.model(**batches[0]).logits)
    same = compress(teacher, [Distill(student=None, steps=2)], calibration=batches, measure_speed=False)
    assert same.steps[0].details["student"]["from"] == "the model itself"
    assert same.steps[0].details["student"]["params"] == same.steps[0].details["student"]["teacher_params"]


def test_builtin_recipes_and_order():
    half, plus = parse_recipe("distill-half"), parse_recipe("distill+int8")
    assert half == [Distill(student={"width": 0.5})] and half[0].steps == 500
    assert plus[0] == half[0] and plus[1].bits == 8
    assert check_order(plus) == []   # distill before quantize is the golden order
    assert "distill-half" in BUILTIN
    with pytest.raises(ValueError, match="comes after"):
        check_order(list(reversed(plus)))


def test_bad_input_at_parse_and_run(digits):
    with pytest.raises(ValueError, match=r"recipe step 1 \(distill\): temperature must be a positive number"):
        parse_recipe([{"distill": {"temperature": 0}}])
    with pytest.raises(ValueError, match="temperature must be a positive number"):
        parse_recipe([{"distill": {"temperature": -2.0}}])
    with pytest.raises(ValueError, match=r"alpha must be a number in \[0, 1\]"):
        parse_recipe([{"distill": {"alpha": 2}}])
    with pytest.raises(ValueError, match="student must be"):
        parse_recipe([{"distill": {"student": {"depth": 2}}}])
    teacher, train, _ = digits
    with pytest.raises(ValueError, match=r"out of range: the teacher's .* has 2 layers"):
        compress(teacher, [{"distill": {"student": {"layers": [4]}, "steps": 1}}], train_data=train,
                 measure_speed=False)
