"""QuantConv2d: a Conv2d layer that keeps its weight quantized.

The weight is quantized as the [out_channels, in_channels/groups * kh * kw]
matrix that `shrink.surgery` shows algorithms (`Target.weight_view()` of a
Conv2d: each row one filter, columns in (channel, kh, kw) order), so GPTQ,
RTN and per-group specs treat a conv exactly as a Linear. Storage is
QuantLinear's: `codes`, `scales`, `zeros` persistent buffers (the same
state_dict keys) and the spec as a typed attribute.

Forward runs the "reference" kernel: the weight is dequantized (on every
call, or once with cache_weight=True), cast to the input's dtype, reshaped to
[out, in/groups, kh, kw] and handed to F.conv2d. shrink has no packed conv
kernel; `kernel_reason` says so. Only padding_mode="zeros" is accepted: the
other modes pad the input before the conv, which this layer does not copy.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from shrink.quant import QTensor, QuantSpec, quantize
from shrink.modules._buffers import fixed_buffers, restore_dtypes
from shrink.modules._conv import set_conv_geometry
from shrink.modules._packed import format_name, placeholder_storage, stored_dtype_errors, stored_qtensor

KERNEL = "reference"
KERNEL_REASON = "no packed conv kernel: the weight is dequantized and run through F.conv2d"
_FIXED_DTYPE = ("scales", "zeros")  # .half()/.to(dtype) must not re-round them (codes are integers already)


class QuantConv2d(nn.Module):
    """y = conv2d(x, dequantize(W), bias), with W kept quantized.

    Build one with `from_conv` (an nn.Conv2d and a QTensor of its weight, or a
    spec to quantize it with) or `from_qtensor` (a QTensor and the geometry).
    The constructor makes a shell with placeholder codes, to be filled by
    `load_state_dict`; it takes nn.Conv2d's arguments plus the spec.
    Attributes mirror nn.Conv2d's (in_channels, out_channels, kernel_size,
    stride, padding, dilation, groups, padding_mode); in_features and
    out_features are the quantized matrix's dims.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, spec: QuantSpec, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *,
                 weight_dtype: torch.dtype = torch.float32, cache_weight: bool = False):
        super().__init__()
        if not isinstance(spec, QuantSpec):
            raise TypeError(f"QuantConv2d: spec must be a QuantSpec, got {type(spec).__name__}")
        self._set_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode)
        codes, scales, zeros = placeholder_storage(self._matrix_shape, spec)
        b = torch.zeros(out_channels, dtype=weight_dtype) if bias else None
        self._setup(spec, weight_dtype, codes, scales, zeros, b, cache_weight)

    # ------------------------------------------------------------ construction

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, qtensor: QTensor | None = None, *, spec: QuantSpec | None = None,
                  observer: str = "minmax", cache_weight: bool = False) -> "QuantConv2d":
        """A QuantConv2d with conv's geometry and bias (copied; conv is never modified).

        Give exactly one of `qtensor` (the quantized [out, in/groups*kh*kw]
        weight, e.g. from GPTQ on `Target.weight_view()`) or `spec` (conv's
        weight is quantized round-to-nearest with `observer`)."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"QuantConv2d.from_conv expects an nn.Conv2d, got {type(conv).__name__}")
        if (qtensor is None) == (spec is None):
            raise ValueError("QuantConv2d.from_conv: give exactly one of qtensor= (already quantized) or spec= "
                             "(quantize conv's weight now)")
        if spec is not None:
            w = conv.weight.detach()
            qtensor = quantize(w.reshape(w.shape[0], -1), spec, observer=observer)
        bias = None if conv.bias is None else conv.bias.detach()
        return cls.from_qtensor(qtensor, bias, in_channels=conv.in_channels, kernel_size=conv.kernel_size,
                                stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                                groups=conv.groups, padding_mode=conv.padding_mode, cache_weight=cache_weight)

    @classmethod
    def from_qtensor(cls, qt: QTensor, bias: torch.Tensor | None = None, *, in_channels: int, kernel_size,
                     stride=1, padding=0, dilation=1, groups: int = 1, padding_mode: str = "zeros",
                     cache_weight: bool = False) -> "QuantConv2d":
        """A QuantConv2d over a quantized weight (copied: qt and bias are never modified).

        qt is the [out, in_channels/groups * kh * kw] matrix; a 4-D
        [out, in/groups, kh, kw] QTensor is taken too when its scales run per
        output channel (axis 0) or per tensor, the layouts in which both shapes
        store the same blocks."""
        if not isinstance(qt, QTensor):
            raise TypeError(f"QuantConv2d.from_qtensor expects a QTensor, got {type(qt).__name__}")
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        out_channels = int(qt.shape[0]) if len(qt.shape) else 0
        m._set_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode)
        _check_qtensor_shape(qt, m)
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or not bias.is_floating_point() or tuple(bias.shape) != (out_channels,):
                got = f"{tuple(bias.shape)} {bias.dtype}" if isinstance(bias, torch.Tensor) else type(bias).__name__
                raise ValueError(f"QuantConv2d: bias must be a float tensor of shape ({out_channels},), got {got}")
            bias = bias.detach().clone()
        dup = lambda t: None if t is None else t.detach().clone()  # noqa: E731
        m._setup(qt.spec, qt.dtype, dup(qt.data), dup(qt.scale), dup(qt.zero_point), bias, cache_weight)
        return m

    def _set_geometry(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode):
        set_conv_geometry(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode)
        self.out_features = out_channels
        self.in_features = in_channels // groups * self.kernel_size[0] * self.kernel_size[1]

    def _setup(self, spec, weight_dtype, codes, scales, zeros, bias, cache_weight):
        self.spec = spec
        self.weight_dtype = weight_dtype
        self.cache_weight = bool(cache_weight)
        self._grid = spec.grid()
        self.kernel, self.kernel_reason = KERNEL, KERNEL_REASON
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        # frozen like the weight; a Parameter so that code expecting nn.Conv2d's `bias` finds one
        self.register_parameter("bias", None if bias is None else nn.Parameter(bias, requires_grad=False))
        self.register_buffer("_cached_weight", None, persistent=False)
        self._prepare()

    def _prepare(self) -> None:
        self._cached_weight = self._dequantize(self.codes.device) if self.cache_weight else None

    @property
    def _matrix_shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    @property
    def weight_shape(self) -> torch.Size:
        """nn.Conv2d's weight shape: [out_channels, in_channels/groups, kh, kw]."""
        return torch.Size((self.out_channels, self.in_channels // self.groups, *self.kernel_size))

    # ------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            what = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"QuantConv2d: input must be a floating-point tensor, got {what}")
        if x.dim() not in (3, 4) or x.shape[-3] != self.in_channels:
            raise ValueError(
                f"QuantConv2d: input of shape {tuple(x.shape)} does not match in_channels={self.in_channels} "
                "(expected [N, C, H, W] or [C, H, W])"
            )
        weight = self._cached_weight if self._cached_weight is not None else self._dequantize(x.device)
        weight = weight.to(device=x.device, dtype=x.dtype).reshape(self.weight_shape)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    # ------------------------------------------------------------ views of the weight

    def to_qtensor(self) -> QTensor:
        """The stored weight as a [out, in/groups*kh*kw] QTensor (sharing the module's buffers)."""
        return stored_qtensor(self, self._matrix_shape)

    def dequantized_weight(self) -> torch.Tensor:
        """W_hat as nn.Conv2d's [out, in/groups, kh, kw] weight, in weight_dtype."""
        return self._dequantize(self.codes.device).reshape(self.weight_shape)

    @property
    def nbytes(self) -> int:
        """Stored bytes of the weight as the QTensor counts them (codes + scales + zero-points; no bias)."""
        return self.to_qtensor().nbytes

    @property
    def resident_nbytes(self) -> int:
        """Bytes this module holds in memory: every buffer and parameter, a cached weight included."""
        tensors = list(self.buffers(recurse=False)) + list(self.parameters(recurse=False))
        return sum(t.numel() * t.element_size() for t in tensors)

    def extra_repr(self) -> str:
        text = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding!r}")
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        return text + f", bias={self.bias is not None}, format={format_name(self.spec)}, kernel={self.kernel}"

    def _dequantize(self, device: torch.device) -> torch.Tensor:
        return stored_qtensor(self, self._matrix_shape, cpu=True).dequantize().to(device)

    # ------------------------------------------------------------ nn.Module plumbing

    def _apply(self, fn, recurse=True):
        # .half()/.to(dtype) would re-round the scales and change the numerics; devices may change
        kept = fixed_buffers(self, _FIXED_DTYPE)
        super()._apply(fn, recurse)
        restore_dtypes(self, kept)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        n_errors = len(error_msgs)
        error_msgs.extend(stored_dtype_errors(self, state_dict, prefix))
        if len(error_msgs) > n_errors:
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if len(error_msgs) == n_errors:
            self._prepare()


def _check_qtensor_shape(qt: QTensor, m: QuantConv2d) -> None:
    shape = tuple(int(s) for s in qt.shape)
    if shape == tuple(m._matrix_shape):
        return
    if shape == tuple(m.weight_shape):
        if qt.spec.granularity == "tensor" or not qt.spec.has_scale or qt.spec.axis % 4 == 0:
            return  # the same blocks in the same order: stored as the matrix
        raise ValueError(
            f"QuantConv2d: a 4-D QTensor with scales along axis {qt.spec.axis} does not store the blocks of the "
            f"[out, in/groups*kh*kw] matrix; quantize the matrix {list(m._matrix_shape)} (Target.weight_view()) instead"
        )
    raise ValueError(
        f"QuantConv2d: QTensor of shape {shape} does not match the conv: expected the [out, in/groups*kh*kw] "
        f"matrix {list(m._matrix_shape)} or the weight {list(m.weight_shape)}"
    )
