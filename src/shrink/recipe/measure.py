"""What compress and eval measure of a model, before and after: size, quality,
latency, the energy estimate, and the seeds' four ratios between two measurements."""
from __future__ import annotations

from torch import nn

from shrink.eval.energy import energy_estimate
from shrink.eval.latency import latency_metric

from .records import model_nbytes, model_params


def measure(model: nn.Module, evaluate, probe: dict | None) -> dict:
    """{"size_bytes", "params"} plus "quality" (evaluate given) and "latency_ms", "latency",
    "energy" (a probe from shrink.eval.latency.latency_probe given)."""
    out = {"size_bytes": model_nbytes(model), "params": model_params(model)}
    if evaluate is not None:
        out["quality"] = evaluate(model)
    if probe is not None:
        out["latency"] = latency_metric(model, probe)
        out["latency_ms"] = out["latency"]["latency_ms"]
        out["energy"] = energy_estimate(model, probe["batch1"])
    return out


def four_ratios(baseline: dict, compressed: dict) -> dict:
    """The seeds' success metrics, original / compressed: R size, A quality kept
    (for a lower-is-better metric such as perplexity, original / compressed too),
    L batch-1 latency, E estimated energy of one batch-1 forward pass."""
    def ratio(a, b):
        return None if a is None or b is None or b == 0 else a / b

    q0, q1 = baseline.get("quality"), compressed.get("quality")
    a = None
    if q0 and q1:
        higher = q0.get("higher_is_better", True)
        a = ratio(q1["value"], q0["value"]) if higher else ratio(q0["value"], q1["value"])
    e0, e1 = baseline.get("energy"), compressed.get("energy")
    return {"R": ratio(baseline["size_bytes"], compressed["size_bytes"]), "A": a,
            "L": ratio(baseline.get("latency_ms"), compressed.get("latency_ms")),
            "E": ratio(e0 and e0["joules"], e1 and e1["joules"])}
