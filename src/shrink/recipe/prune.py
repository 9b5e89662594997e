"""Run the unstructured pruning step: magnitude (layer, global or sensitivity-allocated),
Wanda and SparseGPT (block by block on calibration data, each block pruned on its pruned
predecessor's outputs, as the papers do), then store each layer sparse.

Every layer's record says the method, the sparsity reached, the stored bytes (the sparse
layout's exact count) and the layer-output error tr((W - W')H(W - W')^T) next to
magnitude pruning's at the same sparsity, so Wanda's and SparseGPT's gain is visible.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from shrink.algos.magnitude import global_magnitude_masks, magnitude_mask
from shrink.algos.nm import nm_mask
from shrink.algos.sparsegpt import layer_loss, sparsegpt
from shrink.algos.sparsity import allocate_sparsity
from shrink.algos.wanda import wanda_mask
from shrink.formats.sparse import best_layout
from shrink.modules import SparseLinear
from shrink.surgery import SequentialRunner, Target, replace_module
from shrink.surgery.capture import call_model
from shrink.train.loop import has_logits, output_tensor

from .hessians import HessianCollector
from .install import fmt, install, sqnr
from .prune_steps import Prune
from .records import LayerRecord, StepRecord

SENSITIVITY_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
SENSITIVITY_BATCHES = 2


def run_unstructured(model: nn.Module, step: Prune, targets: list[Target], batches, rec: StepRecord,
                     report, sc=None) -> None:
    """magnitude / wanda / sparsegpt on `targets` of `model` (in place); sc: the run's
    StepCheckpoint (recipe/resume.py), a checkpoint after each block of wanda / sparsegpt."""
    from .resume import block_hooks

    targets = [t for t in targets if _prunable(t, rec, step.nm(), explicit=step.include is not None)]
    if not targets:
        raise ValueError(f"prune: method {step.method} found no dense Linear, Conv1D or Conv2d layer to prune (an "
                         "earlier step stored them sparse or quantized, or include/exclude matched none)")
    if step.method == "magnitude" or not targets:
        _magnitude(model, step, targets, batches, rec, report)
        return
    runner = SequentialRunner(model, targets=targets)
    coll = HessianCollector(targets)
    done = [0]
    start, after = block_hooks(sc, runner, done)

    def process_block(i: int, block: nn.Module, block_targets: list[Target]) -> None:
        for t in block_targets:
            t0 = time.perf_counter()
            h = coll.hessians(t.name)[0]
            w = t.weight_view().detach().float()
            ref_mask = _magnitude_mask(w, step, step.sparsity, t.name)
            err_ref = layer_loss(w, w * ref_mask, h)
            if step.method == "wanda":
                act = torch.sqrt(torch.diagonal(h).clamp_min(0)).float()   # ||X_j|| up to one common factor
                mask = wanda_mask(w, act, step.sparsity, pattern=step.nm(), name=t.name)
                new, qt = w * mask, None
                note = "wanda: |W|·||X|| per output row"
            else:
                res = sparsegpt(w, h, step.sparsity, pattern=step.nm(), block_size=step.block_size,
                                damp=step.damp, spec=step.spec(), name=t.name)
                mask, new, qt = res.mask, res.weight, res.qtensor
                note = "sparsegpt: OBS update of the surviving weights" + (
                    f"; Cholesky retried {res.retries}x" if res.retries else "")
            err = layer_loss(w, new, h)
            note += f"; error_rtn column = magnitude pruning's error at the same sparsity ({err_ref:.4g})"
            if qt is not None:
                install(model, t, qt, rec, f"{fmt(step.spec())}+sparse{_level(mask):.0%}", err, err_ref,
                        time.perf_counter() - t0, note + "; jointly quantized",
                        pattern=(mask.cpu(), *(step.nm() or (None, None))))
            else:
                install_sparse(model, t, new, mask, step, rec, err, err_ref, time.perf_counter() - t0, note)
            coll.pop(t.name)
            done[0] += 1
            if report:
                report(done[0], len(targets))

    runner.run(batches, process_block, on_input=coll, start=start, after_block=after)
    rest = list(runner.unassigned)
    if rest:  # outside the repeated blocks (e.g. a classifier head): no activations, magnitude
        _magnitude(model, step, rest, None, rec, None,   # wanda/sparsegpt steps are layer-scoped
                   note="outside the transformer blocks: no activations captured, magnitude pruning")


def _prunable(t: Target, rec: StepRecord, nm: tuple[int, int] | None = None, explicit: bool = False) -> bool:
    """Whether the step prunes t; a layer the N:M pattern cannot take is an error when the
    recipe named it (include:), else skipped with the reason."""
    if nm is not None and t.in_features % nm[1]:
        msg = (f"{t.name}: pattern {nm[0]}:{nm[1]} needs in_features divisible by {nm[1]}, got {t.in_features}")
        if explicit:
            raise ValueError(f"prune: {msg}; exclude the layer or prune it unstructured")
        rec.skipped.append({"name": t.name, "reason": msg + "; left dense"})
        return False
    if t.kind == "conv2d" and t.module.groups != 1:
        rec.skipped.append({"name": t.name, "reason": f"grouped Conv2d (groups={t.module.groups}): "
                                                      "pruning handles ungrouped convolutions"})
        return False
    if t.kind == "embedding":
        return False
    return True


def _magnitude_mask(w: torch.Tensor, step: Prune, sparsity: float | None, name: str) -> torch.Tensor:
    nm = step.nm()
    if nm is not None:
        return nm_mask(w.abs(), nm[0], nm[1], name=name)
    return magnitude_mask(w, sparsity, name=name)


def _magnitude(model, step: Prune, targets: list[Target], batches, rec: StepRecord, report,
               note: str = "") -> None:
    t0 = time.perf_counter()
    weights = {t.name: t.weight_view().detach().float() for t in targets}
    if step.scope == "global":
        masks = global_magnitude_masks(weights, step.sparsity)
        note = note or f"global magnitude threshold over {len(targets)} layers"
    elif step.scope == "sensitivity":
        ratios = sensitivity_ratios(model, step, targets, batches, rec)
        masks = {n: magnitude_mask(w, ratios[n], name=n) for n, w in weights.items()}
        note = note or "per-layer sparsity from the measured sensitivity (details: sensitivity)"
    else:
        masks = {n: _magnitude_mask(w, step, step.sparsity, n) for n, w in weights.items()}
        note = note or "magnitude: smallest |w| of the layer"
    per = (time.perf_counter() - t0) / max(1, len(targets))
    for n, t in enumerate(targets, 1):
        w, m = weights[t.name], masks[t.name]
        mse = float(((w * ~m) ** 2).mean())
        install_sparse(model, t, w * m, m, step, rec, mse, None, per, note + "; error = weight MSE")
        if report:
            report(n, len(targets))


def sensitivity_ratios(model, step: Prune, targets: list[Target], batches, rec: StepRecord) -> dict[str, float]:
    """Prune one layer at a time at 10%..90% and measure how far the model's outputs move
    (KL of the output distribution, or MSE of hidden states) on a calibration slice; choose
    per-layer ratios that reach the step's sparsity over all these layers at the least summed loss."""
    if not batches:
        raise ValueError("prune: scope sensitivity measures each layer's effect on the outputs: it needs "
                         "calibration data")
    sample = list(batches)[:SENSITIVITY_BATCHES]
    with torch.no_grad():
        ref = [output_tensor(call_model(model, b)).float() for b in sample]
    logits = ref[0].shape[-1] > 1 and has_logits(model, sample[0])
    curves: dict[str, dict[float, float]] = {}
    params: dict[str, int] = {}
    for t in targets:
        w0 = t.weight_view().detach().clone()
        params[t.name] = w0.numel()
        curves[t.name] = {}
        try:
            for level in SENSITIVITY_LEVELS:
                t.set_weight(w0 * magnitude_mask(w0.float(), level, name=t.name).to(w0.dtype))
                with torch.no_grad():
                    outs = [output_tensor(call_model(model, b)).float() for b in sample]
                curves[t.name][level] = sum(_gap(o, r, logits) for o, r in zip(outs, ref)) / len(sample)
        finally:
            t.set_weight(w0)
    alloc = allocate_sparsity(curves, params, step.sparsity)
    rec.details["prune_sensitivity"] = [{"layer": n, "loss": {f"{k:g}": v for k, v in c.items()},
                                   "sparsity": alloc.ratios[n]} for n, c in curves.items()]
    rec.details["allocation"] = {"target": step.sparsity, "achieved": alloc.achieved, "loss": alloc.loss,
                                 "feasible": alloc.feasible, "note": alloc.note}
    return alloc.ratios


def _gap(out: torch.Tensor, ref: torch.Tensor, logits: bool) -> float:
    if not logits:
        return float(((out - ref) ** 2).mean() / (ref ** 2).mean().clamp_min(1e-12))
    p = torch.log_softmax(ref.reshape(-1, ref.shape[-1]), -1)
    q = torch.log_softmax(out.reshape(-1, out.shape[-1]), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def _level(mask: torch.Tensor) -> float:
    return 1.0 - float(mask.float().mean())


def layout_for(step, shape: tuple[int, int], nnz: int, value_bytes: int) -> str:
    storage = getattr(step, "storage", "auto")
    if storage != "auto":
        return storage
    nm = step.nm() if isinstance(step, Prune) else None
    if nm is not None and shape[1] % nm[1] == 0:
        return "nm"
    return best_layout(shape, nnz, value_bytes)


def install_sparse(model, t: Target, w_new: torch.Tensor, mask: torch.Tensor, step, rec: StepRecord,
                   err: float, err_ref: float | None, seconds: float, note: str) -> None:
    """Replace target t by its pruned form: SparseLinear (bitmask, CSR or N:M storage) for
    Linear/Conv1D, SparseConv2d for a Conv2d, or the dense layer with zeros (storage dense,
    or where a sparse layout would not be smaller)."""
    w_orig = t.weight_view().detach()
    dtype = w_orig.dtype
    layout = layout_for(step, (t.out_features, t.in_features), int(mask.sum()), w_orig.element_size())
    nm = step.nm() if isinstance(step, Prune) else None
    bias = getattr(t.module, "bias", None)
    bias = None if bias is None else bias.detach()
    new_w = (w_new * mask).to(dtype)
    if layout == "dense":
        t.set_weight(new_w)
        mod, stored, kernel = t.module, w_orig.numel() * w_orig.element_size(), "dense"
        mod.shrink_prune_mask = param_mask(t, mask)   # finetune keeps the zeros
    else:
        kw = dict(layout=layout, n=nm[0] if layout == "nm" else None, m=nm[1] if layout == "nm" else None)
        if t.kind == "conv2d":
            from shrink.modules import SparseConv2d

            c = t.module
            mod = SparseConv2d.from_dense(new_w.view_as(c.weight), bias, mask=mask.view_as(c.weight), stride=c.stride,
                                          padding=c.padding, dilation=c.dilation, groups=c.groups, **kw)
        else:
            mod = SparseLinear.from_dense(new_w, bias, mask=mask, **kw)
        mod = mod.to(w_orig.device)
        replace_module(model, t.name, mod)
        stored, kernel = mod.nbytes - _bias_bytes(mod), mod.kernel
    sparsity = _level(mask)
    fmt = (f"{nm[0]}:{nm[1]}" if nm else f"sparse{sparsity:.0%}") + f" {layout}"
    rec.layers.append(LayerRecord(name=t.name, shape=(t.out_features, t.in_features), format=fmt,
                                  bytes_fp32=4 * mask.numel(), bytes_stored=int(stored), error=err, error_rtn=err_ref,
                                  sqnr_db=sqnr(w_orig.float(), new_w.float()), seconds=seconds, kernel=kernel,
                                  note=f"{note}; sparsity {sparsity:.4f} ({int((~mask).sum())} of {mask.numel()} zero)"))


def param_mask(t: Target, mask: torch.Tensor) -> torch.Tensor:
    """A [out, in] mask in the layout of the module's own weight parameter (Conv1D [in, out], conv 4-D)."""
    return mask.t() if t.kind == "conv1d" else mask.reshape(t.module.weight.shape)


def _bias_bytes(mod) -> int:
    b = getattr(mod, "bias", None)
    return 0 if b is None else b.numel() * b.element_size()
