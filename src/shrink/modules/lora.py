"""LoRALinear: a frozen layer plus a trainable low-rank update (LoRA, Hu et al. 2021).

    y = base(x) + (alpha / rank) * dropout(x) A^T B^T,   A [rank, in], B [out, rank]

The base is an nn.Linear, transformers' GPT-2 Conv1D (a Linear that stores its weight
[in, out]) or a QuantLinear (QLoRA: the frozen base held in 4 bits). Only A and B train.

Initialization: B = 0, so the layer starts as exactly its base (base(x) + 0); A is drawn
from N(0, sigma^2) with sigma = 1 / rank, PEFT's `init_lora_weights="gaussian"` choice
(the seeds' "A ~ N(0, sigma^2)"; PEFT's default is a Kaiming-uniform A, loralib's too).

Merging: `merge()` computes W' = W + (alpha / rank) B A once (in float64, then the base
weight's dtype; for a QuantLinear base W is its dequantized weight) and from then on
runs forward as one plain Linear with W' — no adapter matmuls. The base is not touched:
W' is kept beside it (a non-persistent buffer), so `unmerge()` only drops W' and is
exact by construction, and the state_dict always holds the unmerged base and adapters.
Holding both costs memory; for deployment `merged_module()` returns the plain layer
alone (an nn.Linear, or a Conv1D where the base came from one; for a QuantLinear base a
float layer — re-quantize it with a later step if wanted).

`source` says which layer the adapters were put on: "linear", or "conv1d" (the base may
since have been quantized into a QuantLinear); merged layers go back to that layout so the
architecture's own loader reads them.

Threads: forward mutates nothing and reads `merged_weight` once, so several threads may
share the layer; merge()/unmerge() swap that one reference whole (a call already running
finishes on the weight it started with).
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from shrink.modules.quant_linear import QuantLinear

SOURCES = ("linear", "conv1d")


def base_kind(base: nn.Module) -> str | None:
    """"linear", "conv1d" (transformers' Conv1D, by duck type) or "quant" (QuantLinear); None otherwise."""
    if isinstance(base, QuantLinear):
        return "quant"
    if isinstance(base, nn.Linear):
        return "linear"
    w = getattr(base, "weight", None)
    if type(base).__name__ == "Conv1D" and isinstance(w, nn.Parameter) and w.dim() == 2 \
            and w.shape[1] == getattr(base, "nf", None):
        return "conv1d"
    return None


def _dims(base: nn.Module, kind: str) -> tuple[int, int]:
    """(in_features, out_features) of a base layer."""
    if kind == "conv1d":
        return int(base.weight.shape[0]), int(base.weight.shape[1])
    return int(base.in_features), int(base.out_features)


class LoRALinear(nn.Module):
    """A frozen `base` layer with a trainable rank-`rank` update scaled by alpha / rank.

    name: the layer's name in the model, for error messages. generator: draws A (seeded
    runs give the same adapters). source: what the adapted layer was ("linear" or "conv1d");
    default: the base's own layout (a QuantLinear base: "linear").
    The base's parameters are set to requires_grad=False; the base module is used as given
    (not copied).
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float = 16.0, dropout: float = 0.0, *,
                 name: str = "layer", generator: torch.Generator | None = None, source: str | None = None):
        super().__init__()
        kind = base_kind(base)
        if kind is None:
            raise TypeError(f"LoRALinear ({name}): the base must be an nn.Linear, a transformers Conv1D or a "
                            f"QuantLinear, got {type(base).__name__}")
        in_f, out_f = _dims(base, kind)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"LoRALinear ({name}): rank must be a positive integer, got {rank!r}")
        if rank > min(in_f, out_f):
            raise ValueError(f"LoRALinear ({name}): rank {rank} is larger than the layer allows: its weight is "
                             f"[{out_f}, {in_f}], so an update B A has rank at most {min(in_f, out_f)}; "
                             f"use rank <= {min(in_f, out_f)} (LoRA uses ranks far below it), or leave this "
                             "layer out of targets")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise ValueError(f"LoRALinear ({name}): alpha must be a positive number, got {alpha!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"LoRALinear ({name}): dropout must be in [0, 1), got {dropout!r}")
        source = source or ("conv1d" if kind == "conv1d" else "linear")
        if source not in SOURCES:
            raise ValueError(f"LoRALinear ({name}): source must be one of {', '.join(SOURCES)}, got {source!r}")
        if kind == "conv1d" and source != "conv1d":
            raise ValueError(f"LoRALinear ({name}): a Conv1D base has source 'conv1d'")
        self.in_features, self.out_features = in_f, out_f
        self.rank, self.alpha, self.dropout_p, self.source = rank, float(alpha), float(dropout), source
        self.scaling = self.alpha / rank
        for p in base.parameters():
            p.requires_grad_(False)
        self.base = base
        dtype = base.weight_dtype if kind == "quant" else base.weight.dtype
        device = base.codes.device if kind == "quant" else base.weight.device
        a = torch.randn(rank, in_f, generator=generator, dtype=torch.float32) / rank
        self.lora_A = nn.Parameter(a.to(device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_f, rank, dtype=dtype, device=device))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.register_buffer("merged_weight", None, persistent=False)

    # ------------------------------------------------------------ views

    @property
    def base_kind(self) -> str:
        return base_kind(self.base)

    @property
    def merged(self) -> bool:
        return self.merged_weight is not None

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base, "bias", None)

    def base_weight(self) -> torch.Tensor:
        """The base's weight as [out, in] (a QuantLinear's dequantized copy; a Conv1D's transposed view)."""
        kind = self.base_kind
        if kind == "quant":
            return self.base.dequantized_weight()
        w = self.base.weight.detach()
        return w.t() if kind == "conv1d" else w

    def delta_weight(self) -> torch.Tensor:
        """(alpha / rank) B A as [out, in], computed in float64."""
        return self.scaling * (self.lora_B.detach().double() @ self.lora_A.detach().double())

    def effective_weight(self) -> torch.Tensor:
        """W + (alpha / rank) B A as [out, in]: summed in float64, then the base weight's dtype."""
        w = self.base_weight()
        return (w.double() + self.delta_weight().to(w.device)).to(w.dtype)

    @property
    def adapter_nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in (self.lora_A, self.lora_B))

    @property
    def nbytes(self) -> int:
        """Stored bytes of the weights, unmerged: the base's weight (a QuantLinear's codes, scales and
        zero-points) plus A and B; biases excluded, as QuantLinear counts them."""
        if self.base_kind == "quant":
            base = self.base.nbytes
        else:
            base = self.base.weight.numel() * self.base.weight.element_size()
        return base + self.adapter_nbytes

    # ------------------------------------------------------------ merge

    def merge(self) -> "LoRALinear":
        """Run as one Linear with W' = W + (alpha / rank) B A (the base is kept for unmerge)."""
        with torch.no_grad():
            self.merged_weight = self.effective_weight()
        return self

    def unmerge(self) -> "LoRALinear":
        """Back to base(x) + adapters: exact, the base was never modified."""
        self.merged_weight = None
        return self

    def merged_module(self) -> nn.Module:
        """A new plain layer computing W' x + bias: an nn.Linear, or a transformers Conv1D where
        source is "conv1d" (its weight stored [in, out]). A QuantLinear base gives a float layer
        in its weight_dtype. The result is trainable (requires_grad) like any fresh layer."""
        w = self.effective_weight()
        bias = self.bias
        if self.source == "conv1d":
            if self.base_kind == "conv1d":
                out = copy.deepcopy(self.base)
            else:
                from transformers.pytorch_utils import Conv1D

                out = Conv1D(self.out_features, self.in_features).to(device=w.device, dtype=w.dtype)
            with torch.no_grad():
                out.weight.copy_(w.t())
                if bias is not None:
                    out.bias.copy_(bias.detach())
                else:
                    out.bias.zero_()
        else:
            out = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=w.device,
                            dtype=w.dtype)
            with torch.no_grad():
                out.weight.copy_(w)
                if bias is not None:
                    out.bias.copy_(bias.detach())
        for p in out.parameters():
            p.requires_grad_(True)
        return out

    # ------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.merged_weight
        if w is not None:
            bias = self.bias
            return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))
        y = self.base(x)
        h = self.lora_dropout(x)
        a, b = self.lora_A, self.lora_B
        if a.dtype != h.dtype and not torch.is_autocast_enabled(h.device.type):
            a, b = a.to(h.dtype), b.to(h.dtype)
        return y + F.linear(F.linear(h, a), b) * self.scaling

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha:g}, dropout={self.dropout_p:g}, source={self.source}, merged={self.merged}")

    # ------------------------------------------------------------ loading

    @classmethod
    def shell(cls, in_features: int, out_features: int, rank: int, alpha: float, dropout: float = 0.0, *,
              bias: bool = True, dtype: torch.dtype = torch.float32, source: str = "linear",
              base: str = "linear") -> "LoRALinear":
        """An empty LoRALinear of these sizes for load_state_dict to fill. base "linear" / "conv1d"
        builds that float base; "quant": an nn.Linear placeholder, to be replaced by the QuantLinear
        saved with it (models/compressed.py lists it as its own entry)."""
        if base == "conv1d":
            from transformers.pytorch_utils import Conv1D

            inner = Conv1D(out_features, in_features).to(dtype)
        elif base in ("linear", "quant"):
            inner = nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
        else:
            raise ValueError(f"LoRALinear.shell: base must be linear, conv1d or quant, got {base!r}")
        return cls(inner, rank, alpha, dropout, source=source, generator=torch.Generator())
