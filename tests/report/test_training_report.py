"""A training step's evidence in the report: loss curve plot, facts, evaluations."""
from __future__ import annotations

import re

from shrink.report.html import render_html
from shrink.report.training import training_details


def _result(training):
    return {"model": "m", "recipe": [{"finetune": {"steps": 40}}],
            "steps": [{"index": 1, "step": {"finetune": {"steps": 40}}, "layers": [], "skipped": [],
                       "details": {"training": training}}]}


def test_loss_curve_and_facts_are_drawn_from_the_record():
    tr = {"steps": 40, "steps_run": 25, "loss": "distill", "lr": 0.001, "precision": "bf16", "seconds": 2.5,
          "loss_first": 3.0, "loss_last": 0.5, "curve": [3.0, 2.0, 1.0, 0.7, 0.5], "stopped_early": True,
          "best_step": 20, "skipped_steps": 0, "resumed_from": 10,
          "evaluations": [{"step": 10, "value": 0.91}, {"step": 20, "value": 0.95}]}
    html = render_html(_result(tr))
    assert 'data-plot="training-loss"' in html
    assert "25 of 40 steps" in html and "precision bf16" in html
    assert "best weights from step 20" in html and "resumed from a checkpoint at step 10" in html
    assert "step 20: 0.95" in html
    points = re.search(r"<polyline data-mark=\"line\" points=\"([^\"]+)\"", html).group(1).split()
    assert len(points) == 5


def test_nothing_drawn_without_a_training_record():
    assert training_details({"rounds": []}) == ""
    assert training_details(None) == ""
    html = training_details({"training": {"steps": 3, "curve": [1.0]}})
    assert "fewer than two loss values" in html
