"""Recipe steps for training-time compression (issue 7): typed, frozen, self-validating.

- qat: {bits, group_size, symmetric, act_bits, lsq, freeze_after, steps | epochs, lr}
- distill: {student: {width: f} | {layers: [...]} | PATH, temperature, alpha, hidden_loss, steps | epochs, lr}
- lowrank: {energy | rank | keep, finetune: {...}}
- lora: {rank, alpha, targets, base_bits, base_format, merge, steps | epochs, lr}
- early_exit: {exits, threshold, steps | epochs, lr}

Every step that trains takes steps or epochs, lr, batch_size and precision (fp32, bf16,
fp16; `mixed_precision_training: {dtype: bf16}` says the same).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from shrink.quant import QuantSpec

from .prune_steps import Finetune, _positive_int, check_training

HIDDEN_LOSSES = ("cosine", "mse")
BASE_FORMATS = ("nf4", "int4")


def _number(step: str, field: str, value, lo: float, hi: float, *, open_lo: bool = True) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (lo < value if open_lo else lo <= value) and value <= hi
    if not ok:
        raise ValueError(f"{step}: {field} must be a number in {'(' if open_lo else '['}{lo:g}, {hi:g}], got {value!r}")


@dataclass(frozen=True)
class QAT:
    """Quantization-aware training: weights (and with act_bits, activations) fake-quantized in
    the forward pass, straight-through gradients masked outside the clipping range, ranges
    observed and frozen after `freeze_after` of the steps (lsq: true learns the step sizes
    instead), then converted to QuantLinear. Starts from a PTQ step's result when one ran
    before it (its layers' codes and scales are the starting point). loss auto: 0.5 CE on
    labels + 0.5 distillation where batches are labeled, else distillation (recipe/qat.py)."""
    kind: ClassVar[str] = "quantize"
    refines: ClassVar[bool] = True   # may follow a PTQ step on the same layers (recipe/rules.py)
    needs_data: ClassVar[bool] = True
    trains: ClassVar[bool] = True
    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    act_bits: int | None = None
    lsq: bool = False
    freeze_after: float = 0.1
    steps: int | None = None
    epochs: float | None = None
    lr: float = 1e-4
    loss: str = "auto"
    temperature: float = 2.0
    batch_size: int | None = None
    precision: str = "fp32"
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"qat: bits must be an integer in 2..8, got {self.bits!r}")
        if self.act_bits is not None and (isinstance(self.act_bits, bool) or not isinstance(self.act_bits, int)
                                          or not 2 <= self.act_bits <= 8):
            raise ValueError(f"qat: act_bits must be an integer in 2..8 or null, got {self.act_bits!r}")
        _positive_int("qat", "group_size", self.group_size, allow_none=True)
        _number("qat", "freeze_after", self.freeze_after, 0.0, 1.0, open_lo=False)
        if self.loss not in ("auto", "lm", "distill", "ce", "ce+distill"):
            raise ValueError(f"qat: loss must be auto, lm, distill, ce or ce+distill, got {self.loss!r}")
        if not self.temperature > 0:
            raise ValueError(f"qat: temperature must be positive, got {self.temperature!r}")
        check_training("qat", self)

    def spec(self) -> QuantSpec:
        if self.group_size is None:
            return QuantSpec(bits=self.bits, symmetric=self.symmetric, granularity="channel")
        return QuantSpec(bits=self.bits, symmetric=self.symmetric, granularity="group", group_size=self.group_size)


@dataclass(frozen=True)
class Distill:
    """Knowledge distillation into a student: alpha * T^2 * KL(teacher^T || student^T) +
    (1 - alpha) * hard-label loss (labels, or next tokens for a causal LM), plus a hidden-state
    loss (cosine or mse over a layer mapping) with hidden_loss. The student: {width: f}
    (every MLP/conv narrowed to f of its units, weights taken from the teacher), {layers:
    [i, ...]} (the teacher's layers kept, e.g. every other), a path to a saved model, or none
    (the model as the earlier steps left it, taught by the original). alpha null: 0.5 where
    there are hard labels, 1 where there are none (an encoder's embeddings)."""
    kind: ClassVar[str] = "distill"
    needs_data: ClassVar[bool] = True
    trains: ClassVar[bool] = True
    student: Any = None
    temperature: float = 2.0
    alpha: float | None = None
    hidden_loss: str | None = None
    hidden_weight: float = 1.0
    steps: int | None = None
    epochs: float | None = None
    lr: float = 1e-3
    batch_size: int | None = None
    precision: str = "fp32"
    include: tuple[str, ...] | None = None   # unused; every step takes them
    exclude: tuple[str, ...] | None = None

    def __post_init__(self):
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not self.temperature > 0 or not math.isfinite(self.temperature):
            raise ValueError(f"distill: temperature must be a positive number, got {self.temperature!r}")
        if self.alpha is not None:
            _number("distill", "alpha", self.alpha, 0.0, 1.0, open_lo=False)
        if self.hidden_loss is not None and self.hidden_loss not in HIDDEN_LOSSES:
            raise ValueError(f"distill: hidden_loss must be cosine, mse or null, got {self.hidden_loss!r}")
        _number("distill", "hidden_weight", self.hidden_weight, 0.0, 1e6, open_lo=False)
        s = self.student
        if s is not None and not isinstance(s, str):
            if not isinstance(s, dict) or len(s) != 1 or next(iter(s)) not in ("width", "layers"):
                raise ValueError(f"distill: student must be {{width: 0.5}}, {{layers: [0, 2, 4]}}, a path or null, "
                                 f"got {s!r}")
            if "width" in s:
                _number("distill", "student width", s["width"], 0.0, 1.0)
                if s["width"] == 1.0:
                    raise ValueError("distill: student width must be below 1 (1 is the teacher itself)")
            elif not isinstance(s["layers"], (list, tuple)) or not s["layers"] or not all(
                    isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in s["layers"]):
                raise ValueError(f"distill: student layers must be a non-empty list of layer indices, "
                                 f"got {s['layers']!r}")
            else:
                object.__setattr__(self, "student", {"layers": sorted(set(s["layers"]))})
        check_training("distill", self, default_steps=500)


@dataclass(frozen=True)
class LowRank:
    """Truncated SVD per layer, W ~ (U sqrt(S)) (sqrt(S) V^T) as two Linears: the rank keeping
    `energy` of the squared singular values, a fixed `rank`, or the rank keeping `keep` of the
    layer's parameters; a layer where the factors would not be smaller stays dense. Optional
    fine-tune after."""
    kind: ClassVar[str] = "lowrank"
    energy: float | None = None
    rank: int | None = None
    keep: float | None = None
    finetune: Finetune | None = None
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None

    @property
    def needs_data(self) -> bool:
        return self.finetune is not None

    def __post_init__(self):
        given = [n for n in ("energy", "rank", "keep") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"lowrank: give one of energy, rank or keep, got {', '.join(given)}")
        if not given:
            object.__setattr__(self, "energy", 0.9)
        if self.energy is not None:
            _number("lowrank", "energy", self.energy, 0.0, 1.0)
        _positive_int("lowrank", "rank", self.rank, allow_none=True)
        if self.keep is not None:
            _number("lowrank", "keep", self.keep, 0.0, 1.0)
        if self.finetune is not None and not isinstance(self.finetune, Finetune):
            raise ValueError("lowrank: finetune must be a mapping such as {steps: 100, lr: 1e-4}")


@dataclass(frozen=True)
class LoRA:
    """Low-rank adapters (A ~ N(0, sigma^2), B = 0, scaled alpha / rank) on the `targets`
    Linears (default: every Linear but the output head), trained on the task's own loss
    (next tokens, or labels) with the base frozen. base_bits 4 (QLoRA): the frozen base is
    stored in base_format nf4 or int4 first. merge: true folds W' = W + (alpha / rank) B A
    into the weights (a plain Linear again: no overhead); false keeps the adapters apart."""
    kind: ClassVar[str] = "finetune"
    needs_data: ClassVar[bool] = True
    trains: ClassVar[bool] = True
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] | None = None
    dropout: float = 0.0
    base_bits: int | None = None
    base_format: str = "nf4"
    merge: bool = True
    steps: int | None = None
    epochs: float | None = None
    lr: float = 1e-3
    loss: str = "auto"
    batch_size: int | None = None
    precision: str = "fp32"
    include: tuple[str, ...] | None = None   # unused: targets says which Linears
    exclude: tuple[str, ...] | None = None

    def __post_init__(self):
        _positive_int("lora", "rank", self.rank)
        _number("lora", "alpha", self.alpha, 0.0, 1e6)
        _number("lora", "dropout", self.dropout, 0.0, 0.99, open_lo=False)
        if self.base_bits is not None and self.base_bits != 4:
            raise ValueError(f"lora: base_bits must be 4 (QLoRA) or null, got {self.base_bits!r}")
        if self.base_format not in BASE_FORMATS:
            raise ValueError(f"lora: base_format must be nf4 or int4, got {self.base_format!r}")
        if self.loss not in ("auto", "lm", "ce", "distill"):
            raise ValueError(f"lora: loss must be auto, lm, ce or distill, got {self.loss!r}")
        if self.targets is not None:
            if isinstance(self.targets, str):
                object.__setattr__(self, "targets", (self.targets,))
            if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
                raise ValueError(f"lora: targets must be a non-empty list of module names or patterns "
                                 f"(e.g. [q_proj, v_proj]) or null, got {self.targets!r}")
            object.__setattr__(self, "targets", tuple(self.targets))
        check_training("lora", self)


@dataclass(frozen=True)
class EarlyExit:
    """Exit heads after intermediate layers, trained jointly with the final head (the base
    frozen unless train_base); at inference a sample leaves at the first exit whose top
    probability reaches `threshold`. exits: layer indices (default: every layer but the
    last). The step records the trade-off of average depth, latency and accuracy across
    thresholds. lr default: 1e-2 when only the heads train (small linear probes; measured on
    digits-cnn, 1e-3 leaves them under-trained in 200 steps), 1e-3 with train_base."""
    kind: ClassVar[str] = "finetune"
    needs_data: ClassVar[bool] = True
    trains: ClassVar[bool] = True
    exits: tuple[int, ...] | None = None
    threshold: float = 0.9
    train_base: bool = False
    steps: int | None = None
    epochs: float | None = None
    lr: float | None = None
    batch_size: int | None = None
    precision: str = "fp32"
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None

    def __post_init__(self):
        _number("early_exit", "threshold", self.threshold, 0.0, 1.0)
        if self.lr is None:
            object.__setattr__(self, "lr", 1e-3 if self.train_base else 1e-2)
        if self.exits is not None:
            if not self.exits or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                         for i in self.exits):
                raise ValueError(f"early_exit: exits must be a non-empty list of layer indices, got {self.exits!r}")
            object.__setattr__(self, "exits", tuple(sorted(set(self.exits))))
        check_training("early_exit", self)


TRAINING_STEPS = (QAT, Distill, LowRank, LoRA, EarlyExit)
