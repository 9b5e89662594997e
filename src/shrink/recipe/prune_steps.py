"""Recipe steps for pruning and fine-tuning (issue 6): typed, frozen, self-validating.

- prune: {method: magnitude | wanda | sparsegpt | neurons | channels | heads | layers,
          sparsity, pattern: "N:M", scope: layer | global | sensitivity, score: l1 | l2 | activation}
- iterative_prune: {method, target, rounds | per_round, finetune: {...}}
- lottery_ticket: {target, per_round, rewind: init | <iteration>, steps}
- finetune: {steps | epochs, lr, loss: auto | lm | distill | ce, batch_size, precision}

Unstructured methods (magnitude, wanda, sparsegpt) zero weights and store the layer
sparse; structured ones (neurons, channels, heads, layers) remove them and shrink the
tensors, so they are the rules' coarser "structured_prune" stage.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from shrink.quant import QuantSpec

UNSTRUCTURED = ("magnitude", "wanda", "sparsegpt")
STRUCTURED = ("neurons", "channels", "heads", "layers")
SCOPES = ("layer", "global", "sensitivity")
SCORES = ("l1", "l2", "activation")
STORAGE = ("auto", "bitmask", "csr", "nm", "dense")
TRAIN_LOSSES = ("auto", "lm", "distill", "ce")


def _fraction(step: str, field: str, value, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0.0 <= value < 1.0:
        raise ValueError(f"{step}: {field} must be a fraction in [0, 1), got {value!r}")


def _positive_int(step: str, field: str, value, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{step}: {field} must be a positive integer, got {value!r}")


def parse_pattern(step: str, text: str | None) -> tuple[int, int] | None:
    """"2:4" -> (2, 4): keep N of every M consecutive weights of a row."""
    if text is None:
        return None
    parts = str(text).split(":")
    try:
        n, m = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"{step}: pattern must look like \"2:4\" (keep N of every M), got {text!r}") from None
    if n < 1 or m < 1 or n > m:
        raise ValueError(f"{step}: pattern {text!r} needs 1 <= N <= M (N > M keeps more than the group has)")
    return n, m


@dataclass(frozen=True)
class Finetune:
    """Train the compressed model briefly to recover quality: by default distillation from
    the uncompressed model (loss auto; on tiny-gpt it beat next-token loss on the same 64
    calibration windows, which overfits them), next-token loss (lm) on the calibration text,
    or cross-entropy on labels (ce, where the job has labeled training data). `steps` or
    `epochs` (passes over the training batches; neither: 200 steps); batch_size re-cuts the
    batches; precision bf16/fp16 trains under autocast (mixed_precision_training: {dtype})."""
    kind: ClassVar[str] = "finetune"
    needs_data: ClassVar[bool] = True
    steps: int | None = None
    epochs: float | None = None
    lr: float = 1e-4
    loss: str = "auto"
    temperature: float = 2.0
    batch_size: int | None = None
    precision: str = "fp32"
    include: tuple[str, ...] | None = None   # unused; every step takes them
    exclude: tuple[str, ...] | None = None

    def __post_init__(self):
        check_training("finetune", self)
        if self.loss not in TRAIN_LOSSES:
            raise ValueError(f"finetune: loss must be one of {', '.join(TRAIN_LOSSES)}, got {self.loss!r}")
        if not self.temperature > 0:
            raise ValueError(f"finetune: temperature must be positive, got {self.temperature!r}")


def check_training(name: str, step, default_steps: int = 200) -> None:
    """The checks every training step shares: steps | epochs (neither: default_steps),
    lr in (0, 1), batch_size, precision. Sets steps when neither is given."""
    from shrink.train.amp import PRECISIONS

    if step.steps is not None and step.epochs is not None:
        raise ValueError(f"{name}: give steps or epochs, not both")
    if step.steps is None and step.epochs is None:
        object.__setattr__(step, "steps", default_steps)
    _positive_int(name, "steps", step.steps, allow_none=True)
    if step.epochs is not None and (isinstance(step.epochs, bool) or not isinstance(step.epochs, (int, float))
                                    or not 0 < step.epochs <= 10_000):
        raise ValueError(f"{name}: epochs must be a positive number, got {step.epochs!r}")
    if isinstance(step.lr, bool) or not isinstance(step.lr, (int, float)) or not 0 < step.lr < 1:
        raise ValueError(f"{name}: lr must be in (0, 1), got {step.lr!r}")
    _positive_int(name, "batch_size", step.batch_size, allow_none=True)
    if step.precision not in PRECISIONS:
        raise ValueError(f"{name}: precision must be one of {', '.join(PRECISIONS)} (mixed_precision_training: "
                         f"{{dtype: bf16}}), got {step.precision!r}")


@dataclass(frozen=True)
class Prune:
    """One-shot pruning. Unstructured: `sparsity` (a fraction of each layer, or of all of
    them with scope global / sensitivity) or `pattern` "N:M". Structured: `sparsity` is the
    fraction of units removed (neurons or channels of each MLP/conv, heads of each
    attention, transformer layers of the stack). scope global / sensitivity: magnitude only."""
    method: str = "magnitude"
    sparsity: float | None = None
    pattern: str | None = None
    scope: str = "layer"
    score: str = "l1"
    storage: str = "auto"
    block_size: int = 128
    damp: float = 0.01
    bits: int | None = None          # sparsegpt only: quantize jointly (GPTQ-style) to this width
    group_size: int | None = 128
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None

    def __post_init__(self):
        methods = UNSTRUCTURED + STRUCTURED
        if self.method not in methods:
            raise ValueError(f"prune: method must be one of {', '.join(methods)}, got {self.method!r}")
        _fraction("prune", "sparsity", self.sparsity, allow_none=True)
        nm = parse_pattern("prune", self.pattern)
        if self.method in STRUCTURED:
            if nm is not None:
                raise ValueError(f"prune: pattern applies to magnitude, wanda and sparsegpt, not {self.method}")
            if self.sparsity is None or self.sparsity == 0:
                raise ValueError(f"prune: method {self.method} needs sparsity, the fraction of units to remove "
                                 "(e.g. 0.25)")
        elif (self.sparsity is None) == (nm is None):
            raise ValueError("prune: give either sparsity (e.g. 0.5) or pattern (e.g. \"2:4\"), not "
                             + ("both" if nm is not None else "neither"))
        if self.scope not in SCOPES:
            raise ValueError(f"prune: scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")
        if self.scope != "layer" and (nm is not None or self.method != "magnitude"):
            raise ValueError(f"prune: scope {self.scope} works with magnitude at a sparsity; "
                             f"{self.method}{' with a pattern' if nm else ''} prunes each layer on its own "
                             "(Wanda and SparseGPT compare weights within a layer's rows)")
        if self.score not in SCORES:
            raise ValueError(f"prune: score must be one of {', '.join(SCORES)}, got {self.score!r}")
        if self.storage not in STORAGE:
            raise ValueError(f"prune: storage must be one of {', '.join(STORAGE)}, got {self.storage!r}")
        if self.storage == "nm" and nm is None:
            raise ValueError("prune: storage nm needs a pattern such as \"2:4\"")
        _positive_int("prune", "block_size", self.block_size)
        if not 0 < self.damp < 1:
            raise ValueError(f"prune: damp must be in (0, 1), got {self.damp}")
        if self.bits is not None:
            if self.method != "sparsegpt":
                raise ValueError("prune: bits (joint quantization) is for method sparsegpt; quantize in a later "
                                 "step otherwise")
            if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
                raise ValueError(f"prune: bits must be an integer in 2..8, got {self.bits!r}")
        _positive_int("prune", "group_size", self.group_size, allow_none=True)

    @property
    def kind(self) -> str:   # the ordering rules' stage (recipe/rules.py)
        return "structured_prune" if self.method in STRUCTURED else "prune"

    @property
    def needs_data(self) -> bool:
        return self.method in ("wanda", "sparsegpt", "layers") or self.scope == "sensitivity" \
            or self.score == "activation"

    def nm(self) -> tuple[int, int] | None:
        return parse_pattern("prune", self.pattern)

    def spec(self) -> QuantSpec | None:
        if self.bits is None:
            return None
        if self.group_size is None:
            return QuantSpec(bits=self.bits, symmetric=False, granularity="channel")
        return QuantSpec(bits=self.bits, symmetric=False, granularity="group", group_size=self.group_size)


@dataclass(frozen=True)
class IterativePrune:
    """Gradual pruning: raise the sparsity over rounds (a cubic schedule with `rounds`, or
    `per_round` of the surviving weights each round), fine-tuning between rounds with the
    pattern held fixed."""
    kind: ClassVar[str] = "prune"
    needs_data: ClassVar[bool] = True
    trains: ClassVar[bool] = True    # recovers by itself: the rules suggest no fine-tune after it
    method: str = "magnitude"
    target: float = 0.5
    rounds: int | None = None
    per_round: float | None = None
    scope: str = "global"
    finetune: Finetune = Finetune(steps=50)
    storage: str = "auto"
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.method not in ("magnitude", "wanda"):
            raise ValueError(f"iterative_prune: method must be magnitude or wanda, got {self.method!r}")
        _fraction("iterative_prune", "target", self.target)
        if self.target == 0:
            raise ValueError("iterative_prune: target must be above 0 (e.g. 0.8)")
        if self.rounds is not None and self.per_round is not None:
            raise ValueError("iterative_prune: give rounds or per_round, not both")
        _positive_int("iterative_prune", "rounds", self.rounds, allow_none=True)
        _fraction("iterative_prune", "per_round", self.per_round, allow_none=True)
        if self.per_round == 0:
            raise ValueError("iterative_prune: per_round must be above 0 (e.g. 0.2)")
        if self.scope not in ("layer", "global"):
            raise ValueError(f"iterative_prune: scope must be layer or global, got {self.scope!r}")
        if not isinstance(self.finetune, Finetune):
            raise ValueError("iterative_prune: finetune must be a mapping such as {steps: 50, lr: 1e-4}")
        if self.storage not in STORAGE or self.storage == "nm":
            raise ValueError(f"iterative_prune: storage must be auto, bitmask, csr or dense, got {self.storage!r}")

    def schedule(self) -> list[float]:
        from shrink.algos.sparsity import cubic_schedule, geometric_schedule

        if self.per_round is not None:
            return geometric_schedule(self.target, self.per_round)
        return cubic_schedule(self.rounds or 4, self.target)


@dataclass(frozen=True)
class LotteryTicket:
    """Iterative magnitude pruning with rewinding (Frankle & Carbin): from a seeded fresh
    initialization (rewind: init) or the weights after `rewind` training steps, train
    `steps`, prune `per_round` of the surviving weights, rewind the survivors, repeat to
    `target`, then train the ticket. With control: true a random re-initialization with
    the same mask is trained the same way and measured beside it."""
    kind: ClassVar[str] = "prune"
    needs_data: ClassVar[bool] = True
    trains: ClassVar[bool] = True
    target: float = 0.8
    per_round: float = 0.2
    rewind: str | int = "init"
    steps: int = 300
    lr: float = 1e-3
    loss: str = "auto"
    scope: str = "global"
    control: bool = True
    storage: str = "auto"
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None

    def __post_init__(self):
        _fraction("lottery_ticket", "target", self.target)
        _fraction("lottery_ticket", "per_round", self.per_round)
        if self.target == 0 or self.per_round == 0:
            raise ValueError("lottery_ticket: target and per_round must be above 0 (e.g. 0.8 and 0.2)")
        if self.rewind != "init":
            if isinstance(self.rewind, bool) or not isinstance(self.rewind, int) or self.rewind < 0:
                raise ValueError(f"lottery_ticket: rewind must be init or a training iteration (an integer >= 0), "
                                 f"got {self.rewind!r}")
            if self.rewind >= self.steps:
                raise ValueError(f"lottery_ticket: rewind iteration {self.rewind} must come before the end of "
                                 f"training (steps {self.steps})")
        _positive_int("lottery_ticket", "steps", self.steps)
        try:
            Finetune(steps=self.steps, lr=self.lr, loss=self.loss)  # the same checks of lr and loss
        except ValueError as e:
            raise ValueError(str(e).replace("finetune:", "lottery_ticket:", 1)) from None
        if self.scope not in ("layer", "global"):
            raise ValueError(f"lottery_ticket: scope must be layer or global, got {self.scope!r}")
        if self.storage not in STORAGE or self.storage == "nm":
            raise ValueError(f"lottery_ticket: storage must be auto, bitmask, csr or dense, got {self.storage!r}")

    def schedule(self) -> list[float]:
        from shrink.algos.sparsity import geometric_schedule

        return geometric_schedule(self.target, self.per_round)
