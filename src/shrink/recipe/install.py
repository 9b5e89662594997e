"""Installing a compressed layer in the model and recording it (shared by every step runner)."""
from __future__ import annotations

import math

import torch
from torch import nn

from shrink.modules.input_scaled import InputScaled
from shrink.modules.quant_conv2d import QuantConv2d
from shrink.modules.quant_linear import QuantLinear
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


def install(model, t: Target, qt: QTensor, rec: StepRecord, fmt: str, err: float, err_rtn,
            seconds: float, note: str, input_scale: torch.Tensor | None = None) -> None:
    bias = getattr(t.module, "bias", None)
    bias = None if bias is None else bias.detach()
    if t.kind == "conv2d":
        c = t.module
        ql = QuantConv2d.from_qtensor(qt, bias, in_channels=c.in_channels, kernel_size=c.kernel_size,
                                      stride=c.stride, padding=c.padding, dilation=c.dilation, groups=c.groups,
                                      padding_mode=c.padding_mode)
    else:
        ql = QuantLinear.from_qtensor(qt, bias)
    new: nn.Module = ql if input_scale is None else InputScaled(ql, input_scale)
    w = t.weight_view().detach()
    device = w.device
    if device.type != "cpu":  # codes are packed on the CPU; the layer goes where the model is
        new = new.to(device)
    replace_module(model, t.name, new)
    w = w.float()
    db = sqnr(w, dequantize(qt).float())
    rec.layers.append(LayerRecord(name=t.name, shape=(t.out_features, t.in_features), format=fmt,
                                  bytes_fp32=4 * w.numel(), bytes_stored=qt.nbytes, error=err,
                                  error_rtn=err_rtn, sqnr_db=db, seconds=seconds, kernel=ql.kernel,
                                  note=(note + (f"; kernel fallback: {ql.kernel_reason}" if ql.kernel_reason else "")).strip("; ")))


def fmt(spec: QuantSpec) -> str:
    base = f"int{spec.bits}"
    return f"{base}-g{spec.group_size}" if spec.granularity == "group" else f"{base}-channel"
