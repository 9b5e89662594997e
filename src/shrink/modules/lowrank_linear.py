"""LowRankLinear: a Linear layer stored as two thin factors, W ~ A B (shrink.algos.svd).

    y = x B^T A^T + bias = up(down(x))

`down` is an nn.Linear(in_features, rank, bias=False) holding B [rank, in]; `up` is an
nn.Linear(rank, out_features, bias) holding A [out, rank] and the bias. Two matmuls of
r (in + out) multiply-adds per row instead of in x out, and r (in + out) stored weights.

Why two nn.Linear children rather than two bare parameters: every later step sees them
as ordinary Linear layers. A fine-tune trains them; a quantization step (rtn, gptq, ...)
replaces each with a QuantLinear, so low-rank followed by int8 composes without any code
that knows about low rank; pruning stores them sparse. `dense_weight()` and `nbytes`
follow whatever the children have become.

`source` says which layer it replaced: "linear", or "conv1d" for transformers' GPT-2
Conv1D (a Linear that stores its weight [in, out]); an export writes the dense layer back
in that layout so the architecture's own loader reads it.
"""
from __future__ import annotations

import torch
from torch import nn


SOURCES = ("linear", "conv1d")


class LowRankLinear(nn.Module):
    """y = up(down(x)): W ~ up.weight @ down.weight, [out, r] @ [r, in].

    Build one with `from_factors`; the constructor makes a shell of the right sizes (random
    factors, as nn.Linear initializes them, and a zero bias) for load_state_dict to fill.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 dtype: torch.dtype = torch.float32, device=None, source: str = "linear"):
        super().__init__()
        _check(in_features, out_features, rank)
        if source not in SOURCES:
            raise ValueError(f"LowRankLinear: source must be one of {', '.join(SOURCES)}, got {source!r}")
        self.in_features, self.out_features, self.rank, self.source = in_features, out_features, rank, source
        self.down = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.up = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)
        if bias:
            with torch.no_grad():
                self.up.bias.zero_()

    @classmethod
    def from_factors(cls, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None,
                     source: str = "linear") -> "LowRankLinear":
        """a [out, r], b [r, in] (the same floating dtype and device), bias [out] or None; copied."""
        for name, t in (("a", a), ("b", b)):
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
                raise ValueError(f"LowRankLinear.from_factors: {name} must be a 2-D floating tensor, got "
                                 f"{getattr(t, 'shape', type(t).__name__)}")
        if a.shape[1] != b.shape[0]:
            raise ValueError(f"LowRankLinear.from_factors: a is {tuple(a.shape)} = [out, r] and b is "
                             f"{tuple(b.shape)} = [r, in]: their ranks {a.shape[1]} and {b.shape[0]} differ")
        if a.dtype != b.dtype or a.device != b.device:
            raise ValueError(f"LowRankLinear.from_factors: a ({a.dtype}, {a.device}) and b ({b.dtype}, {b.device}) "
                             "must share dtype and device")
        out_f, r = a.shape
        if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (out_f,)):
            raise ValueError(f"LowRankLinear.from_factors: bias must have shape ({out_f},), got "
                             f"{getattr(bias, 'shape', type(bias).__name__)}")
        mod = cls(int(b.shape[1]), int(out_f), int(r), bias=bias is not None, dtype=a.dtype, device=a.device,
                  source=source)
        with torch.no_grad():
            mod.up.weight.copy_(a)
            mod.down.weight.copy_(b)
            if bias is not None:
                mod.up.bias.copy_(bias.detach().to(a.dtype))
        return mod

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.up, "bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(a [out, r], b [r, in]) as the children apply them (dequantized, or rebuilt from sparse storage)."""
        return _effective_weight(self.up, "up"), _effective_weight(self.down, "down")

    def dense_weight(self) -> torch.Tensor:
        """W = a @ b [out, in], the matrix this layer applies (computed in float32 at least)."""
        a, b = self.factors()
        dtype = torch.promote_types(a.dtype, torch.float32)
        return (a.to(dtype) @ b.to(dtype)).to(a.dtype)

    @property
    def nbytes(self) -> int:
        """Stored bytes of the two factors and the bias (a quantized child counts its codes and scales)."""
        return _stored_bytes(self.down) + _stored_bytes(self.up)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}" + (f", source={self.source}" if self.source != "linear" else ""))


def _effective_weight(mod: nn.Module, which: str) -> torch.Tensor:
    if isinstance(mod, nn.Linear):
        return mod.weight
    for attr in ("dequantized_weight", "dense_weight"):   # QuantLinear / W8A8Linear; SparseLinear
        fn = getattr(mod, attr, None)
        if callable(fn):
            w = fn()
            scale = getattr(mod, "input_scale", None)      # W8A8 with SmoothQuant's scale kept in the layer
            return w * scale.to(w.dtype)[None, :] if isinstance(scale, torch.Tensor) else w
    inner = getattr(mod, "inner", None)                    # InputScaled: y = inner(x * s)
    scale = getattr(mod, "input_scale", None)
    if isinstance(inner, nn.Module) and isinstance(scale, torch.Tensor):
        w = _effective_weight(inner, which)
        return w * scale.to(w.dtype)[None, :]
    raise TypeError(f"LowRankLinear: cannot read the weight of its {which} factor, a {type(mod).__name__}")


def _stored_bytes(mod: nn.Module) -> int:
    bias = getattr(mod, "bias", None)
    bias_bytes = bias.numel() * bias.element_size() if isinstance(bias, torch.Tensor) else 0
    if isinstance(mod, nn.Linear):
        return mod.weight.numel() * mod.weight.element_size() + bias_bytes
    inner, scale = getattr(mod, "inner", None), getattr(mod, "input_scale", None)
    if isinstance(inner, nn.Module) and isinstance(scale, torch.Tensor) and not hasattr(mod, "nbytes"):
        return _stored_bytes(inner) + scale.numel() * scale.element_size()   # InputScaled
    n = getattr(mod, "nbytes", None)
    if isinstance(n, int):
        return n if hasattr(mod, "nnz") else n + bias_bytes   # a sparse layer's nbytes has its bias
    return sum(t.numel() * t.element_size() for t in list(mod.parameters()) + list(mod.buffers()))


def _check(in_features, out_features, rank) -> None:
    for name, v in (("in_features", in_features), ("out_features", out_features), ("rank", rank)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"LowRankLinear: {name} must be a positive integer, got {v!r}")
    if rank > min(in_features, out_features):
        raise ValueError(f"LowRankLinear: rank {rank} is larger than a {out_features}x{in_features} layer allows "
                         f"(at most min(out, in) = {min(in_features, out_features)})")
