"""`shrink inspect MODEL` as a library call: layers, sizes, weight statistics and
per-layer sensitivity to quantization.

Data-free rows come from eval/inspect.py. With calibration data this adds each float
layer's output-error proxy for int4-g128 round-to-nearest, relative to its output energy,

    rel_err = tr(dW H dW^T) / tr(W H W^T),   H = X^T X over the layer's calibration inputs,

which is ||dW X||^2 / ||W X||^2 (bias left out: quantization does not touch it). Layers are
ranked by it (by weight SQNR at int4-g128 without data): the top of the ranking is what to
keep at higher precision.

Cost: at most MAX_BATCHES calibration batches, run block by block (SequentialRunner) so
only one block's Hessians exist at a time; targets outside the blocks (an LM head) get
one more forward pass with hooks on them alone.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from shrink.eval.inspect import SQNR_FORMATS, layer_rows, rank_rows, rtn_weight
from shrink.surgery import SequentialRunner, Target, find_blocks, select_modules
from shrink.surgery.capture import call_model, default_forward_kwargs, input_hooks

from .hessians import HessianCollector, hessian_error
from .records import model_nbytes, model_params

MAX_BATCHES = 8
ERROR_FORMAT = "int4-g128"
Progress = Callable[[str, int, int], None]


def output_errors(model: nn.Module, batches: Sequence, targets: Iterable[Target] | None = None, *,
                  fmt: str = ERROR_FORMAT, max_batches: int = MAX_BATCHES,
                  progress: Progress | None = None) -> dict[str, float]:
    """{target name: tr(dW H dW^T) / tr(W H W^T)} for RTN at `fmt`, H from the inputs the
    targets see on the first `max_batches` batches of the unmodified model. Default targets:
    every float Linear / Conv1D / Conv2d, the output head included. A layer that saw only
    zero inputs (tr(W H W^T) = 0) gets NaN. The model is not changed."""
    batches = list(batches)[:max_batches]
    if not batches:
        raise ValueError("output_errors: no calibration batches")
    if targets is None:
        targets = select_modules(model, include_head=True).targets
    targets = list(targets)
    if not targets:
        return {}
    out: dict[str, float] = {}
    collector = HessianCollector(targets)

    def settle(done: list[Target]) -> None:
        for t in done:
            if t.name in collector:
                out[t.name] = relative_error(t.weight_view().detach(), collector.hessians(t.name), fmt)
                collector.pop(t.name)

    try:
        blocks = find_blocks(model)
    except ValueError:  # no repeated blocks: one forward pass with hooks on every target
        blocks = None
    rest = targets
    if blocks is not None:
        runner = SequentialRunner(model, targets=targets, blocks=blocks)
        rest = runner.unassigned
        step = (lambda i, n: progress("output error", i, n)) if progress is not None else None
        runner.run(batches, lambda i, block, ts: settle(ts), on_input=collector, progress=step)
    if rest:
        _hooked_pass(model, batches, rest, collector)
        settle(rest)
    return out


def relative_error(w: torch.Tensor, hessians: list[torch.Tensor], fmt: str = ERROR_FORMAT) -> float:
    """tr(dW H dW^T) / tr(W H W^T) for w ([out, in]) after RTN at `fmt` (one H per row group)."""
    w = w.to(torch.float32)
    err = hessian_error(w, rtn_weight(w, fmt), hessians)
    energy = hessian_error(w, torch.zeros_like(w), hessians)
    return err / energy if energy > 0 else math.nan


def _hooked_pass(model: nn.Module, batches: Sequence, targets: list[Target], on_input) -> None:
    """Run the whole model on each batch, feeding the targets' inputs to on_input."""
    handles = input_hooks(targets, on_input)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    extra = default_forward_kwargs(model)
    try:
        with torch.no_grad():
            for b in batches:
                call_model(model, b, extra)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode


def inspect_module(model: nn.Module, batches: Sequence | None = None, *, progress: Progress | None = None) -> dict:
    """The inspect document (see inspect_model) for a model in memory; with `batches`
    (as compress takes them; the first MAX_BATCHES are used) the output-error proxy and
    the ranking by it are added."""
    batches = None if batches is None else list(batches)[:MAX_BATCHES] or None
    rows = layer_rows(model)
    params, stored = model_params(model), model_nbytes(model)
    floats = [r for r in rows if not r.quantized and r.kind != "embedding"]
    calib = {"used": False, "batches": 0, "format": ERROR_FORMAT, "max_batches": MAX_BATCHES, "reason": None}
    if not floats:
        calib["reason"] = "every layer is already quantized"
    elif batches is None:
        calib["reason"] = "no calibration data"
    else:
        targets = [t for t in select_modules(model, include_head=True).targets if t.kind != "embedding"]
        errors = output_errors(model, batches, targets, progress=progress)
        for r in rows:
            r.output_error_int4 = errors.get(r.name)
        calib.update(used=True, batches=len(batches))
    ranked_by = "output_error_int4" if calib["used"] else "sqnr_int4"
    order = rank_rows(rows, ranked_by)
    layer_params = sum(r.params for r in rows)
    layer_bytes = sum(r.bytes for r in rows)
    return {
        "totals": {
            "params": params, "size_bytes": stored, "bytes_fp32": 4 * params, "bytes_fp16": 2 * params,
            "bits_per_weight": 8.0 * stored / params if params else None,
            "layers": len(rows), "compressible_layers": sum(r.compressible for r in rows),
            "quantized_layers": sum(r.quantized for r in rows),
            "layer_params": layer_params, "layer_bytes": layer_bytes,
            "other_params": params - layer_params, "other_bytes": stored - layer_bytes,
        },
        "sqnr_formats": list(SQNR_FORMATS),
        "calibration": calib,
        "sensitivity": {"ranked_by": ranked_by, "order": order},
        "layers": [r.to_dict() for r in rows],
    }


def inspect_model(model_ref: str, *, data: bool = True, seed: int = 0, progress: Progress | None = None) -> dict:
    """Inspect a built-in model, a model directory or a DIR written by `shrink compress`.

    data=True uses the calibration batches `job.prepare` builds for the model (for a
    compressed DIR: for the model it was made from), at most MAX_BATCHES of them.
    Returns {"model", "source_model", "totals", "sqnr_formats", "calibration",
    "sensitivity": {"ranked_by", "order"}, "layers": [row dicts]} (floats may be NaN/inf:
    pass through job._jsonable before writing JSON)."""
    from shrink.models.io import load

    from .job import prepare, source_of

    torch.manual_seed(seed)
    source = source_of(model_ref)
    batches = None
    if source == str(model_ref):
        if data:
            model, batches, _, _, _ = prepare(model_ref, seed=seed)
        else:
            model = load(model_ref)
    else:
        model = load(model_ref)
        if data and select_modules(model, include_head=True).targets:  # float layers left to measure
            _, batches, _, _, _ = prepare(source, seed=seed)
    doc = inspect_module(model, batches, progress=progress)
    if not data and doc["calibration"]["reason"] == "no calibration data":
        doc["calibration"]["reason"] = "calibration skipped (data=False, --no-data)"
    return {"model": str(model_ref), "source_model": source, **doc}
