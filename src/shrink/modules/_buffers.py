"""Shared nn.Module plumbing for packed layers."""
from __future__ import annotations

import contextlib

from torch import nn


def restore_dtypes(module: nn.Module, kept: dict) -> None:
    """After nn.Module._apply: put back the dtype of buffers whose numerics depend on it
    (.half()/.to(dtype) would re-round scales and codes); a device move is kept."""
    for name, old in kept.items():
        new = module._buffers[name]
        if new is not None and new.dtype != old.dtype:
            module._buffers[name] = old.to(new.device)


def fixed_buffers(module: nn.Module, names) -> dict:
    return {n: module._buffers[n] for n in names if module._buffers.get(n) is not None}


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """model in eval mode inside the block. A model already in eval mode is not touched (no
    flag is written, so threads sharing a served model never see it change); one with modules
    in training mode is switched and each module's own flag restored after."""
    training = [m for m in model.modules() if m.training]
    if not training:
        yield model
        return
    model.eval()
    try:
        yield model
    finally:
        for m in training:
            m.training = True
