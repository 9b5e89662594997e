"""The data behind a report's plots, taken from a finished run so that the report can
be drawn from result.json alone: weight histograms before and after with the
quantization grid, one real group's staircase, mixed-precision sensitivities, the
plan for the model (memory per format, fit on a device) and roofline points."""
from __future__ import annotations

import math

import torch
from torch import nn

from shrink.formats import CodebookFormat, FloatFormat, IntFormat
from shrink.modules.input_scaled import InputScaled
from shrink.modules.quant_conv2d import QuantConv2d
from shrink.modules.quant_linear import QuantLinear
from shrink.modules.w8a8_linear import W8A8Linear
from shrink.quant import QTensor
from shrink.quant.core import decode

from .records import StepRecord

BINS = 64
MAX_POINTS = 256
MAX_LAYERS = 4


def run_figures(original: nn.Module, compressed: nn.Module, steps: list[StepRecord]) -> dict:
    """{"weights": [...], "staircase": {...} | None, "sensitivity": [...] | None}."""
    weights, staircase = [], None
    for rec, layer in _chosen_layers(steps):
        name, fmt = layer.name, layer.format
        try:
            view = _layer_view(original.get_submodule(name), compressed.get_submodule(name))
        except AttributeError:  # replaced again by a later step, or not a weight layer
            continue
        if view is None or view[0].numel() == 0:
            continue
        w, w_hat, w_q, w_hat_q, grid_of, group = view
        lo, hi = _range(w, w_hat)
        # the group holding the largest |w| (in the quantized units): its grid spans the histogram
        r, c = divmod(int(w_q.abs().argmax()), w_q.shape[1])
        grid = grid_of(r, c) if grid_of is not None and w_q is w else None  # grid in the weights' own units
        weights.append({"layer": name, "step": rec.index, "format": fmt,
                        "hist": _hist(w, lo, hi), "hist_after": _hist(w_hat, lo, hi),
                        "grid": grid,
                        "thresholds": _thresholds(w, w_hat) if _is_sparse(compressed.get_submodule(name)) else []})
        if staircase is None:
            staircase = _staircase(name, fmt, w_q, w_hat_q, r, c, group)
    sens = [s for rec in steps for s in rec.details.get("sensitivity", [])]
    return {"weights": weights, "staircase": staircase, "sensitivity": sens or None}


def plan_section(model: nn.Module, params: int, device: str | None, measured: dict) -> tuple[dict, dict | None]:
    """The plan document for this model (its architecture when it has a Hugging Face config,
    else its parameter count) and the roofline on `device`: each planned format's decode
    step, and the run's own models before and after (weights read once per token)."""
    plan = plan_for(model, params, device)
    return plan.to_json(), _roofline(plan, measured)


def plan_for(model: nn.Module, params: int, device: str | None):
    """shrink.plan's Plan for this model: from its Hugging Face config when it has one."""
    from shrink.plan.arch import from_hf_config
    from shrink.plan.planner import build_plan

    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "to_dict"):
        try:
            return build_plan(from_hf_config(cfg.to_dict()), device=device)
        except (ValueError, KeyError, TypeError):
            pass
    return build_plan(params=params, device=device)


def weight_room(plan) -> int | None:
    """Bytes left for the weights on the plan's device: usable memory - KV cache - activations."""
    if plan.usable_bytes is None:
        return None
    kv = plan.formats[0].kv_cache_bytes if plan.formats else 0
    return plan.usable_bytes - kv - plan.activation_bytes


def _roofline(plan, measured: dict) -> dict | None:
    dev = plan.device
    if dev is None or dev.bandwidth_bytes_per_s is None:
        return None
    peaks = {f: p for f in ("fp32", "fp16", "bf16", "fp8", "int8", "int4") if (p := dev.peak(f))}
    if not peaks:
        return None
    bw = dev.bandwidth_bytes_per_s
    flops_per_token = 2 * plan.model.params
    points = []
    for f in plan.formats:
        if f.intensity:
            peak = max(peaks.values()) if f.ridge is None else f.ridge * bw
            points.append({"label": f"{f.name} decode", "intensity": f.intensity,
                           "flops_per_s": min(peak, bw * f.intensity)})
    for label, m in measured.items():  # the run's own models: 2 FLOP per parameter per stored byte
        if m.get("size_bytes"):
            x = 2 * m["params"] / m["size_bytes"]
            points.append({"label": label, "intensity": x, "flops_per_s": min(max(peaks.values()), bw * x)})
    return {"device": dev.name, "bandwidth_bytes_per_s": bw, "peak_flops": peaks, "points": points,
            "flops_per_token": flops_per_token}


# ---------------------------------------------------------------- layers

def _chosen_layers(steps: list[StepRecord]) -> list:
    """Up to four layers of the last step that compressed any: the first, the one with
    the worst weight SQNR, the middle one and the last."""
    for rec in reversed(steps):
        if rec.layers:
            ls = rec.layers
            worst = min(ls, key=lambda l: l.sqnr_db if math.isfinite(l.sqnr_db) else math.inf)
            picked = list({l.name: l for l in (ls[0], worst, ls[len(ls) // 2], ls[-1])}.values())
            return [(rec, l) for l in picked[:MAX_LAYERS]]
    return []


def _matrix(mod: nn.Module) -> torch.Tensor | None:
    w = getattr(mod, "weight", None)
    if not isinstance(w, torch.Tensor):
        return None
    w = w.detach().float().cpu()
    if type(mod).__name__ == "Conv1D":  # transformers' GPT-2 layer stores [in, out]
        return w.t()
    return w.reshape(w.shape[0], -1)


def _layer_view(orig: nn.Module, new: nn.Module):
    """(w, w_hat) in the original layer's units, (w_q, w_hat_q) in the units that were
    quantized (they differ by a per-input-channel scale after AWQ/SmoothQuant), a function
    (row, column) -> the grid values of that weight's group, and the group size along the
    input; None for a layer that was not replaced."""
    w = _matrix(orig)
    if w is None:
        return None
    col = None
    if isinstance(new, InputScaled):
        col, new = new.input_scale.detach().float().cpu(), new.inner
    if isinstance(new, (QuantLinear, QuantConv2d)):
        qt = new.to_qtensor()
        w_hat_q = qt.dequantize().float().cpu()
        grid_of = _grid_fn(qt, w.shape[1])
        group = qt.layout.group_size if qt.layout.axis == 0 else w.shape[1]
    elif isinstance(new, W8A8Linear):
        w_hat_q = new.dequantized_weight().float().cpu()
        scales = new.scales.detach().float().cpu()
        if new.input_scale is not None:
            col = new.input_scale.detach().float().cpu()
        grid_of = lambda r, c: [float(q) * float(scales[r]) for q in range(-127, 128)]  # noqa: E731
        group = w.shape[1]
    elif callable(getattr(new, "dense_weight", None)):   # a pruned layer stored sparse
        w_hat_q = new.dense_weight().detach().float().cpu()
        grid_of, group = None, w.shape[1]
    else:
        return None
    if w_hat_q.numel() != w.numel():   # structured pruning resized it: no before/after pairing
        return None
    w_hat_q = w_hat_q.reshape(w.shape)
    if col is None:
        return w, w_hat_q, w, w_hat_q, grid_of, group
    # y = W' (x * c): the effective weight is W' diag(c), and W' was quantized from W / c
    return w, w_hat_q * col[None, :], w / col[None, :], w_hat_q, grid_of, group


def _is_sparse(mod: nn.Module) -> bool:
    return callable(getattr(mod, "dense_weight", None))


def _thresholds(w: torch.Tensor, w_hat: torch.Tensor) -> list[float]:
    """Pruning's magnitude threshold: the largest |w| that was set to zero (none if nothing was)."""
    pruned = (w_hat == 0) & (w != 0)
    return [float(w[pruned].abs().max())] if bool(pruned.any()) else []


def _grid_fn(qt: QTensor, cols: int):
    lay = qt.layout
    scale = None if qt.scale is None else lay.params_as_blocks(qt.scale, "scale")
    zp = None if qt.zero_point is None else lay.params_as_blocks(qt.zero_point, "zero_point")
    g = qt.grid
    if isinstance(g, IntFormat):
        codes = torch.arange(g.qmin, g.qmax + 1)
    elif isinstance(g, CodebookFormat):
        codes = torch.arange(g.stored_values().numel())
    elif isinstance(g, FloatFormat) and g.bits <= 8:
        codes = torch.arange(1 << g.bits)
    else:
        return None

    def grid(r: int, c: int) -> list[float]:
        # the block of weight [r, c]: per-tensor is one block; otherwise rows x groups along the input
        br, bg = (0, (r * cols + c) // lay.group_size) if lay.axis == -1 else (r, c // lay.group_size)
        s = None if scale is None else scale[br, bg].float().cpu()
        z = None if zp is None else zp[br, bg].float().cpu()
        v = decode(codes, s, z, g)
        v = v[torch.isfinite(v)].unique()
        return [float(x) for x in v]

    return grid if qt.layout.axis in (0, -1) else None


def _staircase(name: str, fmt: str, w_q: torch.Tensor, w_hat_q: torch.Tensor, r: int, c: int, size: int) -> dict:
    """One group of a real layer: its weights sorted, each with the value it was rounded to."""
    start = (c // size) * size
    x, y = w_q[r, start:start + size], w_hat_q[r, start:start + size]
    order = torch.argsort(x)
    x, y = x[order], y[order]
    if x.numel() > MAX_POINTS:
        idx = torch.linspace(0, x.numel() - 1, MAX_POINTS).round().long()
        x, y = x[idx], y[idx]
    return {"layer": name, "format": fmt, "row": r, "columns": [start, start + size],
            "w": [float(v) for v in x], "w_hat": [float(v) for v in y]}


def _range(*ts: torch.Tensor) -> tuple[float, float]:
    lo = min(float(t.min()) for t in ts)
    hi = max(float(t.max()) for t in ts)
    return (lo - 0.5, hi + 0.5) if hi <= lo else (lo, hi)


def _hist(t: torch.Tensor, lo: float, hi: float) -> dict:
    counts = torch.histc(t.flatten().double(), bins=BINS, min=lo, max=hi)
    edges = torch.linspace(lo, hi, BINS + 1, dtype=torch.float64)
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}
