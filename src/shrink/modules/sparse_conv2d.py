"""SparseConv2d: a Conv2d layer that stores only its kept weights.

The weight is stored as the [out_channels, in_channels/groups * kh * kw] matrix
(each row one filter, columns in (channel, kh, kw) order, as `Target.weight_view()`
shows it to algorithms), in SparseLinear's storage: `values` (an nn.Parameter) and
the pattern buffers of the layout. Forward always rebuilds the dense weight and
runs F.conv2d ("dense_rebuild"): torch has no sparse convolution kernel for it.
Only padding_mode="zeros" is accepted, as in QuantConv2d.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from shrink.formats.sparse import encode_sparse
from shrink.modules._conv import set_conv_geometry
from shrink.modules._sparse import SparseBase, placeholder_stored

KERNEL_REASON = "no sparse conv kernel: the dense weight is rebuilt each call and run through F.conv2d"


class SparseConv2d(SparseBase):
    """y = conv2d(x, W, bias) with W stored sparse. Attributes mirror nn.Conv2d's;
    in_features and out_features are the stored matrix's dims."""

    kernel = "dense_rebuild"
    kernel_reason = KERNEL_REASON

    def __init__(self, in_channels: int, out_channels: int, kernel_size, layout: str, nnz: int, stride=1,
                 padding=0, dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 n: int | None = None, m: int | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self._set_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode)
        try:
            stored = placeholder_stored(layout, self._matrix(), nnz, dtype, n, m)
        except ValueError as e:
            raise ValueError(f"SparseConv2d: {e}") from None
        self._setup_storage(stored, torch.zeros(out_channels, dtype=dtype) if bias else None)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, mask: torch.Tensor | None = None, layout: str = "bitmask",
                  n: int | None = None, m: int | None = None) -> "SparseConv2d":
        """conv's weight stored where mask (default weight != 0) in `layout`; geometry and bias
        copied, conv unmodified."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"SparseConv2d.from_conv expects an nn.Conv2d, got {type(conv).__name__}")
        return cls.from_dense(conv.weight.detach(), None if conv.bias is None else conv.bias.detach(), mask, layout,
                              n, m, stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                              groups=conv.groups, padding_mode=conv.padding_mode)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                   layout: str = "bitmask", n: int | None = None, m: int | None = None, *, stride=1, padding=0,
                   dilation=1, groups: int = 1, padding_mode: str = "zeros") -> "SparseConv2d":
        """A conv weight [out, in/groups, kh, kw] stored where mask (default weight != 0; the
        weight's shape or the [out, in/groups*kh*kw] matrix's) in `layout` (copied)."""
        if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
            what = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise ValueError(f"SparseConv2d.from_dense: weight must be [out, in/groups, kh, kw], got {what}")
        mod = cls.__new__(cls)
        nn.Module.__init__(mod)
        out_c, per_group, kh, kw = (int(s) for s in weight.shape)
        mod._set_geometry(per_group * groups if isinstance(groups, int) else per_group, out_c, (kh, kw), stride,
                          padding, dilation, groups, padding_mode)
        matrix = weight.detach().reshape(out_c, -1)
        if isinstance(mask, torch.Tensor) and tuple(mask.shape) == tuple(weight.shape):
            mask = mask.reshape(matrix.shape)
        try:
            stored = encode_sparse(matrix, mask, layout, n=n, m=m)
        except ValueError as e:
            raise ValueError(f"SparseConv2d.from_dense: {e}") from None
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or not bias.is_floating_point() or tuple(bias.shape) != (out_c,):
                got = f"{tuple(bias.shape)} {bias.dtype}" if isinstance(bias, torch.Tensor) else type(bias).__name__
                raise ValueError(f"SparseConv2d.from_dense: bias must be a float tensor of shape ({out_c},), got {got}")
            bias = bias.detach().clone()
        mod._setup_storage(stored, bias)
        return mod

    def _set_geometry(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode):
        set_conv_geometry(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode)
        self.out_features = out_channels
        self.in_features = in_channels // groups * self.kernel_size[0] * self.kernel_size[1]

    @property
    def weight_shape(self) -> torch.Size:
        """nn.Conv2d's weight shape: [out_channels, in_channels/groups, kh, kw]."""
        return torch.Size((self.out_channels, self.in_channels // self.groups, *self.kernel_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            what = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"SparseConv2d: input must be a floating-point tensor, got {what}")
        if x.dim() not in (3, 4) or x.shape[-3] != self.in_channels:
            raise ValueError(f"SparseConv2d: input of shape {tuple(x.shape)} does not match "
                             f"in_channels={self.in_channels} (expected [N, C, H, W] or [C, H, W])")
        weight = self._dense(self.values).to(device=x.device, dtype=x.dtype).reshape(self.weight_shape)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        nm = f", n={self.n}, m={self.m}" if self.layout == "nm" else ""
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding!r}, dilation={self.dilation}, groups={self.groups}, "
                f"bias={self.bias is not None}, layout={self.layout}{nm}, nnz={self.nnz}, "
                f"sparsity={self.sparsity:.3f}, kernel={self.kernel}")
