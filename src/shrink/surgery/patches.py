"""A Conv2d's inputs as the rows a Linear would see (im2col).

A conv is a Linear applied to every patch of its input: with W the
[out, in/groups*kh*kw] matrix of `Target.weight_view()` and P the patches,
conv(x) without bias is P @ W.T, one row per (image, output position). So
the GPTQ/SparseGPT Hessian of a conv is H = 2/n sum p p^T over its patches:
feed `conv_patches(x, conv)` to `shrink.observe.HessianObserver`.

Columns come in (channel, kh, kw) order, weight_view()'s order; rows in
(image, out_row, out_col) order.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def conv_patches(x: torch.Tensor, conv: nn.Conv2d, group: int | None = None) -> torch.Tensor:
    """The patches conv reads from x: [N * L, in_channels/groups * kh * kw] in x's dtype
    (L = out_h * out_w), such that conv(x) - bias == (patches @ weight_view().T)
    reshaped to [N, out_h, out_w, out] and permuted to [N, out, out_h, out_w].

    x is [N, C, H, W] or unbatched [C, H, W]. Stride, padding (integers,
    'valid' or 'same'), dilation and padding_mode (zeros, reflect, replicate,
    circular) are honoured.

    groups > 1: each group of out_channels/groups filters reads its own
    in_channels/groups input channels, so no single set of patches (nor one
    Hessian) serves the whole weight. Pass `group=g` for the patches of
    group g, which feed rows g*out/groups .. (g+1)*out/groups - 1 of
    weight_view(); without it a grouped conv raises ValueError.
    """
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"conv_patches expects an nn.Conv2d, got {type(conv).__name__}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        what = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"conv_patches: input must be a floating-point tensor, got {what}")
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[1] != conv.in_channels:
        raise ValueError(f"conv_patches: input of shape {tuple(x.shape)} does not match in_channels="
                         f"{conv.in_channels} (expected [N, C, H, W] or [C, H, W])")
    x = _select_group(x, conv, group)
    x, padding = _pad(x, conv)
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride)
    # [N, C*kh*kw, L] -> [N, L, C*kh*kw] -> [N*L, C*kh*kw]
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _select_group(x: torch.Tensor, conv: nn.Conv2d, group: int | None) -> torch.Tensor:
    if conv.groups == 1:
        if group not in (None, 0):
            raise ValueError(f"conv_patches: group={group!r} given but the conv has groups=1")
        return x
    if group is None:
        raise ValueError(
            f"conv_patches: the conv has groups={conv.groups}; each group of filters reads its own input channels, "
            "so pass group=g (0 <= g < groups) for the patches feeding rows "
            f"g*{conv.out_channels // conv.groups}..(g+1)*{conv.out_channels // conv.groups}-1 of weight_view()"
        )
    if isinstance(group, bool) or not isinstance(group, int) or not 0 <= group < conv.groups:
        raise ValueError(f"conv_patches: group must be an integer in [0, {conv.groups}), got {group!r}")
    per = conv.in_channels // conv.groups
    return x[:, group * per:(group + 1) * per]


def _pad(x: torch.Tensor, conv: nn.Conv2d) -> tuple[torch.Tensor, tuple[int, int]]:
    """x padded as conv pads it, and the zero padding F.unfold should add on top."""
    if conv.padding == "valid":
        return x, (0, 0)
    if conv.padding_mode == "zeros" and not isinstance(conv.padding, str):
        return x, tuple(conv.padding)
    pads = []  # F.pad order: (left, right, top, bottom)
    for dim in (1, 0):
        if conv.padding == "same":
            # total dilation*(k-1), the odd one out on the right/bottom (as F.conv2d and nn.Conv2d do)
            total = conv.dilation[dim] * (conv.kernel_size[dim] - 1)
            pads += [total // 2, total - total // 2]
        else:
            pads += [conv.padding[dim]] * 2
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    return F.pad(x, pads, mode=mode), (0, 0)
