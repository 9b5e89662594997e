"""LoRA and QLoRA: put low-rank adapters on a model's Linear layers and train only them.

- `apply_lora(model, targets, rank, alpha, ...)` replaces each targeted Linear / Conv1D
  (default: every one but the output head; embeddings are never targets) by a
  `LoRALinear` and freezes every parameter of the model except the adapters. With
  base_bits=4 (QLoRA, Dettmers et al. 2023) each targeted base weight is first stored
  in 4 bits — NF4 in groups of 64 (one absmax scale a group), or asymmetric int4 in
  groups of 128 — as a frozen QuantLinear, and the adapters train on top of it.
- `train_lora(model, batches, options)` trains the adapters with the shared loop
  (train/engine.py) on the task's own loss: next-token loss for a causal LM,
  cross-entropy for labeled batches; distillation from a teacher only when asked
  (or, for a quantized base with no task signal, to recover what quantization cost).
- `merge_lora` / `unmerge_lora` switch every adapted layer between one merged Linear
  and base + adapters (exactly); `fold_lora` replaces each by its plain merged layer
  for deployment; `lora_parameters` lists the adapters.

The model is modified in place.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from shrink.data.labeled import split_batch
from shrink.modules.lora import LoRALinear
from shrink.modules.quant_linear import QuantLinear
from shrink.quant import QuantSpec, quantize
from shrink.surgery import replace_module, select_modules

from .engine import TrainOptions, TrainRecord, train
from .loop import _token_ids, has_logits, make_loss, resolve_loss

BASE_FORMATS = ("nf4", "int4")


def base_spec(base_format: str) -> QuantSpec:
    """The QLoRA base's storage: NF4 per group of 64 (QLoRA's block size), or asymmetric int4
    per group of 128 (what the int4 CPU kernel runs)."""
    if base_format == "nf4":
        return QuantSpec(format="nf4", granularity="group", group_size=64)
    if base_format == "int4":
        return QuantSpec(bits=4, symmetric=False, granularity="group", group_size=128)
    raise ValueError(f"lora: base_format must be nf4 or int4, got {base_format!r}")


@dataclass(frozen=True)
class AdaptedLayer:
    name: str
    out_features: int
    in_features: int
    source: str                  # "linear" | "conv1d": the layer the adapters were put on
    base_format: str             # "fp32" (float base, its dtype), "nf4-g64", "int4-g128", or "kept" (already quantized)
    base_bytes_before: int       # the weight's stored bytes before the step
    base_bytes: int              # the frozen base weight's stored bytes now
    base_mse: float              # mean squared change of the base weight (0 for a float base)
    base_sqnr_db: float          # SQNR of the stored base against the weight before (inf for a float base)
    adapter_params: int          # rank x (in + out)


@dataclass(frozen=True)
class LoRAApplied:
    layers: tuple[AdaptedLayer, ...]
    skipped: tuple[dict, ...]    # {"name", "reason"}: matched but not adapted
    rank: int
    alpha: float

    @property
    def names(self) -> list[str]:
        return [l.name for l in self.layers]

    @property
    def adapter_params(self) -> int:
        return sum(l.adapter_params for l in self.layers)


def _patterns(targets) -> list[str] | None:
    """PEFT-style target names: "q_proj" means every module whose name ends in ".q_proj" (or is
    q_proj); globs ("*.mlp.*") and "re:..." patterns are matched as select_modules does."""
    if targets is None:
        return None
    if isinstance(targets, str):
        targets = [targets]
    out = []
    for p in targets:
        if not isinstance(p, str) or not p:
            raise ValueError(f"lora: targets must be module names or patterns (strings), got {p!r}")
        out.append(p)
        if not p.startswith("re:") and not any(c in p for c in "*?[") and not p.startswith("."):
            out.append(f"*.{p}")
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))


def _sqnr(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    noise = float(((w - w_hat) ** 2).sum())
    return math.inf if noise == 0 else 10 * math.log10(max(float((w ** 2).sum()), 1e-300) / noise)


def apply_lora(model: nn.Module, targets=None, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               base_bits: int | None = None, base_format: str = "nf4", seed: int = 0) -> LoRAApplied:
    """Put LoRA adapters on the targeted layers of `model` (in place) and freeze everything else.

    targets: None (every Linear / Conv1D but the output head), or names / patterns: a bare
    name such as "q_proj" matches every module so named; "*.mlp.*" globs and "re:..." regular
    expressions match qualified names. Layers already quantized (QuantLinear) are adapted on
    their stored base. base_bits 4: float bases are stored in base_format (nf4 | int4) first.
    seed: draws every A. Raises ValueError when nothing matches, or when rank exceeds what a
    layer allows (naming the layer)."""
    if base_bits not in (None, 4):
        raise ValueError(f"lora: base_bits must be 4 (QLoRA) or None, got {base_bits!r}")
    spec = base_spec(base_format) if base_bits else None
    sel = select_modules(model, types=("linear", "conv1d", "quant_linear"), include=_patterns(targets))
    lora_bases = {f"{n}.base" for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    chosen = [t for t in sel.targets if not (t.name in lora_bases and targets is None)]
    for t in chosen:
        if t.name in lora_bases:
            raise ValueError(f"lora: {t.name[:-5]} already carries adapters (an earlier lora step kept them "
                             "apart); merge them first (merge: true) or leave it out of targets")
    if not chosen:
        what = "any Linear or Conv1D layer" if targets is None else f"targets {list(targets)!r}"
        layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear))][:6]
        raise ValueError(f"lora: no layer of the model matches {what} (an adaptable layer is an nn.Linear, a "
                         f"transformers Conv1D or a QuantLinear, not the output head; the model's Linears include "
                         f"{layers or 'none'}); give targets such as ['q_proj', 'v_proj'] or '*.mlp.*'")
    for t in chosen:
        if rank > min(t.out_features, t.in_features):
            raise ValueError(f"lora: rank {rank} is larger than layer {t.name} allows (its weight is "
                             f"[{t.out_features}, {t.in_features}], so an update has rank at most "
                             f"{min(t.out_features, t.in_features)}); lower rank or leave {t.name} out of targets")
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for t in chosen:
        mod = t.module
        before = t.weight_view().detach()
        if t.kind == "quant_linear":
            base, fmt, bytes_before = mod, "kept", mod.nbytes
            source = "linear"
        else:
            bytes_before = before.numel() * before.element_size()
            source = t.kind
            if spec is None:
                base, fmt = mod, _dtype_name(before.dtype)
            else:
                bias = getattr(mod, "bias", None)
                qt = quantize(before.float().contiguous(), spec)
                base = QuantLinear.from_qtensor(qt, None if bias is None else bias.detach().float())
                base = base.to(before.device)
                fmt = f"{base_format}-g{spec.group_size}"
        layer = LoRALinear(base, rank, alpha, dropout, name=t.name, generator=gen, source=source)
        replace_module(model, t.name, layer)
        after = layer.base_weight().detach().float()
        err = float(((after - before.float()) ** 2).mean()) if base is not mod else 0.0
        layers.append(AdaptedLayer(t.name, t.out_features, t.in_features, source, fmt, bytes_before,
                                   base.nbytes if isinstance(base, QuantLinear) else bytes_before, err,
                                   _sqnr(before.float(), after) if base is not mod else math.inf,
                                   rank * (t.in_features + t.out_features)))
    skipped = tuple({"name": s.name, "reason": s.reason} for s in sel.skipped)
    return LoRAApplied(tuple(layers), skipped, rank, float(alpha))


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every adapter's A and B, in model order."""
    return [p for m in lora_layers(model).values() for p in (m.lora_A, m.lora_B)]


def merge_lora(model: nn.Module) -> int:
    """Run every adapted layer as one Linear W + (alpha / rank) B A (unmerge_lora undoes it exactly)."""
    layers = lora_layers(model)
    for m in layers.values():
        m.merge()
    return len(layers)


def unmerge_lora(model: nn.Module) -> int:
    layers = lora_layers(model)
    for m in layers.values():
        m.unmerge()
    return len(layers)


def fold_lora(model: nn.Module) -> list[str]:
    """Replace every LoRALinear by its plain merged layer (nn.Linear or Conv1D, float even
    over a quantized base): the deployment form, with no adapter left. Returns the names."""
    names = list(lora_layers(model))
    for name in names:
        replace_module(model, name, model.get_submodule(name).merged_module())
    return names


def lora_loss_kind(loss: str, model: nn.Module, batch, *, quantized_base: bool) -> str:
    """The loss a LoRA fine-tune trains on. auto: the task's own — cross-entropy on labels,
    next-token loss for a causal LM; with neither (an encoder on unlabeled text) only a
    quantized base has something to learn (distillation from the original recovers what
    quantization cost); a float base would start at the teacher's exact outputs."""
    if loss not in ("auto", "lm", "ce", "distill"):
        raise ValueError(f"lora: loss must be auto, lm, ce or distill, got {loss!r}")
    if loss != "auto":
        return loss
    kind = resolve_loss("auto", model, batch, teacher=None)
    if kind == "distill" and not quantized_base:
        raise ValueError("lora: these batches carry no task signal (no labels, and the model is not a causal LM), "
                         "and a float base starts at the original's exact outputs, so there is nothing to learn: "
                         "give labeled train_data, use base_bits: 4 (QLoRA, trained to recover the original), "
                         "or set loss explicitly")
    return kind


def train_lora(model: nn.Module, batches: Sequence, options: TrainOptions, *, loss: str = "auto",
               teacher: nn.Module | None = None, temperature: float = 2.0,
               progress: Callable[[int, int], None] | None = None,
               evaluate: Callable[[nn.Module], object] | None = None) -> TrainRecord:
    """Train only the adapters (lora_parameters) with the shared engine; see lora_loss_kind.
    loss "distill" needs the teacher (the uncompressed original)."""
    params = lora_parameters(model)
    if not params:
        raise ValueError("lora: the model has no LoRA adapters to train; call apply_lora first")
    if not batches:
        raise ValueError("lora: no training batches (give the recipe calibration or training data)")
    quantized = any(m.base_kind == "quant" for m in lora_layers(model).values())
    kind = lora_loss_kind(loss, model, batches[0], quantized_base=quantized)
    if kind == "lm" and _token_ids(batches[0]) is None:
        raise ValueError("lora: loss 'lm' needs batches of token ids (input_ids)")
    if kind == "ce" and split_batch(batches[0])[1] is None:
        raise ValueError("lora: loss 'ce' needs labeled batches (Labeled(inputs, labels))")
    if kind == "distill" and teacher is None:
        raise ValueError("lora: loss 'distill' needs a teacher model (the uncompressed original)")
    logits = kind == "distill" and has_logits(teacher, batches[0])
    was = None if teacher is None else teacher.training
    if teacher is not None:
        teacher.eval()
    try:
        return train(model, batches, make_loss(kind, teacher, temperature, logits), options, params=params,
                     progress=progress, evaluate=evaluate, label=kind)
    finally:
        if teacher is not None:
            teacher.train(was)
