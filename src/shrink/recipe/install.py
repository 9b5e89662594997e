"""Installing a compressed layer in the model and recording it (shared by every step runner)."""
from __future__ import annotations

import math

import torch
from torch import nn

from shrink.modules.input_scaled import InputScaled
from shrink.modules.quant_conv2d import QuantConv2d
from shrink.modules.quant_linear import QuantLinear
from shrink.modules.sparse_quant_conv2d import SparseQuantConv2d
from shrink.modules.sparse_quant_linear import SparseQuantLinear, sparse_codes_layout
from shrink.quant import QTensor, QuantSpec, dequantize
from shrink.surgery import Target, replace_module

from .records import LayerRecord, StepRecord


def as_linear(w: torch.Tensor, bias) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device)
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias is not None:
            lin.bias.copy_(bias.detach())
    return lin


def sqnr(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    noise = float(((w - w_hat) ** 2).sum())
    return math.inf if noise == 0 else 10 * math.log10(float((w ** 2).sum()) / noise)


def sparse_pattern(t: Target) -> tuple[torch.Tensor, int | None, int | None] | None:
    """(mask [out, in] bool on the CPU, n, m) of a layer an earlier prune step left sparse: a
    SparseLinear or SparseConv2d (n, m for its N:M layout, else None), or a Linear / Conv1D /
    Conv2d whose zeros the prune step kept dense (its `shrink_prune_mask`, in the weight's own
    layout: Conv1D [in, out], Conv2d [out, in/groups, kh, kw]); None for any other layer."""
    if t.kind in ("sparse_linear", "sparse_conv2d"):
        mod = t.module
        return mod.mask().cpu(), mod.n, mod.m
    mask = getattr(t.module, "shrink_prune_mask", None)
    if t.kind in ("linear", "conv1d", "conv2d") and isinstance(mask, torch.Tensor) and mask.dtype == torch.bool:
        mask = mask.t() if t.kind == "conv1d" else mask.reshape(mask.shape[0], -1) if t.kind == "conv2d" else mask
        if tuple(mask.shape) == (t.out_features, t.in_features):
            return mask.cpu(), None, None
    return None


def _quant_layer(t: Target, qt: QTensor, bias, pattern, fmt: str) -> tuple[nn.Module, str, str]:
    """(module, format, note): a SparseQuantLinear / SparseQuantConv2d keeping the codes of the
    kept weights and the pattern where the layer was pruned and that is smaller, else a dense
    QuantLinear / QuantConv2d."""
    if t.kind in ("conv2d", "sparse_conv2d"):
        c = t.module
        geo = dict(in_channels=c.in_channels, kernel_size=c.kernel_size, stride=c.stride, padding=c.padding,
                   dilation=c.dilation, groups=c.groups, padding_mode=c.padding_mode)
        dense = lambda: QuantConv2d.from_qtensor(qt, bias, **geo)  # noqa: E731
        sparse = lambda *p: SparseQuantConv2d.from_qtensor(qt, bias, *p, **geo)  # noqa: E731
    else:
        dense = lambda: QuantLinear.from_qtensor(qt, bias)  # noqa: E731
        sparse = lambda *p: SparseQuantLinear.from_qtensor(qt, bias, *p)  # noqa: E731
    if pattern is None:
        return dense(), fmt, ""
    mask, n, m = pattern
    if qt.spec.format != "int":
        return dense(), fmt, f"pruned, but {qt.spec.format} codes have no exact zero code: the codes are stored dense"
    layout = sparse_codes_layout(tuple(mask.shape), int(mask.sum()), qt.spec.bits, n, m)
    if layout == "dense":
        return dense(), fmt, ("pruned, but a sparse pattern would cost more than the codes it drops: the codes are "
                              "stored dense")
    ql = sparse(mask, layout, n, m)
    pat = f"{n}:{m}" if layout == "nm" else layout
    return ql, f"{fmt}+{pat}", (f"sparse codes: the {ql.nnz} kept of {mask.numel()} codes + the {pat} pattern "
                                f"(sparsity {ql.sparsity:.4f}); pruned weights dequantize to exactly 0")


def install(model, t: Target, qt: QTensor, rec: StepRecord, fmt: str, err: float, err_rtn,
            seconds: float, note: str, input_scale: torch.Tensor | None = None, pattern=None) -> None:
    """Replace target t by its quantized layer and record it. A layer an earlier prune step
    left sparse (or `pattern` = (mask, n, m) given) keeps only its kept weights' codes."""
    bias = getattr(t.module, "bias", None)
    bias = None if bias is None else bias.detach()
    ql, fmt, how = _quant_layer(t, qt, bias, pattern if pattern is not None else sparse_pattern(t), fmt)
    note = f"{note}; {how}" if how else note
    new: nn.Module = ql if input_scale is None else InputScaled(ql, input_scale)
    w = t.weight_view().detach()
    device = w.device
    if device.type != "cpu":  # codes are packed on the CPU; the layer goes where the model is
        new = new.to(device)
    replace_module(model, t.name, new)
    w = w.float()
    w_hat = ql.dense_weight() if isinstance(ql, (SparseQuantLinear, SparseQuantConv2d)) else dequantize(qt)
    db = sqnr(w, w_hat.float().to(w.device))
    rec.layers.append(LayerRecord(name=t.name, shape=(t.out_features, t.in_features), format=fmt,
                                  bytes_fp32=4 * w.numel(), bytes_stored=ql.nbytes, error=err,
                                  error_rtn=err_rtn, sqnr_db=db, seconds=seconds, kernel=ql.kernel,
                                  note=(note + (f"; kernel fallback: {ql.kernel_reason}" if ql.kernel_reason else "")).strip("; ")))


def fmt(spec: QuantSpec) -> str:
    base = f"int{spec.bits}"
    return f"{base}-g{spec.group_size}" if spec.granularity == "group" else f"{base}-channel"
