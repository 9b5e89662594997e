"""The export command's summary line for each kind of verification record (a classifier's
record once crashed it: it has prediction agreement, not token top-1 agreement)."""
from __future__ import annotations

from shrink.cli.export import _summary


def _record(agreement: dict) -> dict:
    return {"path": "m.onnx", "format": "onnx", "bytes": 20_000,
            "verification": {"runtime": "onnxruntime", "passed": True, "vs_stored_weights": agreement}}


def test_classifier_encoder_and_lm_records_each_get_their_line():
    cls = _summary(_record({"rel_rmse": 1e-7, "max_abs": 1e-6, "agreement": 0.98, "examples": 450}))
    assert "prediction agreement 98.0% over 450 examples" in cls
    enc = _summary(_record({"rel_rmse": 2e-5, "min_cosine": 0.999991}))
    assert "embedding cosine min 0.999991" in enc
    lm = _summary(_record({"rel_rmse": 3e-3, "top1_agreement": 0.995, "tokens": 512}))
    assert "top-1 agreement 99.5% over 512 tokens" in lm
    assert "PASSED" in cls and "PASSED" in enc and "PASSED" in lm
