"""What a compression run records: per layer, per step, and the whole result."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn


@dataclass
class LayerRecord:
    name: str
    shape: tuple[int, int]
    format: str                   # e.g. int4-g128, kmeans16
    bytes_fp32: int
    bytes_stored: int
    error: float                  # layer-output proxy: 2/n ||WX - QX||^2 with calibration, else weight MSE
    error_rtn: float | None       # the same measure for round-to-nearest, where the step can compare
    sqnr_db: float                # weight SQNR
    seconds: float
    kernel: str                   # QuantLinear's forward path
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LayerRecord":
        return cls(**{**d, "shape": tuple(d["shape"])})


@dataclass
class StepRecord:
    index: int
    step: dict                    # {name: {options}} as in the recipe
    seconds: float = 0.0
    layers: list[LayerRecord] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)   # {"name", "reason"}
    details: dict = field(default_factory=dict)          # step-specific evidence (e.g. mixed-precision sensitivities)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = [l.to_dict() for l in self.layers]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "StepRecord":
        """A record read back from to_dict's JSON (a resumed run's checkpoint)."""
        return cls(index=d["index"], step=d["step"], seconds=d["seconds"],
                   layers=[LayerRecord.from_dict(l) for l in d["layers"]], skipped=list(d["skipped"]),
                   details=dict(d["details"]))


def model_nbytes(model: nn.Module) -> int:
    """Stored bytes: parameters and buffers at their dtype, QuantLinear and QuantConv2d
    weights as their QTensor counts them (packed codes + scales + zero-points, not the
    kernel's repacked copy or a cached dequantized weight), shared tensors once, integer
    index buffers (position ids) not at all. A model another runtime runs (an .onnx file)
    says its own `stored_nbytes`."""
    stored = getattr(model, "stored_nbytes", None)
    if isinstance(stored, int):
        return stored
    packed = _packed_types()
    seen: set[int] = set()
    total = 0
    for mod in model.modules():
        if isinstance(mod, packed):
            total += mod.nbytes
            if mod.bias is not None and not _nbytes_has_bias(mod):   # a sparse layer's nbytes has its bias
                total += mod.bias.numel() * mod.bias.element_size()
            seen.update(t.data_ptr() for t in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)))
    for mod in model.modules():
        if isinstance(mod, packed):
            continue
        for t in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)):
            if t.data_ptr() in seen or _is_index_buffer(t):
                continue
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def model_params(model: nn.Module) -> int:
    """Parameters the model computes with: packed layers count their logical weights
    (out x in; a QuantConv2d's out x in/groups*kh*kw, nn.Conv2d's weight numel) and bias,
    a pruned layer stored sparse its non-zero weights, shared tensors once. A model another runtime runs says its own `stored_params`."""
    stored = getattr(model, "stored_params", None)
    if isinstance(stored, int):
        return stored
    packed = _packed_types()
    seen: set[int] = set()
    n = 0
    for mod in model.modules():
        if isinstance(mod, packed):
            n += mod.nnz if _is_sparse(mod) else _logical(mod)
            if mod.bias is not None and mod.bias.data_ptr() not in seen:
                n += mod.bias.numel()
            seen.update(t.data_ptr() for t in mod.parameters(recurse=False))
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            n += p.numel()
    return n


def _packed_types() -> tuple[type, ...]:
    from shrink.modules.quant_conv2d import QuantConv2d
    from shrink.modules.quant_linear import QuantLinear
    from shrink.modules.sparse_conv2d import SparseConv2d
    from shrink.modules.sparse_linear import SparseLinear
    from shrink.modules.w8a8_linear import W8A8Linear

    return QuantLinear, QuantConv2d, W8A8Linear, SparseLinear, SparseConv2d


def _is_sparse(mod: nn.Module) -> bool:
    return callable(getattr(mod, "dense_weight", None)) and hasattr(mod, "nnz")


def _nbytes_has_bias(mod: nn.Module) -> bool:
    """SparseLinear / SparseConv2d count their bias in nbytes; the quantized layers
    (SparseQuantLinear included, though sparse) do not."""
    from shrink.modules._sparse import SparseBase

    return isinstance(mod, SparseBase)


def _logical(mod: nn.Module) -> int:
    return mod.in_features * mod.out_features


def _is_index_buffer(t: torch.Tensor) -> bool:
    # position_ids and similar integer index buffers are not weights
    return not t.is_floating_point() and t.dim() <= 2 and t.dtype in (torch.int64, torch.int32)
