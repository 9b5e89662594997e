"""W8A8Linear: int8 weights, int8 activations, int32 accumulation (the SmoothQuant layer).

Weights are symmetric int8 with one fp16 scale per output channel (shrink's
QuantSpec(bits=8): codes -127..127). At every forward the input is
quantized per token (one float32 scale per row, shrink.algos.smoothquant's
quantize_per_token), the codes are multiplied in integers and the sum is
rescaled:

    y = (q_x @ q_w^T) * x_scale * w_scale (+ bias)

An optional per-input-channel `input_scale` multiplies x first: SmoothQuant's
1/s, kept here when it cannot be folded into the previous LayerNorm or Linear
(the weight columns were multiplied by s before quantization).

The integer product runs through `kernel`:

  int_mm   torch._int_mm (int8 x int8 -> int32). Measured on torch 2.13 CPU:
           exact for every shape tried (M 0..33, K 1..384, N 1..384, with a
           transposed, non-contiguous weight view), so it needs no padding and
           no second copy of the weight.
  float64  the same integer sum in float64, exact while |sum| < 2^53: when
           torch has no _int_mm, or in_features is so large that the int32
           sum could overflow (127 * 127 * K >= 2^31). `kernel_reason` says why.

On a GPU, _int_mm (cuBLASLt) takes more than 16 rows and in_features and
out_features that are multiples of 8 (measured on an H100, torch 2.11: exact
for those); other shapes there (a batch-1 decode step) take the float64
path. The integer sum is exact on every path, so they give identical outputs. Forward never mutates the
module, so one model may serve several threads. Rounding makes the layer's
gradient zero almost everywhere: it is for inference, not training.
"""
from __future__ import annotations

import torch
from torch import nn

from shrink.algos.smoothquant import quantize_per_token
from shrink.quant import QuantSpec, quantize
from shrink.modules._buffers import fixed_buffers, restore_dtypes

KERNELS = ("int_mm", "float64")
WEIGHT_SPEC = QuantSpec(bits=8)  # symmetric per output channel, fp16 scales, codes -127..127
_QMAX = 127
# the largest in_features whose int32 sum of int8 x int8 products cannot overflow
MAX_INT32_K = (2 ** 31 - 1) // (_QMAX * _QMAX)
# buffers whose dtype is part of the numerics: Module.half()/.to(dtype) must not cast them
_FIXED_DTYPE = ("codes", "scales", "input_scale")


def select_w8a8_kernel(in_features: int) -> tuple[str, str | None]:
    """(kernel, reason): int_mm where it is exact, else float64 and why."""
    if not hasattr(torch, "_int_mm"):
        return "float64", "this torch build has no torch._int_mm"
    if in_features > MAX_INT32_K:
        return "float64", (f"in_features {in_features} > {MAX_INT32_K}: an int32 sum of 127 x 127 products "
                           "could overflow")
    return "int_mm", None


class W8A8Linear(nn.Module):
    """y = quant8(x * input_scale) @ quant8(W)^T, accumulated in int32, + bias.

    Build one with `from_linear`. The constructor makes a shell with placeholder
    codes to be filled by `load_state_dict`; `smoothed` says whether it has an
    input_scale buffer.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, smoothed: bool = False,
                 kernel: str = "auto"):
        super().__init__()
        _check_dims(in_features, out_features)
        codes = torch.zeros(out_features, in_features, dtype=torch.int8)
        scales = torch.ones(out_features, dtype=WEIGHT_SPEC.scale_dtype)
        input_scale = torch.ones(in_features, dtype=torch.float32) if smoothed else None
        b = torch.zeros(out_features, dtype=torch.float32) if bias else None
        self._setup(in_features, out_features, codes, scales, input_scale, b, kernel)

    @classmethod
    def from_linear(cls, linear: nn.Linear, smooth_scale: torch.Tensor | None = None, *,
                    kernel: str = "auto") -> "W8A8Linear":
        """Quantize an nn.Linear (never modified). smooth_scale s [in]: SmoothQuant's
        per-channel scale; the weight's columns are multiplied by s before
        quantization and the module multiplies its input by 1/s."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"W8A8Linear.from_linear expects an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        out_features, in_features = w.shape
        _check_dims(in_features, out_features)
        input_scale = None
        if smooth_scale is not None:
            s = _check_smooth_scale(smooth_scale, in_features)
            w = w.to(torch.float32) * s
            input_scale = (1.0 / s).contiguous()
        qt = quantize(w, WEIGHT_SPEC)
        codes = qt.int_codes().to(torch.int8)  # 8-bit codes stored unpacked: the same bytes as packed
        bias = None if linear.bias is None else linear.bias.detach().to(torch.float32, copy=True)
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m._setup(in_features, out_features, codes, qt.scale.clone(), input_scale, bias, kernel)
        return m

    def _setup(self, in_features, out_features, codes, scales, input_scale, bias, kernel) -> None:
        self.in_features = in_features
        self.out_features = out_features
        self.kernel, self.kernel_reason = _resolve_kernel(kernel, in_features)
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        self.register_buffer("input_scale", input_scale)
        # frozen; a Parameter so that code expecting nn.Linear's `bias` finds one
        self.register_parameter("bias", None if bias is None else nn.Parameter(bias, requires_grad=False))

    # ------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            what = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"W8A8Linear: input must be a floating-point tensor, got {what}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"W8A8Linear: input of shape {tuple(x.shape)} does not match in_features={self.in_features} "
                "(the last dimension must equal it)"
            )
        x2 = x.detach().reshape(-1, self.in_features).to(torch.float32)
        if self.input_scale is not None:
            x2 = x2 * self.input_scale.to(x2.device)
        q, x_scale = quantize_per_token(x2)
        acc = integer_matmul(q, self.codes.to(q.device), self.kernel)
        y = acc.to(torch.float32) * x_scale * self.scales.to(device=q.device, dtype=torch.float32)
        if self.bias is not None:
            y = y + self.bias.to(device=q.device, dtype=torch.float32)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    # ------------------------------------------------------------ views

    def dequantized_weight(self) -> torch.Tensor:
        """codes * scale as float32 [out_features, in_features] (the smoothed weight, W * s)."""
        return self.codes.to(torch.float32) * self.scales.to(torch.float32)[:, None]

    @property
    def nbytes(self) -> int:
        """Stored bytes: int8 codes + fp16 scales + the input_scale vector (no bias)."""
        tensors = [t for t in (self.codes, self.scales, self.input_scale) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def extra_repr(self) -> str:
        text = (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, smoothed={self.input_scale is not None}, kernel={self.kernel}")
        return text + (f", kernel_reason={self.kernel_reason!r}" if self.kernel_reason else "")

    # ------------------------------------------------------------ nn.Module plumbing

    def _apply(self, fn, recurse=True):
        # .half()/.to(dtype) would re-round the scales and change the numerics; devices may change
        kept = fixed_buffers(self, _FIXED_DTYPE)
        super()._apply(fn, recurse)
        restore_dtypes(self, kept)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        n_errors = len(error_msgs)
        for name in _FIXED_DTYPE:
            mine, theirs = self._buffers.get(name), state_dict.get(prefix + name)
            if mine is None and isinstance(theirs, torch.Tensor) and name == "input_scale":
                error_msgs.append(f"{prefix}input_scale is in the state_dict but this W8A8Linear was built "
                                  "without one; construct it with smoothed=True")
            elif mine is not None and isinstance(theirs, torch.Tensor) and theirs.dtype != mine.dtype:
                error_msgs.append(f"{prefix}{name} is stored as {theirs.dtype} but W8A8Linear keeps {mine.dtype}; "
                                  "casting would change the quantized values")
        if len(error_msgs) == n_errors:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)


def integer_matmul(q: torch.Tensor, codes: torch.Tensor, kernel: str) -> torch.Tensor:
    """q [M, K] int8 @ codes [N, K]^T int8, exactly: int32 [M, N] from int_mm, float64
    holding the same integers from the fallback (not narrowed to int32, which a large
    in_features could overflow). Either rounds to the same float32."""
    if kernel == "int_mm" and q.device == codes.device:
        if q.device.type == "cpu":
            return torch._int_mm(q, codes.t())
        m, k = q.shape
        if q.device.type == "cuda" and m > 16 and k % 8 == 0 and codes.shape[0] % 8 == 0:
            return torch._int_mm(q, codes.t())
    # every partial sum is an integer below 2^53 in magnitude, so float64 adds exactly
    return q.to(torch.float64) @ codes.to(torch.float64).t()


def _resolve_kernel(kernel: str, in_features: int) -> tuple[str, str | None]:
    if kernel == "auto":
        return select_w8a8_kernel(in_features)
    if kernel == "float64":
        return "float64", "kernel='float64' was requested"
    if kernel != "int_mm":
        raise ValueError(f"W8A8Linear: kernel must be 'auto' or one of {', '.join(KERNELS)}; got {kernel!r}")
    chosen, reason = select_w8a8_kernel(in_features)
    if chosen != "int_mm":
        raise ValueError(f"W8A8Linear: kernel 'int_mm' cannot run in_features={in_features}: {reason}")
    return "int_mm", None


def _check_smooth_scale(s, in_features: int) -> torch.Tensor:
    if not isinstance(s, torch.Tensor) or not s.is_floating_point():
        what = s.dtype if isinstance(s, torch.Tensor) else type(s).__name__
        raise TypeError(f"W8A8Linear: smooth_scale must be a floating-point tensor, got {what}")
    if tuple(s.shape) != (in_features,):
        raise ValueError(f"W8A8Linear: smooth_scale has shape {tuple(s.shape)}; expected ({in_features},), "
                         "one scale per input channel")
    s = s.detach().to(torch.float32)
    if not torch.isfinite(s).all() or (s <= 0).any():
        raise ValueError("W8A8Linear: smooth_scale must be finite and positive (see smoothquant_scales)")
    return s


def _check_dims(in_features, out_features) -> None:
    for name, v in (("in_features", in_features), ("out_features", out_features)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"W8A8Linear: {name} must be a positive integer, got {v!r}")
