"""Swap a submodule for another, by qualified name, and swap it back.

These functions change the model they are given — that is their job. Callers
that must keep the user's model intact (shrink.compress) deep-copy it first.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import nn


@dataclass(frozen=True)
class Swap:
    """One replacement: `old` was at `name` and `new` took its place."""

    name: str
    old: nn.Module = field(repr=False)
    new: nn.Module = field(repr=False)


def get_module(model: nn.Module, qualified_name: str) -> nn.Module:
    """The submodule at a dotted name ("model.layers.3.mlp"; "" is the model)."""
    try:
        return model.get_submodule(qualified_name)
    except AttributeError as e:
        raise KeyError(f"{type(model).__name__} has no submodule {qualified_name!r} ({e})") from None


def _parent(model: nn.Module, qualified_name: str) -> tuple[nn.Module, str]:
    if not isinstance(qualified_name, str) or not qualified_name:
        raise ValueError("replace_module: the model itself cannot be replaced; name a submodule")
    parent_name, _, child = qualified_name.rpartition(".")
    parent = get_module(model, parent_name)
    # _modules holds the children by name, ModuleList/Sequential indices ("3") included.
    if child not in parent._modules or parent._modules[child] is None:
        raise KeyError(
            f"{qualified_name!r}: {type(parent).__name__} at {parent_name or '<model>'!r} "
            f"has no child module {child!r}"
        )
    return parent, child


def replace_module(model: nn.Module, qualified_name: str, new_module: nn.Module) -> Swap:
    """Put `new_module` at `qualified_name` and return the record needed to undo it.

    Works for attributes and for ModuleList/Sequential/ModuleDict entries alike.
    A module shared under several names is replaced under this name only.
    """
    if not isinstance(new_module, nn.Module):
        raise TypeError(f"replace_module({qualified_name!r}): new_module must be an nn.Module, "
                        f"got {type(new_module).__name__}")
    parent, child = _parent(model, qualified_name)
    old = parent._modules[child]
    # setattr registers through nn.Module.__setattr__, the same path ModuleList.__setitem__ takes.
    setattr(parent, child, new_module)
    return Swap(qualified_name, old, new_module)


def undo(model: nn.Module, swaps: Swap | Iterable[Swap]) -> None:
    """Put the old modules back, latest swap first.

    Checks before changing anything that each name still holds the module its
    swap installed, so a model is never left half restored.
    """
    swaps = [swaps] if isinstance(swaps, Swap) else list(swaps)
    current: dict[str, nn.Module] = {}
    for s in swaps:  # replay forward to know what each name should hold now
        expected = current.get(s.name, s.old)
        if expected is not s.old:
            raise ValueError(f"undo: swaps for {s.name!r} are not a chain (old module of a later swap "
                             "is not the new module of the earlier one)")
        current[s.name] = s.new
    for name, module in current.items():
        parent, child = _parent(model, name)
        if parent._modules[child] is not module:
            raise ValueError(f"undo: {name!r} no longer holds the module its swap installed; "
                             "it was replaced again since")
    for s in reversed(swaps):
        parent, child = _parent(model, s.name)
        setattr(parent, child, s.old)
