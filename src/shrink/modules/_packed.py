"""The packed-weight storage that QuantLinear and QuantConv2d share.

A packed layer keeps a QTensor's parts as persistent buffers — `codes`
(bit-packed uint8, or raw 16/32-bit patterns), `scales`, `zeros` — and its
spec as a typed attribute (the spec is not in the state_dict). These helpers
build placeholder buffers for a shell that `load_state_dict` will fill, turn
the buffers back into a QTensor, and refuse a state_dict whose buffers have
other dtypes (casting codes or scales would change the quantized values).
"""
from __future__ import annotations

import torch

from shrink.formats import packed_nbytes
from shrink.quant import QTensor, QuantSpec
from shrink.quant.blocks import layout_for

STORED = ("codes", "scales", "zeros")


def placeholder_storage(shape: torch.Size, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(codes, scales, zeros) with the dtypes and shapes a QTensor of `shape` under `spec` stores."""
    shape = torch.Size(shape)
    lay = layout_for(shape, spec)
    grid = spec.grid()
    numel = shape.numel()
    if grid.bits <= 8:
        codes = torch.zeros(packed_nbytes(numel, grid.bits), dtype=torch.uint8)
    else:
        codes = torch.zeros(numel, dtype=grid.code_dtype)
    scales = torch.ones(lay.param_shape, dtype=spec.scale_dtype) if spec.has_scale else None
    zeros = torch.zeros(lay.param_shape, dtype=spec.scale_dtype) if spec.has_zero_point else None
    return codes, scales, zeros


def stored_qtensor(module, shape: torch.Size, *, cpu: bool = False) -> QTensor:
    """The module's codes/scales/zeros buffers as a QTensor of `shape` (sharing them,
    or CPU copies with cpu=True: unpacking runs on the CPU, shrink.formats packs with numpy)."""
    move = (lambda t: None if t is None else t.cpu()) if cpu else (lambda t: t)  # noqa: E731
    return QTensor(data=move(module.codes), shape=torch.Size(shape), dtype=module.weight_dtype,
                   spec=module.spec, grid=module._grid, scale=move(module.scales), zero_point=move(module.zeros))


def stored_dtype_errors(module, state_dict: dict, prefix: str) -> list[str]:
    """One message per stored buffer whose dtype in `state_dict` differs from the module's."""
    errors = []
    for name in STORED:
        mine, theirs = module._buffers.get(name), state_dict.get(prefix + name)
        if mine is not None and isinstance(theirs, torch.Tensor) and theirs.dtype != mine.dtype:
            errors.append(
                f"{prefix}{name} is stored as {theirs.dtype} but this {type(module).__name__} keeps {mine.dtype} "
                f"(spec {module.spec}); casting would change the quantized values - build the module with a "
                "matching spec (e.g. scale_dtype)"
            )
    return errors


def format_name(spec: QuantSpec) -> str:
    """'int4 asymmetric per group of 128', 'int8 per channel', 'nf4 per tensor'..."""
    if spec.format != "int":
        name = spec.format
    else:
        name = f"int{spec.bits}" + ("" if spec.symmetric else " asymmetric")
    if spec.granularity == "group":
        return f"{name} per group of {spec.group_size}"
    return f"{name} per {spec.granularity}"
