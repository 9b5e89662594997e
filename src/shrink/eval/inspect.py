"""What a model is made of, before any data: one row per weight-carrying layer with its
shape, parameters, storage, weight statistics and how well its weight survives
round-to-nearest quantization (SQNR at int8, int4-g128, int3-g128).

Rows cover nn.Linear, transformers' Conv1D, nn.Conv2d, nn.Embedding and the compressed
modules (QuantLinear, QuantConv2d, W8A8Linear: their dequantized weight is described,
their stored bytes are what the QTensor keeps). Statistics are computed in float64.

A tensor shared by several layers (a tied LM head) is counted in the first row that
holds it; later rows say so in `shared_with` and count only their own tensors, so
params and bytes add up over rows as model_params / model_nbytes count them.
The data-based part of the picture (layer-output error) is in recipe/inspect.py.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn

from shrink.eval.weights import sqnr_db
from shrink.modules import InputScaled, QuantConv2d, QuantLinear, W8A8Linear
from shrink.quant import QuantSpec, dequantize, quantize
from shrink.surgery import kind_of, select_modules

# The round-to-nearest formats every float layer is tried at (API format names).
SQNR_FORMATS = ("int8", "int4-g128", "int3-g128")
OUTLIER_STDS = 6.0


@dataclass(frozen=True)
class WeightStats:
    """Float64 statistics of a weight. std is the population std (ddof=0); kurtosis is
    excess kurtosis m4/m2^2 - 3 (0 for a Gaussian); max_over_std = max|w|/std;
    frac_over_6std = share of entries with |w| > 6 std; sparsity = share of exact zeros.
    Ratios are NaN for a constant tensor (std 0)."""

    mean: float
    std: float
    min: float
    max: float
    max_over_std: float
    kurtosis: float
    frac_over_6std: float
    sparsity: float


def weight_stats(w: torch.Tensor) -> WeightStats:
    """Statistics of `w` (any shape), in float64."""
    if w.numel() == 0:
        raise ValueError(f"weight_stats: empty tensor of shape {tuple(w.shape)}")
    x = w.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    mean = float(x.mean())
    d = x - mean
    m2 = float(d.pow(2).mean())
    m4 = float(d.pow(4).mean())
    std = math.sqrt(m2)
    a = x.abs()
    if std > 0:
        max_over_std = float(a.max()) / std
        kurtosis = m4 / (m2 * m2) - 3.0
        over = float((a > OUTLIER_STDS * std).to(torch.float64).mean())
    else:
        max_over_std = kurtosis = math.nan
        over = 0.0
    return WeightStats(mean=mean, std=std, min=float(x.min()), max=float(x.max()), max_over_std=max_over_std,
                       kurtosis=kurtosis, frac_over_6std=over, sparsity=float((x == 0).to(torch.float64).mean()))


def rtn_weight(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """w ([out, in]) after round-to-nearest at a format name (minmax observer), dequantized to float32."""
    return dequantize(quantize(w.detach().to(torch.float32), QuantSpec.from_name(fmt))).to(torch.float32)


def sqnr_profile(w: torch.Tensor, formats: tuple[str, ...] = SQNR_FORMATS) -> dict[str, float]:
    """Weight SQNR (dB) of w ([out, in]; groups along `in`) after RTN at each format."""
    return {fmt: sqnr_db(w, rtn_weight(w, fmt)) for fmt in formats}


def spec_label(spec: QuantSpec) -> str:
    """A compressed layer's format in API names where one fits: int4-g128 (asymmetric groups),
    int8 (symmetric per channel), nf4, fp8-e4m3; other variants spelled out."""
    if spec.format == "codebook":
        return f"codebook{len(spec.codebook)}"
    base = f"int{spec.bits}" if spec.format == "int" else spec.format
    if spec.granularity == "group":
        name = f"{base}-g{spec.group_size}"
        return name + (" symmetric" if spec.format == "int" and spec.symmetric else "")
    name = base if spec.granularity == "channel" or spec.format in ("fp16", "bf16", "fp32") else f"{base} per tensor"
    return name + (" asymmetric" if spec.has_zero_point else "")


@dataclass
class LayerRow:
    """One weight-carrying layer. `weight` is its weight as [out, in] (dequantized for a
    compressed layer; a conv's filters flattened; an embedding's [tokens, dim]) and
    `module` the module itself; neither goes into to_dict()."""

    name: str
    type: str
    kind: str                     # linear | conv1d | conv2d | embedding | quantized
    shape: tuple[int, ...]        # the weight as the module stores it (Conv1D: [in, out])
    params: int                   # own parameters (weight + bias), shared tensors counted once
    dtype: str                    # storage dtype of a float weight; a compressed layer's weight_dtype
    format: str                   # dtype for float layers; e.g. int4-g128 for compressed ones
    bytes: int                    # stored bytes of its weight and bias (model_nbytes' counting)
    stats: WeightStats
    compressible: bool            # a target of select_modules (the compress steps' default)
    quantized: bool
    note: str = ""
    shared_with: str | None = None
    sqnr_db: dict[str, float] | None = None
    output_error_int4: float | None = None
    rank: int | None = None
    weight: torch.Tensor = field(default=None, repr=False)
    module: nn.Module = field(default=None, repr=False)

    @property
    def bits_per_weight(self) -> float | None:
        """8 x bytes / params (bias included in both); None for a row whose weight is counted elsewhere."""
        return 8.0 * self.bytes / self.params if self.params and not self.shared_with else None

    def to_dict(self) -> dict:
        # not asdict(self): it would deep-copy the weight and the module
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("weight", "module")}
        d["shape"] = list(self.shape)
        d["stats"] = asdict(self.stats)
        d["sqnr_db"] = None if self.sqnr_db is None else dict(self.sqnr_db)
        d["bits_per_weight"] = self.bits_per_weight
        return d


_PACKED = (QuantLinear, QuantConv2d, W8A8Linear)
_SPARSE = ("sparse_linear", "sparse_conv2d")   # pruned SparseLinear / SparseConv2d: values + pattern, no .weight


def _weight_of(module: nn.Module, kind: str) -> torch.Tensor:
    """The layer's weight as [out, in] (conv filters flattened), detached."""
    if isinstance(module, _PACKED):
        w = module.dequantized_weight()
        return w.reshape(w.shape[0], -1).detach()
    if kind in _SPARSE:
        return module.dense_weight().detach()
    w = module.weight.detach()
    if kind == "conv1d":
        return w.t()
    return w.reshape(w.shape[0], -1)


def _packed_info(module: nn.Module) -> tuple[tuple[int, ...], str, str, int, str]:
    """(stored shape, dtype, format, weight bytes, note) of a compressed module."""
    if isinstance(module, W8A8Linear):
        note = "int8 weights and per-token int8 activations"
        if module.input_scale is not None:
            note += "; SmoothQuant-scaled: statistics are of W * s"
        return (module.out_features, module.in_features), "int8", "w8a8", module.nbytes, note
    shape = tuple(module.weight_shape) if isinstance(module, QuantConv2d) else (module.out_features, module.in_features)
    dtype = str(module.weight_dtype).removeprefix("torch.")
    return shape, dtype, spec_label(module.spec), module.nbytes, f"kernel {module.kernel}"


def layer_rows(model: nn.Module, *, sqnr: bool = True) -> list[LayerRow]:
    """One row per weight-carrying layer in model order (see the module docstring).
    sqnr=True also fills each float layer's SQNR at SQNR_FORMATS."""
    selection = select_modules(model)
    default = {t.name for t in selection.targets}
    skipped = {s.name: s.reason for s in selection.skipped}
    scaled = {id(m.inner) for m in model.modules() if isinstance(m, InputScaled)}
    counted: dict[int, str] = {}  # data_ptr of a counted tensor -> the row that counted it
    rows = []
    for name, module in model.named_modules():
        packed = isinstance(module, _PACKED)
        kind = "quantized" if packed else kind_of(module)
        if kind is None:
            continue
        stored = getattr(module, "weight", getattr(module, "values", None))   # a sparse layer keeps `values`
        tensors = [t for t in (stored, getattr(module, "bias", None))
                   if isinstance(t, torch.Tensor)] if not packed else \
                  ([module.bias] if module.bias is not None else [])
        shared = next((counted[t.data_ptr()] for t in tensors if t.data_ptr() in counted), None)
        own = [t for t in tensors if t.data_ptr() not in counted]
        for t in tensors:
            counted.setdefault(t.data_ptr(), name)
        if packed:
            shape, dtype, fmt, wbytes, note = _packed_info(module)
            logical = module.in_features * module.out_features
            params = logical + sum(t.numel() for t in own)
            nbytes = wbytes + sum(t.numel() * t.element_size() for t in own)
            if id(module) in scaled:
                note += "; input scaled by a per-channel vector (AWQ/SmoothQuant)"
        elif kind in _SPARSE:   # as model_params / model_nbytes count it: the kept values, pattern and bias
            shape, dtype = (module.out_features, module.in_features), str(module.values.dtype).removeprefix("torch.")
            fmt, note = f"{dtype} {module.layout}", skipped.get(name, "")
            params = module.nnz + sum(t.numel() for t in own if t is not module.values)
            nbytes = module.nbytes
        else:
            w = module.weight
            shape, dtype = tuple(w.shape), str(w.dtype).removeprefix("torch.")
            fmt, note = dtype, skipped.get(name, "")
            params = sum(t.numel() for t in own)
            nbytes = sum(t.numel() * t.element_size() for t in own)
        if shared is not None:
            note = (note + "; " if note else "") + f"weight shared with {shared} (counted there)"
        weight = _weight_of(module, kind)
        rows.append(LayerRow(
            name=name, type=type(module).__name__, kind=kind, shape=shape, params=params, dtype=dtype,
            format=fmt, bytes=nbytes, stats=weight_stats(weight), compressible=name in default,
            quantized=packed, note=note, shared_with=shared,
            sqnr_db=sqnr_profile(weight) if sqnr and not packed and weight.is_floating_point() else None,
            weight=weight, module=module,
        ))
    return rows


def weight_error(sqnr: float) -> float:
    """The relative weight error ||dW||^2 / ||W||^2 a SQNR (dB) stands for: the data-free
    counterpart of the layer-output error (the output error with identity input Hessian)."""
    return 10.0 ** (-sqnr / 10.0) if math.isfinite(sqnr) else (0.0 if sqnr > 0 else math.inf)


def rank_rows(rows: list[LayerRow], by: str) -> list[str]:
    """Set each row's rank (1 = most sensitive) by `by`: "output_error_int4" (rows that have
    one) or "sqnr_int4" (lowest int4-g128 SQNR first); rows without the measure get no rank.
    Returns the ranked names, most sensitive first; ties keep model order."""
    def score(r: LayerRow) -> float | None:
        if by == "output_error_int4":
            return r.output_error_int4
        if by == "sqnr_int4":
            return None if r.sqnr_db is None else weight_error(r.sqnr_db["int4-g128"])
        raise ValueError(f"rank_rows: unknown measure {by!r}; use 'output_error_int4' or 'sqnr_int4'")

    scored = [(s, i, r) for i, r in enumerate(rows) if (s := score(r)) is not None and not math.isnan(s)]
    scored.sort(key=lambda sir: (-sir[0], sir[1]))
    for r in rows:
        r.rank = None
    for k, (_, _, r) in enumerate(scored, start=1):
        r.rank = k
    return [r.name for _, _, r in scored]
