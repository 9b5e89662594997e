"""Conv2d geometry shared by the compressed conv modules (QuantConv2d, SparseConv2d): the
arguments nn.Conv2d takes, validated with errors that name the module type."""
from __future__ import annotations

from torch import nn


def set_conv_geometry(mod: nn.Module, in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                      padding_mode) -> None:
    """Check and set in/out_channels, groups, kernel_size, stride, dilation, padding, padding_mode
    on `mod` as nn.Conv2d holds them (pairs; padding may be 'same' or 'valid')."""
    owner = type(mod).__name__
    for name, v in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{owner}: {name} must be a positive integer, got {v!r}")
    if in_channels % groups or out_channels % groups:
        raise ValueError(f"{owner}: in_channels={in_channels} and out_channels={out_channels} "
                         f"must both be divisible by groups={groups}")
    if padding_mode != "zeros":
        raise ValueError(f"{owner}: padding_mode {padding_mode!r} is not supported, only 'zeros' "
                         "(other modes pad the input before the conv; leave such a layer uncompressed)")
    mod.in_channels, mod.out_channels, mod.groups = in_channels, out_channels, groups
    mod.kernel_size = conv_pair(owner, kernel_size, "kernel_size", minimum=1)
    mod.stride = conv_pair(owner, stride, "stride", minimum=1)
    mod.dilation = conv_pair(owner, dilation, "dilation", minimum=1)
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(f"{owner}: padding must be 'same', 'valid' or integers, got {padding!r}")
        if padding == "same" and mod.stride != (1, 1):
            raise ValueError(f"{owner}: padding='same' needs stride 1, got stride={mod.stride}")
        mod.padding = padding
    else:
        mod.padding = conv_pair(owner, padding, "padding", minimum=0)
    mod.padding_mode = padding_mode


def conv_pair(owner: str, v, name: str, minimum: int) -> tuple[int, int]:
    pair = (v, v) if isinstance(v, int) and not isinstance(v, bool) else tuple(v) if isinstance(v, (tuple, list)) else None
    if pair is None or len(pair) != 2 or any(isinstance(p, bool) or not isinstance(p, int) or p < minimum for p in pair):
        raise ValueError(f"{owner}: {name} must be an integer >= {minimum} or a pair of them, got {v!r}")
    return pair
