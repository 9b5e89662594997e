"""Quantization-aware training: layers whose forward pass sees their weights (and, with
act_bits, their inputs) fake-quantized, so training learns weights that survive rounding;
then conversion to the real quantized modules.

- Weights: shrink's `fake_quantize` (straight-through gradient, masked outside the clip
  range) with the spec's scales. Until `freeze()` the scales follow the weights (a min/max
  observer re-run on every forward); from then on they are fixed. lsq=True instead makes
  the scales parameters learned from the start (quant/lsq.py), initialised from the
  observer (or from the PTQ layer's scales).
- Activations (act_bits): one asymmetric scale per tensor from an EMA min/max observer
  updated in training mode until `freeze()`; with lsq the frozen scale becomes a learned
  parameter from then on.
- A layer that an earlier PTQ step quantized (QuantLinear / QuantConv2d with the same
  spec) starts from its dequantized weight with its scales and zero-points, frozen: at
  step 0 the fake-quantized layer computes exactly what the PTQ layer computed.
- Scales are rounded to the spec's scale_dtype in the forward pass (straight-through), and
  `convert_qat` quantizes each final weight with exactly those scales, so the converted
  QuantLinear / QuantConv2d holds the codes the training forward used.

Activations are not quantized after conversion: QuantLinear and QuantConv2d are
weight-only, so the converted model runs its activations in float (run_qat records this).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shrink.modules.quant_conv2d import QuantConv2d
from shrink.modules.quant_linear import QuantLinear
from shrink.quant import QuantSpec, fake_quantize, quantize
from shrink.quant.lsq import clamp_scale, lsq_fake_quantize, lsq_grad_scale, observed_params
from shrink.quant.ranges import minmax_range, qparams_from_range
from shrink.surgery import Target, replace_module

QAT_KINDS = ("linear", "conv1d", "conv2d", "sparse_linear", "quant_linear", "quant_conv2d")


def same_grid(a: QuantSpec, b: QuantSpec) -> bool:
    """Whether two specs quantize to the same grid and blocks (the scales of one fit the other)."""
    keys = ("format", "bits", "symmetric", "granularity", "group_size", "axis", "full_range", "scale_dtype")
    return all(getattr(a, k) == getattr(b, k) for k in keys)


class ActFakeQuant(nn.Module):
    """Per-tensor asymmetric fake quantization of a layer's input with an EMA min/max observer."""

    def __init__(self, bits: int, lsq: bool = False, momentum: float = 0.1):
        super().__init__()
        if not 2 <= bits <= 8:
            raise ValueError(f"qat: act_bits must be in 2..8 (integer activations), got {bits}")
        self.spec = QuantSpec(bits=bits, symmetric=False, granularity="tensor", scale_dtype=torch.float32)
        self.lsq = bool(lsq)
        self.momentum = momentum
        self.register_buffer("lo", torch.zeros(()))
        self.register_buffer("hi", torch.zeros(()))
        self.register_buffer("observed", torch.zeros((), dtype=torch.long))   # batches seen
        self.register_buffer("frozen", torch.zeros((), dtype=torch.bool))
        self.register_buffer("zero_point", torch.zeros(()))
        self.scale = nn.Parameter(torch.ones(()), requires_grad=self.lsq)

    def observed_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        s, zp = qparams_from_range(self.lo.reshape(1, 1, 1), self.hi.reshape(1, 1, 1), self.spec, self.spec.grid())
        return s.reshape(()), zp.reshape(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frozen = bool(self.frozen)
        if self.training and not frozen:
            with torch.no_grad():
                lo, hi = minmax_range(x.detach().to(torch.float32).reshape(1, 1, -1))
                lo, hi = lo.reshape(()), hi.reshape(())
                first = int(self.observed) == 0
                m = 1.0 if first else self.momentum
                self.lo.mul_(1 - m).add_(m * lo)
                self.hi.mul_(1 - m).add_(m * hi)
                self.observed.add_(1)
        if int(self.observed) == 0:
            return x   # nothing observed yet: no range to quantize to
        if self.lsq and frozen:
            n = x[0].numel() if x.dim() > 1 else x.numel()
            s = clamp_scale(self.scale, self.spec)
            return lsq_fake_quantize(x, s, self.spec, self.zero_point,
                                     grad_scale=lsq_grad_scale(n, self.spec.grid().qmax))
        if frozen:
            return fake_quantize(x, self.spec, scale=self.scale.detach(), zero_point=self.zero_point)
        s, zp = self.observed_params()
        return fake_quantize(x, self.spec, scale=s, zero_point=zp)

    def freeze(self) -> None:
        if bool(self.frozen) or int(self.observed) == 0:
            return
        with torch.no_grad():
            s, zp = self.observed_params()
            self.scale.copy_(s)
            self.zero_point.copy_(zp)
            self.frozen.fill_(True)

    def describe(self) -> dict:
        s = float(self.scale.detach()) if bool(self.frozen) else float(self.observed_params()[0])
        return {"bits": self.spec.bits, "lo": float(self.lo), "hi": float(self.hi), "scale": s,
                "zero_point": float(self.zero_point), "frozen": bool(self.frozen), "batches_observed": int(self.observed)}


class QATLayer(nn.Module):
    """A Linear, transformers Conv1D or Conv2d in training with fake-quantized weights.

    The weight is kept as the [out, in] matrix every shrink algorithm sees (a Conv2d's
    [out, in/groups * kh * kw]); forward runs F.linear or F.conv2d on its fake-quantized
    value. scale / zero_point given: start from them, frozen (a PTQ result)."""

    def __init__(self, kind: str, weight: torch.Tensor, bias: torch.Tensor | None, spec: QuantSpec, *,
                 lsq: bool = False, act_bits: int | None = None, scale: torch.Tensor | None = None,
                 zero_point: torch.Tensor | None = None, conv: dict | None = None, mask: torch.Tensor | None = None):
        super().__init__()
        if kind not in ("linear", "conv2d"):
            raise ValueError(f"QATLayer: kind must be linear or conv2d, got {kind!r}")
        if weight.dim() != 2:
            raise ValueError(f"QATLayer: weight must be the [out, in] matrix, got shape {tuple(weight.shape)}")
        if kind == "conv2d" and conv is None:
            raise ValueError("QATLayer: a conv2d layer needs its geometry (conv=)")
        if spec.format != "int":
            raise ValueError(f"QATLayer: QAT trains integer formats, got {spec.format!r}")
        self.kind, self.spec, self.lsq, self.conv = kind, spec, bool(lsq), conv
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        self.weight = nn.Parameter(weight.detach().to(torch.float32).clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(torch.float32).clone())
        self.register_buffer("mask", None if mask is None else mask.to(torch.bool).clone())
        from_ptq = scale is not None
        if not from_ptq:
            scale, zero_point = observed_params(self.weight, spec)
        self.register_buffer("frozen", torch.tensor(from_ptq))
        self.from_ptq = from_ptq
        if self.lsq:
            self.scale = nn.Parameter(scale.detach().to(torch.float32).clone())
        else:
            self.register_buffer("scale", scale.detach().to(spec.scale_dtype).clone())
        self.register_buffer("zero_point", None if zero_point is None else
                             zero_point.detach().to(spec.scale_dtype).clone())
        self.act = None if act_bits is None else ActFakeQuant(act_bits, lsq=lsq)

    def params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(scale, zero_point) as stored: what the forward uses now and conversion keeps."""
        if self.lsq:
            return clamp_scale(self.scale, self.spec).detach().to(self.spec.scale_dtype), self.zero_point
        if not bool(self.frozen):
            return observed_params(self.weight, self.spec)
        return self.scale, self.zero_point

    def fake_weight(self) -> torch.Tensor:
        if self.lsq:
            return lsq_fake_quantize(self.weight, clamp_scale(self.scale, self.spec), self.spec, self.zero_point)
        if not bool(self.frozen):
            with torch.no_grad():
                s, zp = observed_params(self.weight, self.spec)
                self.scale.copy_(s)
                if zp is not None:
                    self.zero_point.copy_(zp)
        return fake_quantize(self.weight, self.spec, scale=self.scale, zero_point=self.zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            x = self.act(x)
        w = self.fake_weight().to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        if self.kind == "conv2d":
            c = self.conv
            return F.conv2d(x, w.reshape(c["weight_shape"]), b, c["stride"], c["padding"], c["dilation"], c["groups"])
        return F.linear(x, w, b)

    def freeze(self) -> None:
        """Fix the ranges: weight scales stop following the weights (lsq: they keep
        learning), activation ranges stop following the inputs."""
        if not self.lsq and not bool(self.frozen):
            with torch.no_grad():
                s, zp = observed_params(self.weight, self.spec)
                self.scale.copy_(s)
                if zp is not None:
                    self.zero_point.copy_(zp)
        self.frozen.fill_(True)
        if self.act is not None:
            self.act.freeze()

    def to_quantized(self) -> nn.Module:
        """The QuantLinear / QuantConv2d holding this layer's weight quantized with the
        scales the fake-quantized forward uses."""
        s, zp = self.params()
        w = self.weight.detach()
        if self.mask is not None:
            w = w * self.mask
        qt = quantize(w, self.spec, scale=s, zero_point=zp)
        bias = None if self.bias is None else self.bias.detach().clone()
        if self.kind == "conv2d":
            c = self.conv
            return QuantConv2d.from_qtensor(qt, bias, in_channels=c["in_channels"], kernel_size=c["kernel_size"],
                                            stride=c["stride"], padding=c["padding"], dilation=c["dilation"],
                                            groups=c["groups"])
        return QuantLinear.from_qtensor(qt, bias)

    def extra_repr(self) -> str:
        fmt = f"int{self.spec.bits}" + (f"-g{self.spec.group_size}" if self.spec.granularity == "group" else
                                        f"-{self.spec.granularity}")
        return (f"{self.kind}, in_features={self.in_features}, out_features={self.out_features}, format={fmt}, "
                f"lsq={self.lsq}, act_bits={None if self.act is None else self.act.spec.bits}")


def _geometry(m: nn.Module) -> dict:
    return {"in_channels": m.in_channels, "kernel_size": tuple(m.kernel_size), "stride": tuple(m.stride),
            "padding": m.padding if isinstance(m.padding, str) else tuple(m.padding),
            "dilation": tuple(m.dilation), "groups": m.groups,
            "weight_shape": (m.out_channels, m.in_channels // m.groups, *m.kernel_size)}


def wrap_target(t: Target, spec: QuantSpec, *, lsq: bool = False, act_bits: int | None = None) -> QATLayer:
    """The QATLayer for one selected target (its module is not modified)."""
    m = t.module
    if t.kind not in QAT_KINDS:
        raise ValueError(f"qat: {t.name} is a {t.kind}; QAT trains {', '.join(QAT_KINDS)} layers")
    if t.kind in ("conv2d", "quant_conv2d") and getattr(m, "padding_mode", "zeros") != "zeros":
        raise ValueError(f"qat: {t.name} pads with {m.padding_mode!r}; QuantConv2d runs zero padding only")
    kind = "conv2d" if t.kind in ("conv2d", "quant_conv2d") else "linear"
    conv = _geometry(m) if kind == "conv2d" else None
    w = t.weight_view().detach().to(torch.float32)
    bias = getattr(m, "bias", None)
    scale = zp = mask = None
    if t.kind in ("quant_linear", "quant_conv2d") and same_grid(m.spec, spec):
        scale, zp = m.scales, m.zeros
    if t.kind == "sparse_linear":
        mask = m.mask()
    return QATLayer(kind, w, bias, spec, lsq=lsq, act_bits=act_bits, scale=scale, zero_point=zp, conv=conv,
                    mask=mask)


def prepare_qat(model: nn.Module, targets: list[Target], spec: QuantSpec, act_bits: int | None = None,
                lsq: bool = False) -> dict[str, QATLayer]:
    """Replace each target in `model` by a QATLayer (in place); {name: layer}."""
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"prepare_qat: spec must be a QuantSpec, got {type(spec).__name__}")
    if not targets:
        raise ValueError("qat: no layer to train: the model has no Linear, Conv1D or Conv2d layer (or quantized "
                         "QuantLinear / QuantConv2d) that include/exclude selected")
    layers = {t.name: wrap_target(t, spec, lsq=lsq, act_bits=act_bits) for t in targets}
    for t in targets:
        device = t.weight_view().device
        replace_module(model, t.name, layers[t.name].to(device))
    return layers


def qat_layers(model: nn.Module) -> dict[str, QATLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QATLayer)}


def freeze_qat(model: nn.Module) -> None:
    """Freeze every observer in the model (weights and activations)."""
    for m in qat_layers(model).values():
        m.freeze()


def convert_qat(model: nn.Module) -> dict[str, nn.Module]:
    """Replace every QATLayer by its QuantLinear / QuantConv2d (in place); {name: new module}."""
    out = {}
    for name, layer in qat_layers(model).items():
        new = layer.to_quantized()
        device = layer.weight.device
        if device.type != "cpu":
            new = new.to(device)
        replace_module(model, name, new)
        out[name] = new
    return out
