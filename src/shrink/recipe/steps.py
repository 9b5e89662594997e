"""Recipe steps: typed, frozen, self-validating; parsed from YAML or Python at the boundary.

A recipe is a list of steps. In YAML (or Python) each step is a one-key
mapping, `- gptq: {bits: 4, group_size: 128}`; in Python a step object works
too. Omitted fields take the defaults a practitioner expects (4-bit, group
128, asymmetric, damp 0.01, block 128). `group_size: null` means per channel.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Union

import torch

from shrink.quant import QuantSpec

from .prune_steps import Finetune, IterativePrune, LotteryTicket, Prune
from .train_steps import QAT, Distill, EarlyExit, LoRA, LowRank

OBSERVERS = ("minmax", "percentile", "mse")


def _spec(bits: int, group_size: int | None, symmetric: bool, scale_dtype: str = "float16") -> QuantSpec:
    dt = getattr(torch, scale_dtype)
    if group_size is None:
        return QuantSpec(bits=bits, symmetric=symmetric, granularity="channel", scale_dtype=dt)
    return QuantSpec(bits=bits, symmetric=symmetric, granularity="group", group_size=group_size, scale_dtype=dt)


@dataclass(frozen=True)
class Targets:
    """Which modules a step touches: glob or `re:` patterns on qualified names."""
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None


@dataclass(frozen=True)
class RTN:
    """Round to nearest, per channel or per group, with an observer for the range."""
    kind: ClassVar[str] = "quantize"   # the ordering rules' stage (recipe/rules.py)
    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    observer: str = "minmax"
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None

    def __post_init__(self):
        _check_bits(self, self.bits)
        _check_group(self, self.group_size)
        if self.observer not in OBSERVERS:
            raise ValueError(f"rtn: observer must be one of {', '.join(OBSERVERS)}, got {self.observer!r}")
        self.spec()

    def spec(self) -> QuantSpec:
        return _spec(self.bits, self.group_size, self.symmetric)


MATMUL_DTYPES = ("float32", "bfloat16")
SCALE_DTYPES = ("float16", "float32", "bfloat16")


@dataclass(frozen=True)
class GPTQ:
    """GPTQ: Hessian-guided rounding with error feedback, block by block on calibration data."""
    kind: ClassVar[str] = "quantize"   # the ordering rules' stage (recipe/rules.py)
    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    act_order: bool = False
    damp: float = 0.01
    block_size: int = 128
    observer: str = "minmax"
    # Group scales from the original weight, fixed up front (as llm-compressor and AutoGPTQ's
    # static_groups do), instead of from the updated columns as each group is reached.
    static_groups: bool = False
    # One forward pass per block, each layer solved on its quantized predecessors' outputs
    # (recipe/gptq_inline.py), instead of a float pass for the Hessians and a second to propagate.
    true_sequential: bool = False
    # The one-pass forward's target-layer matmuls in this dtype ("bfloat16": inputs and
    # weights rounded to bf16, products summed in fp32 by the CPU's bf16 GEMM, twice the
    # fp32 rate where the CPU has avx512_bf16/AMX); norms, attention, the residual stream and
    # the Hessians stay in the model's dtype. Needs true_sequential.
    matmul_dtype: str = "float32"
    # How group / channel scales and zero-points are stored. float16 rounds each scale up to
    # the next float16; on the 374M Llama that costs GPTQ ~4% of held-out KL against float32
    # scales (docs/BENCHMARKS.md), for 0.25 more bits per weight at group 128.
    scale_dtype: str = "float16"
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None

    def __post_init__(self):
        _check_bits(self, self.bits)
        _check_group(self, self.group_size)
        if self.observer not in OBSERVERS:
            raise ValueError(f"gptq: observer must be one of {', '.join(OBSERVERS)}, got {self.observer!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"gptq: scale_dtype must be one of {', '.join(SCALE_DTYPES)}, got {self.scale_dtype!r}")
        if self.matmul_dtype not in MATMUL_DTYPES:
            raise ValueError(f"gptq: matmul_dtype must be one of {', '.join(MATMUL_DTYPES)}, "
                             f"got {self.matmul_dtype!r}")
        if self.matmul_dtype != "float32" and not self.true_sequential:
            raise ValueError(f"gptq: matmul_dtype {self.matmul_dtype!r} applies to the one-pass forward: "
                             "set true_sequential: true as well (or leave matmul_dtype at float32)")
        if not 0 < self.damp < 1:
            raise ValueError(f"gptq: damp must be in (0, 1), got {self.damp}")
        if self.block_size < 1:
            raise ValueError(f"gptq: block_size must be positive, got {self.block_size}")

    def spec(self) -> QuantSpec:
        return _spec(self.bits, self.group_size, self.symmetric, self.scale_dtype)


@dataclass(frozen=True)
class AWQ:
    """AWQ: activation-aware scales (grid over alpha) and clipping, then 4-bit groups."""
    kind: ClassVar[str] = "quantize"   # the ordering rules' stage (recipe/rules.py)
    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    grid: int = 20
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None

    def __post_init__(self):
        _check_bits(self, self.bits)
        _check_group(self, self.group_size)
        if self.grid < 1:
            raise ValueError(f"awq: grid must be positive, got {self.grid}")

    def spec(self) -> QuantSpec:
        return _spec(self.bits, self.group_size, self.symmetric)


@dataclass(frozen=True)
class KMeans:
    """Deep Compression weight sharing: one k-means codebook per layer."""
    kind: ClassVar[str] = "quantize"   # the ordering rules' stage (recipe/rules.py)
    clusters: int = 16
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None

    def __post_init__(self):
        if isinstance(self.clusters, bool) or not isinstance(self.clusters, int) or not 2 <= self.clusters <= 256:
            raise ValueError(f"kmeans: clusters must be an integer in 2..256, got {self.clusters!r}")


@dataclass(frozen=True)
class SmoothQuant:
    """SmoothQuant W8A8: scales s = max|X|^alpha / max|W|^(1-alpha) moved from activations to
    weights, int8 weights per channel, int8 activations per token at run time."""
    kind: ClassVar[str] = "quantize"   # the ordering rules' stage (recipe/rules.py)
    alpha: float = 0.5
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"smoothquant: alpha must be in [0, 1], got {self.alpha}")


@dataclass(frozen=True)
class MixedPrecision:
    """Per-layer bit widths chosen to meet a budget (bits per weight, or bytes) at the least
    total layer-output error, measured with calibration Hessians; then each layer is
    quantized at its width with `method` (gptq or rtn)."""
    kind: ClassVar[str] = "quantize"   # the ordering rules' stage (recipe/rules.py)
    bits_per_weight: float | None = None
    max_bytes: int | None = None
    candidates: tuple[int, ...] = (2, 3, 4, 8)
    method: str = "gptq"
    group_size: int | None = 128
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.bits_per_weight is None and self.max_bytes is None:
            raise ValueError("mixed_precision: give bits_per_weight (e.g. 4.5) or max_bytes")
        if self.bits_per_weight is not None and not 1.0 <= self.bits_per_weight <= 16.0:
            raise ValueError(f"mixed_precision: bits_per_weight must be in [1, 16], got {self.bits_per_weight}")
        if self.max_bytes is not None and self.max_bytes < 1:
            raise ValueError(f"mixed_precision: max_bytes must be positive, got {self.max_bytes}")
        if not self.candidates or any(not 2 <= b <= 8 for b in self.candidates):
            raise ValueError(f"mixed_precision: candidates must be bit widths in 2..8, got {list(self.candidates)}")
        if self.method not in ("gptq", "rtn"):
            raise ValueError(f"mixed_precision: method must be gptq or rtn, got {self.method!r}")
        _check_group(self, self.group_size)
        object.__setattr__(self, "candidates", tuple(sorted(set(self.candidates))))

    def spec(self, bits: int) -> QuantSpec:
        # 8 bits: symmetric per channel, nearly lossless and what the int8 CPU kernel runs
        return _spec(8, None, True) if bits == 8 else _spec(bits, self.group_size, False)


Step = Union[RTN, GPTQ, AWQ, KMeans, SmoothQuant, MixedPrecision, Prune, IterativePrune, LotteryTicket, Finetune,
             QAT, Distill, LowRank, LoRA, EarlyExit]
STEP_TYPES: dict[str, type] = {"rtn": RTN, "gptq": GPTQ, "awq": AWQ, "kmeans": KMeans,
                               "smoothquant": SmoothQuant, "mixed_precision": MixedPrecision,
                               "prune": Prune, "iterative_prune": IterativePrune,
                               "lottery_ticket": LotteryTicket, "finetune": Finetune,
                               "qat": QAT, "distill": Distill, "lowrank": LowRank, "lora": LoRA,
                               "early_exit": EarlyExit}
NEEDS_CALIBRATION = (GPTQ, AWQ, SmoothQuant, MixedPrecision)


def needs_calibration(step) -> bool:
    """Steps that read activations or train: calibration batches are required."""
    return isinstance(step, NEEDS_CALIBRATION) or bool(getattr(step, "needs_data", False))

def step_name(step) -> str:
    for name, cls in STEP_TYPES.items():
        if isinstance(step, cls):
            return name
    raise TypeError(f"not a recipe step: {step!r}")


def step_to_dict(step) -> dict:
    def plain(v):
        if isinstance(v, tuple):
            return list(v)
        return step_to_dict(v)[step_name(v)] if type(v) in STEP_TYPES.values() else v

    # None is written where it differs from the default (group_size: null = per channel), so the
    # dict parses back to the same step
    return {step_name(step): {f.name: plain(v) for f in fields(step)
                              if (v := getattr(step, f.name)) is not None or f.default is not None}}


def parse_recipe(recipe: Any) -> list:
    """A built-in name, a YAML file path, YAML text, a list of steps or one-key dicts."""
    if isinstance(recipe, (str, Path)):
        text = str(recipe)
        if text in BUILTIN:
            return list(BUILTIN[text])
        path = Path(text)
        if path.suffix in (".yaml", ".yml", ".json") or path.exists():
            if not path.is_file():
                raise FileNotFoundError(f"recipe {path}: no such file")
            doc = _load_yaml(_read_recipe_text(path), str(path))
            if not isinstance(doc, list) or not doc:   # a file never names another recipe or file
                raise ValueError(f"recipe {path}: a recipe file holds a non-empty list of steps, e.g. "
                                 f"'- gptq: {{bits: 4}}'; found {type(doc).__name__ if doc else 'nothing'}")
            try:
                return parse_recipe(doc)
            except ValueError as e:
                raise ValueError(f"recipe {path}: {e}") from None
        close = difflib.get_close_matches(text, list(BUILTIN), n=3)
        hint = f"; closest: {', '.join(close)}" if close else f"; built-in recipes: {', '.join(BUILTIN)}"
        raise ValueError(f"unknown recipe {text!r} (not a built-in name or a file){hint}")
    if not isinstance(recipe, (list, tuple)) or not recipe:
        raise ValueError("a recipe is a non-empty list of steps, e.g. [{'gptq': {'bits': 4}}]")
    return [_parse_step(i + 1, item) for i, item in enumerate(recipe)]


def _parse_step(index: int, item: Any):
    if any(isinstance(item, cls) for cls in STEP_TYPES.values()):
        return item
    if not isinstance(item, dict) or len(item) != 1:
        raise ValueError(f"recipe step {index}: expected a one-key mapping like {{gptq: {{bits: 4}}}}, got {item!r}")
    (name, opts), = item.items()
    cls = STEP_TYPES.get(name)
    if cls is None:
        close = difflib.get_close_matches(str(name), list(STEP_TYPES), n=2)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise ValueError(f"recipe step {index}: unknown step {name!r}{hint}; steps are {', '.join(STEP_TYPES)}")
    opts = {} if opts is None else opts
    if not isinstance(opts, dict):
        raise ValueError(f"recipe step {index} ({name}): options must be a mapping, got {opts!r}")
    known = {f.name: f for f in fields(cls)}
    if "mixed_precision_training" in opts and "precision" in known:
        opts = _mixed_precision_option(index, name, opts)
    for key in opts:
        if key not in known:
            raise ValueError(f"recipe step {index} ({name}): unknown field {key!r}; fields are {', '.join(known)}")
    kwargs = {}
    for key, value in opts.items():
        kwargs[key] = _coerce(index, name, key, value, known[key])
    try:
        return cls(**kwargs)
    except ValueError as e:
        msg = str(e).removeprefix(f"{name}: ")
        raise ValueError(f"recipe step {index} ({name}): {msg}") from None


def _mixed_precision_option(index: int, name: str, opts: dict) -> dict:
    """`mixed_precision_training: {dtype: bf16}` (the issue's spelling) -> precision: bf16."""
    opts = dict(opts)
    value = opts.pop("mixed_precision_training")
    dtype = value.get("dtype") if isinstance(value, dict) and set(value) <= {"dtype"} else None
    if dtype is None and value not in (None, False):
        raise ValueError(f"recipe step {index} ({name}): mixed_precision_training must be {{dtype: bf16}} or "
                         f"{{dtype: fp16}}, got {value!r}")
    if "precision" in opts and dtype is not None and opts["precision"] != dtype:
        raise ValueError(f"recipe step {index} ({name}): precision {opts['precision']!r} and "
                         f"mixed_precision_training dtype {dtype!r} disagree; give one")
    if dtype is not None:
        opts["precision"] = {"bfloat16": "bf16", "float16": "fp16"}.get(dtype, dtype)
    return opts


def _coerce(index: int, step: str, key: str, value: Any, field: dataclasses.Field):
    default = field.default
    where = f"recipe step {index} ({step}): field {key!r}"
    if key in ("steps", "epochs", "batch_size", "act_bits", "alpha", "energy", "rank", "keep", "hidden_loss",
               "student", "exits", "targets", "base_bits", "group_size") and value is None:
        return None
    if key == "student":
        if isinstance(value, (str, dict)):
            return value
        raise ValueError(f"{where} must be {{width: 0.5}}, {{layers: [0, 2]}} or a path, got {value!r}")
    if key in ("exits", "targets"):
        if isinstance(value, (int, str)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            raise ValueError(f"{where} must be a list, got {value!r}")
        return tuple(value)
    if key in ("epochs", "energy", "keep", "alpha") and not isinstance(value, bool) and isinstance(value, int):
        return float(value)
    if key == "candidates":
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ValueError(f"{where} must be a list of bit widths, e.g. [2, 3, 4, 8]")
        return tuple(value)
    if key in ("bits_per_weight", "max_bytes", "sparsity", "pattern", "rounds", "per_round", "bits") and value is None:
        return None
    if key == "finetune" and value is None:
        return None
    if key == "finetune":
        if isinstance(value, Finetune):
            return value
        return _parse_step(index, {"finetune": value}) if isinstance(value, dict) else value
    if key == "rewind":
        if value == "init" or (isinstance(value, int) and not isinstance(value, bool)):
            return value
        raise ValueError(f"{where} must be init or a training iteration (an integer), got {value!r}")
    if key in ("sparsity", "per_round", "target", "lr"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where} must be a number, got {value!r}")
        return float(value)
    if key == "pattern":
        if not isinstance(value, str):
            raise ValueError(f"{where} must be a string such as \"2:4\", got {value!r}")
        return value
    if key in ("rounds", "bits"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where} must be an integer, got {value!r}")
        return value
    if key == "bits_per_weight":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where} must be a number, got {value!r}")
        return float(value)
    if key == "max_bytes":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where} must be an integer number of bytes, got {value!r}")
        return value
    if key in ("include", "exclude"):
        if value is None:
            return None
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{where} must be a list of name patterns")
        return tuple(value)
    if key == "group_size" and value in (None, "channel", 0):
        return None
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}")
        return value
    if isinstance(default, int) or (default is None and key == "group_size"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where} must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where} must be a number, got {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ValueError(f"{where} must be a string, got {value!r}")
        return value
    return value


def _check_bits(step, bits) -> None:
    name = step_name(step)
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"{name}: bits must be an integer in 2..8, got {bits!r}")


def _check_group(step, group) -> None:
    if group is not None and (isinstance(group, bool) or not isinstance(group, int) or group < 1):
        raise ValueError(f"{step_name(step)}: group_size must be a positive integer or null "
                         f"(per channel), got {group!r}")


MAX_RECIPE_BYTES = 1 << 20   # a recipe is a few lines; a larger file is not one


def _read_recipe_text(path: Path) -> str:
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise ValueError(f"recipe {path}: {size:,} bytes is too large for a recipe (at most {MAX_RECIPE_BYTES:,}); "
                         "is it the right file?")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"recipe {path}: not UTF-8 text (byte offset {e.start}); a recipe is a YAML file") from None


def _load_yaml(text: str, where: str):
    """The YAML document, loaded safely: plain data only, no Python objects (a `!!python/...`
    tag is refused), no aliases (a recipe needs none, and they can blow up in size)."""
    import yaml

    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                mark = event.start_mark
                raise ValueError(f"recipe {where}: line {mark.line + 1}: YAML aliases (*name) are not allowed in "
                                 "a recipe; write the steps out")
        return yaml.safe_load(text)  # safe: no object construction
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        if "constructor for the tag" in str(what):
            what += " (recipes are plain YAML data; Python objects are never built)"
        raise ValueError(f"recipe {where}: not valid YAML: {at}{what}") from None
    except RecursionError:
        raise ValueError(f"recipe {where}: nested too deeply to be a recipe") from None


# Built-in recipes by name (API.md): defined last, after the validators they run.
BUILTIN = {
    "int8": [RTN(bits=8, group_size=None, symmetric=True)],
    "w4-rtn": [RTN()],
    "w4-gptq": [GPTQ()],
    "w4-awq": [AWQ()],
    "w3-gptq": [GPTQ(bits=3)],
    "kmeans16": [KMeans(clusters=16)],
    "w8a8-smoothquant": [SmoothQuant()],
    "mixed-4.5": [MixedPrecision(bits_per_weight=4.5)],
    "prune50-magnitude": [Prune(method="magnitude", sparsity=0.5)],
    "prune50-wanda": [Prune(method="wanda", sparsity=0.5)],
    "prune50-sparsegpt": [Prune(method="sparsegpt", sparsity=0.5)],
    "prune-2:4-sparsegpt": [Prune(method="sparsegpt", pattern="2:4")],
    "prune50-wanda+w4": [Prune(method="wanda", sparsity=0.5), GPTQ()],
    "prune50-sparsegpt-w4": [Prune(method="sparsegpt", sparsity=0.5, bits=4)],
    "heads25+finetune": [Prune(method="heads", sparsity=0.25), Finetune(steps=200)],
    "neurons25+finetune": [Prune(method="neurons", sparsity=0.25), Finetune(steps=200)],
    "w4-qat": [QAT()],
    "w4-gptq+qat": [GPTQ(), QAT()],
    "distill-half": [Distill(student={"width": 0.5})],
    "distill+int8": [Distill(student={"width": 0.5}), RTN(bits=8, group_size=None, symmetric=True)],
}
