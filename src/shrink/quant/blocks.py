"""The one reshaping every granularity shares.

A tensor is viewed as blocks [rows, groups, group_size]:
  tensor   [1, 1, N]
  channel  [C, 1, K]       (C = size of `axis`, K = the rest)
  group    [C, ceil(K/g), g]
A ragged last group is padded with NaN, which every statistic ignores and
which never reaches the stored codes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from shrink.quant.spec import QuantSpec


@dataclass(frozen=True)
class BlockLayout:
    shape: torch.Size      # the original tensor's shape
    axis: int              # normalised channel axis (0 for per-tensor)
    rows: int
    groups: int
    group_size: int
    kind: str = "tensor"   # the spec's granularity: decides the natural parameter shape

    @property
    def inner(self) -> int:
        """Elements per row before padding (K)."""
        return _prod(self.shape) // self.rows if self.rows else 0

    @property
    def padded(self) -> bool:
        return self.groups * self.group_size != self.inner

    @property
    def param_shape(self) -> tuple[int, ...]:
        """Natural shape of scales: () per tensor, (C,) per channel, (C, G) per group."""
        if self.kind == "tensor":
            return ()
        if self.kind == "channel":
            return (self.rows,)
        return (self.rows, self.groups)

    def to_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """[.., C, ..] -> [rows, groups, group_size] (a copy where padding is needed)."""
        flat = (x.reshape(1, -1) if self.axis == -1 else x.movedim(self.axis, 0).reshape(self.rows, -1))
        pad = self.groups * self.group_size - self.inner
        if pad:
            flat = torch.nn.functional.pad(flat, (0, pad), value=float("nan"))
        return flat.reshape(self.rows, self.groups, self.group_size)

    def from_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        """Inverse of to_blocks (drops padding)."""
        flat = blocks.reshape(self.rows, -1)[:, : self.inner]
        if self.axis == -1:
            return flat.reshape(self.shape)
        moved = list(self.shape)
        moved.insert(0, moved.pop(self.axis))
        return flat.reshape(moved).movedim(0, self.axis)

    def params_as_blocks(self, p: torch.Tensor, name: str) -> torch.Tensor:
        """A scale/zero-point tensor given by a user -> [rows, groups, 1]."""
        p = torch.as_tensor(p)
        if p.numel() == 1:
            return p.reshape(1, 1, 1).expand(self.rows, self.groups, 1)
        if p.numel() != self.rows * self.groups:
            raise ValueError(
                f"{name} has {p.numel()} values but the spec needs {self.rows * self.groups} "
                f"(shape {self.param_shape or '()'} for a tensor of shape {tuple(self.shape)})"
            )
        return p.reshape(self.rows, self.groups, 1)

    def blocks_to_params(self, p: torch.Tensor) -> torch.Tensor:
        return p.reshape(self.param_shape)


def layout_for(shape: torch.Size, spec: QuantSpec) -> BlockLayout:
    shape = torch.Size(shape)
    n = _prod(shape)
    if spec.granularity == "tensor" or not spec.has_scale:
        return BlockLayout(shape, -1, 1, 1, n)
    if len(shape) == 0:
        raise ValueError(f"QuantSpec.granularity={spec.granularity!r} needs a tensor with a channel axis; got a scalar")
    if not -len(shape) <= spec.axis < len(shape):
        raise ValueError(
            f"QuantSpec.axis={spec.axis} is out of range for a tensor of shape {tuple(shape)} "
            f"({len(shape)} dims)"
        )
    axis = spec.axis % len(shape)
    rows = shape[axis]
    inner = n // rows if rows else 0
    if spec.granularity == "channel":
        return BlockLayout(shape, axis, rows, 1, inner, "channel")
    g = spec.group_size
    groups = max(1, -(-inner // g))
    return BlockLayout(shape, axis, rows, groups, g, "group")


def _prod(shape) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out
