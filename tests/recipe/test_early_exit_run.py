"""The early_exit step end to end: compress digits-mlp -> an EarlyExitModel at the step's
threshold with its evidence (per-exit quality, the trade-off table whose threshold-1 row is
the base's quality exactly), saved and reloaded with identical outputs (also after a later
int8 step quantized its layers and heads), exported to ONNX as the full-depth path, the
report's table and plot, the YAML spelling, and clear errors."""
from __future__ import annotations

import json

import pytest
import torch

import shrink
from shrink.data.labeled import labeled_batches
from shrink.eval.quality import accuracy_metric
from shrink.export.dense import carried_layers, is_compressed, plain_copy
from shrink.models.compressed import load_compressed, save_compressed
from shrink.modules import EarlyExitModel, QuantLinear
from shrink.recipe import compress, parse_recipe
from shrink.recipe.train_steps import EarlyExit
from shrink.report import render_html
from tests_support import tiny_gpt2


@pytest.fixture(scope="module")
def digits():
    from shrink.models.digits import digits_data

    d = digits_data()
    train = labeled_batches(d.x_train[:640], d.y_train[:640])
    return shrink.load("digits-mlp"), train, d


def _accuracy(d):
    return accuracy_metric(d.x_test, d.y_test)


def _build(name):
    return shrink.load(name)


@pytest.fixture(scope="module")
def run(digits):
    model, train, d = digits
    res = compress(model, [{"early_exit": {"steps": 40, "threshold": 0.9}}], train_data=train,
                   calibration=[d.x_train[:64]], evaluate=_accuracy(d), measure_speed=False)
    return model, res, d


def test_the_step_leaves_an_early_exit_model_with_its_evidence(run):
    model, res, d = run
    ee = res.model
    assert isinstance(ee, EarlyExitModel) and ee.threshold == 0.9 and ee.exits == (0, 1)
    e = res.steps[0].details["early_exit"]
    base_q = res.metrics["baseline"]["quality"]["value"]
    assert e["exits"] == [0, 1] and e["layers"] == 3 and e["train_base"] is False
    assert e["head_params"] == (128 * 10 + 10) + (64 * 10 + 10) and e["model_params"] == 17226
    assert "cross-entropy" in e["loss"] and res.steps[0].details["training"]["steps_run"] == 40
    assert [q["exit"] for q in e["exit_quality"]] == [0, 1, "final"]
    assert e["exit_quality"][-1]["value"] == base_q
    assert all(q["value"] > 0.85 for q in e["exit_quality"])   # the heads learned (10 classes: chance 0.1)
    thresholds = [r["threshold"] for r in e["tradeoff"]]
    assert thresholds == sorted(thresholds) and thresholds[-1] == 1.0 and 0.9 in thresholds
    full = e["tradeoff"][-1]
    assert full["quality"] == base_q and full["fractions"] == [0.0, 0.0, 1.0] and full["compute_fraction"] == 1.0
    assert all(r["samples"] == len(d.y_test) and sum(r["fractions"]) == pytest.approx(1.0) for r in e["tradeoff"])
    assert e["tradeoff"][0]["mean_layers"] < full["mean_layers"] == 3.0
    assert e["chosen"]["threshold"] == 0.9 and e["chosen"]["quality"] == res.metrics["compressed"]["quality"]["value"]
    assert all(r["latency_ms"] > 0 for r in e["tradeoff"])
    # the metric compress reports is of the model at the step's threshold
    ee.threshold = 0.9
    assert res.metrics["compressed"]["quality"]["value"] == _accuracy(d)(ee)["value"]


def test_save_reload_identical_and_export_full_depth(run, tmp_path):
    model, res, d = run
    ee = res.model
    save_compressed(ee, tmp_path / "m", base={"kind": "builtin", "name": "digits-mlp"})
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert manifest["early_exit"]["exits"] == [0, 1] and manifest["early_exit"]["threshold"] == 0.9
    assert manifest["early_exit"]["heads"][0] == {"in_features": 128, "classes": 10, "pool": "flatten"}
    back = load_compressed(tmp_path / "m", build_builtin=_build)
    assert isinstance(back, EarlyExitModel) and back.threshold == 0.9
    with torch.no_grad():
        assert torch.equal(back(d.x_test), ee(d.x_test))
        for a, b in zip(back.forward_all(d.x_test), ee.forward_all(d.x_test)):
            assert torch.equal(a, b)
        plain = plain_copy(ee)
        assert isinstance(plain, torch.nn.Sequential) and list(plain.state_dict()) == list(model.state_dict())
        assert torch.equal(plain(d.x_test), model(d.x_test))   # the full-depth path: the base model
    assert is_compressed(ee)


def test_onnx_export_writes_the_full_depth_path_and_says_so(run, tmp_path):
    pytest.importorskip("onnxruntime")
    from shrink.export.run import export

    _, res, _ = run
    save_compressed(res.model, tmp_path / "m", base={"kind": "builtin", "name": "digits-mlp"},
                    extra={"source_model": "digits-mlp"})
    rec = export(str(tmp_path / "m"), "onnx", tmp_path / "m.onnx")
    assert rec["verified"] is True and rec["early_exit"]["exits"] == [0, 1]
    assert "full-depth path" in rec["early_exit"]["exported"]


def test_a_later_int8_step_quantizes_layers_and_heads_and_reloads(digits, tmp_path):
    model, train, d = digits
    res = compress(model, [{"early_exit": {"exits": [0], "steps": 10}}, {"rtn": {"bits": 8, "group_size": None,
                                                                               "symmetric": True}}],
                   train_data=train, calibration=[d.x_train[:64]], measure_speed=False)
    ee = res.model
    assert isinstance(ee.base[0], QuantLinear) and isinstance(ee.heads[0].linear, QuantLinear)
    save_compressed(ee, tmp_path / "q", base={"kind": "builtin", "name": "digits-mlp"})
    back = load_compressed(tmp_path / "q", build_builtin=_build)
    with torch.no_grad():
        assert torch.equal(back(d.x_test), ee(d.x_test))
    grids, _ = carried_layers(ee)
    assert sorted(grids) == ["0", "2", "4"]   # the base's layers, named as the exported copy names them


def test_without_a_metric_the_table_scores_agreement_with_full_depth(digits):
    model, train, d = digits
    res = compress(model, [{"early_exit": {"steps": 5}}], train_data=train, calibration=[d.x_train[:64]],
                   measure_speed=False)
    e = res.steps[0].details["early_exit"]
    assert "exit_quality" not in e and "agreement" in e["quality_source"]
    assert e["tradeoff"][-1]["quality"] == 1.0 and e["tradeoff"][-1]["quality_name"] == "agreement"


def test_report_shows_the_tradeoff(run):
    _, res, _ = run
    html = render_html(json.loads(json.dumps(res.to_json(), default=str)))
    assert 'class="num early-exit-tradeoff"' in html and 'data-plot="early-exit-tradeoff"' in html
    assert "Each exit alone" in html


def test_yaml_spelling_defaults_and_errors(digits, tmp_path):
    (tmp_path / "r.yaml").write_text("- early_exit: {exits: [1, 0], threshold: 0.8, epochs: 1}\n")
    (step,) = parse_recipe(tmp_path / "r.yaml")
    assert isinstance(step, EarlyExit) and step.exits == (0, 1) and step.lr == 1e-2 and step.epochs == 1.0
    assert EarlyExit(train_base=True).lr == 1e-3 and EarlyExit(lr=5e-3).lr == 5e-3
    model, train, d = digits
    with pytest.raises(ValueError, match=r"early_exit supports nn.Sequential classifiers \(digits-mlp, digits-cnn\)"):
        compress(tiny_gpt2(), [{"early_exit": {"steps": 1}}],
                 calibration=[{"input_ids": torch.zeros(2, 8, dtype=torch.long)}], measure_speed=False)
    with pytest.raises(ValueError, match=r"layer indices in 0..1"):
        compress(model, [{"early_exit": {"exits": [2], "steps": 1}}], train_data=train, measure_speed=False)
    with pytest.raises(ValueError, match="include/exclude do not apply"):
        compress(model, [{"early_exit": {"include": ["0"], "steps": 1}}], train_data=train, measure_speed=False)
