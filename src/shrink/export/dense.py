"""A compressed model seen as its deployment formats see it.

Every exporter needs two things from a shrink model: the float weight each layer
effectively applies (what a format without shrink's modules must reproduce), and,
for layers whose stored grid a format can hold as is, the integer codes with their
scales, so the exporter can carry them over without rounding a second time.

- `plain_copy(model)`: a deep copy in which every compressed module is an ordinary
  `nn.Linear` / `nn.Conv2d` holding its effective float32 weight, so
  `plain_copy(m).state_dict()` has the original architecture's names
  (Hugging Face names for transformers models) and transformers, ONNX or a GGUF
  writer can take it. An early-exit model becomes its base alone: a static graph cannot
  express a data-dependent exit, so exports hold the full-depth path (the final head).
- `carried_layers(model)`: for each integer-quantized Linear, its codes, scales,
  zero-points and group size (a `Grid`); layers whose effective weight is not the
  plain dequantization (an input scale kept in the layer, activations quantized)
  are listed with the reason they cannot be carried.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from shrink.modules import (EarlyExitModel, InputScaled, LoRALinear, LowRankLinear, QuantConv2d, QuantLinear,
                            SparseConv2d, SparseLinear, W8A8Linear)
from shrink.surgery import replace_module

# modules an export writes as the plain layer they compute
COMPRESSED = (InputScaled, QuantLinear, W8A8Linear, QuantConv2d, SparseLinear, SparseConv2d, LowRankLinear,
              LoRALinear)


@dataclass(frozen=True)
class Grid:
    """A Linear's stored integer grid: w = (codes - zero_point) * scale, per group of
    `group_size` consecutive inputs of a row (per-channel: group_size = in_features)."""

    codes: torch.Tensor               # int32 [out, in]: signed for symmetric, 0..2^b-1 otherwise
    scale: torch.Tensor               # [out, in // group_size], as stored (fp16 by default)
    zero_point: torch.Tensor | None   # same shape, integer-valued; None when symmetric
    bits: int
    group_size: int

    @property
    def symmetric(self) -> bool:
        return self.zero_point is None

    def dequantize(self) -> torch.Tensor:
        scale = self.scale.to(torch.float32).repeat_interleave(self.group_size, dim=1)
        codes = self.codes.to(torch.float32)
        if self.zero_point is not None:
            codes = codes - self.zero_point.to(torch.float32).repeat_interleave(self.group_size, dim=1)
        return codes * scale


def _grid(ql: QuantLinear) -> tuple[Grid | None, str]:
    spec = ql.spec
    if spec.format != "int":
        return None, f"{spec.format} codes are not a uniform integer grid"
    if spec.granularity == "tensor":
        return None, "one scale for the whole tensor"
    if spec.axis != 0:
        return None, "scales run along the input axis"
    qt = ql.to_qtensor()
    n_in = ql.in_features
    group = n_in if spec.granularity == "channel" else int(spec.group_size)
    if n_in % group:
        return None, f"group size {group} does not divide the {n_in} inputs"
    scale = qt.scale.reshape(ql.out_features, -1)
    zp = None if qt.zero_point is None else qt.zero_point.reshape(ql.out_features, -1)
    return Grid(qt.int_codes().to(torch.int32), scale, zp, int(qt.grid.bits), group), ""


def carried_layers(model: nn.Module) -> tuple[dict[str, Grid], dict[str, str]]:
    """({module name: Grid} for layers a format could carry, {module name: why not} for the
    other compressed layers). An EarlyExitModel: its base's layers, named as in plain_copy."""
    if isinstance(model, EarlyExitModel):
        model = model.base
    grids: dict[str, Grid] = {}
    why_not: dict[str, str] = {}
    scaled_inner = set()
    for name, mod in model.named_modules():
        if isinstance(mod, InputScaled):
            scaled_inner.add(f"{name}.inner")
            why_not[name] = "an input scale is kept in the layer (AWQ/SmoothQuant could not fold it)"
        elif isinstance(mod, LoRALinear):
            scaled_inner.add(f"{name}.base")
            why_not[name] = "LoRA adapters kept apart from the base (lora merge: true folds them in)"
        elif isinstance(mod, W8A8Linear):
            why_not[name] = "activations are quantized too (W8A8)"
        elif isinstance(mod, QuantConv2d):
            why_not[name] = "a convolution"
        elif isinstance(mod, QuantLinear) and name not in scaled_inner:
            grid, why = _grid(mod)
            if grid is None:
                why_not[name] = why
            else:
                grids[name] = grid
    return grids, why_not


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        out.weight.copy_(weight.to(torch.float32))
        if bias is not None:
            out.bias.copy_(bias.detach().to(torch.float32))
    return out


def _conv1d(lin: nn.Linear) -> nn.Module:
    """transformers' Conv1D (GPT-2) computing what `lin` computes: its weight stored [in, out]."""
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(lin.out_features, lin.in_features)
    with torch.no_grad():
        conv.weight.copy_(lin.weight.t())
        if lin.bias is not None:
            conv.bias.copy_(lin.bias)
        else:
            conv.bias.zero_()
    return conv


def _effective(mod: nn.Module) -> nn.Module | None:
    """The plain module computing what `mod` computes (None: `mod` is not a compressed module)."""
    if isinstance(mod, InputScaled):
        inner = _effective(mod.inner) or mod.inner
        if not isinstance(inner, nn.Linear):
            raise ValueError(f"InputScaled around {type(mod.inner).__name__} cannot be exported as a plain layer")
        w = inner.weight.detach() * mod.input_scale.to(torch.float32)[None, :]
        return _linear(w, inner.bias)
    if isinstance(mod, QuantLinear):
        return _linear(mod.dequantized_weight().to(torch.float32), mod.bias)
    if isinstance(mod, W8A8Linear):
        w = mod.dequantized_weight()
        if mod.input_scale is not None:
            w = w * mod.input_scale.to(torch.float32)[None, :]
        return _linear(w, mod.bias)
    if isinstance(mod, LowRankLinear):   # W = A B in float64, then float32: one layer of the original shape
        a, b = ((_effective(f) or f).weight.detach().to(torch.float64) for f in (mod.up, mod.down))
        lin = _linear((a @ b).to(torch.float32), mod.bias)
        return _conv1d(lin) if mod.source == "conv1d" else lin
    if isinstance(mod, LoRALinear):   # W + (alpha / r) B A in float64, then float32, in the source layout
        base = mod.base_weight().detach()   # [out, in] whatever the base (a QuantLinear's dequantized weight)
        lin = _linear((base.double() + mod.delta_weight().to(base.device)).to(torch.float32), mod.bias)
        return _conv1d(lin) if mod.source == "conv1d" else lin
    if isinstance(mod, SparseLinear):   # the runtimes take dense tensors: the zeros are written out
        return _linear(mod.dense_weight().detach().to(torch.float32), mod.bias)
    if isinstance(mod, SparseConv2d):
        conv = nn.Conv2d(mod.in_channels, mod.out_channels, mod.kernel_size, stride=mod.stride,
                         padding=mod.padding, dilation=mod.dilation, groups=mod.groups, bias=mod.bias is not None)
        with torch.no_grad():
            conv.weight.copy_(mod.dense_weight().detach().to(torch.float32).reshape(conv.weight.shape))
            if mod.bias is not None:
                conv.bias.copy_(mod.bias.detach().to(torch.float32))
        return conv
    if isinstance(mod, QuantConv2d):
        conv = nn.Conv2d(mod.in_channels, mod.out_channels, mod.kernel_size, stride=mod.stride,
                         padding=mod.padding, dilation=mod.dilation, groups=mod.groups,
                         bias=mod.bias is not None, padding_mode=mod.padding_mode)
        with torch.no_grad():
            conv.weight.copy_(mod.dequantized_weight().to(torch.float32))
            if mod.bias is not None:
                conv.bias.copy_(mod.bias.detach().to(torch.float32))
        return conv
    return None


GPT2_CONV1D = ("attn.c_attn", "attn.c_proj", "attn.q_attn", "mlp.c_fc", "mlp.c_proj")


def _was_conv1d(model: nn.Module, name: str) -> bool:
    """A layer that was a transformers Conv1D before compression (GPT-2's attention and MLP
    projections): a quantized or sparse layer stores [out, in] like a Linear, but a GPT-2
    checkpoint must hold [in, out] there, or transformers refuses (or, square, transposes) it."""
    cfg = getattr(model, "config", None)
    return getattr(cfg, "model_type", None) == "gpt2" and name.endswith(GPT2_CONV1D)


def plain_copy(model: nn.Module) -> nn.Module:
    """A float32 deep copy of `model` with every compressed module replaced by the plain
    layer computing its effective weight; the input model is not modified. An EarlyExitModel
    gives its base: the full-depth path, without the exit heads."""
    out = copy.deepcopy(model.base if isinstance(model, EarlyExitModel) else model)
    names = [name for name, mod in out.named_modules()
             if isinstance(mod, COMPRESSED)]
    done: list[str] = []
    for name in names:
        if any(name.startswith(f"{d}.") for d in done):
            continue  # the inner layer of an InputScaled already replaced
        plain = _effective(dict(out.named_modules())[name])
        if isinstance(plain, nn.Linear) and _was_conv1d(out, name):
            plain = _conv1d(plain)   # GPT-2 keeps [in, out] Conv1D weights: transformers loads them so
        replace_module(out, name, plain)
        done.append(name)
    out = out.to(torch.float32)
    out.eval()
    return out


def is_compressed(model: nn.Module) -> bool:
    return any(isinstance(m, COMPRESSED + (EarlyExitModel,)) for m in model.modules())
