"""Deployment arithmetic: model architectures, devices, and the numbers users type.

The package is callable: `shrink.plan(model, device=..., context=...)` builds a
Plan (see planner.build_plan), as API.md promises, while `shrink.plan.Arch`,
`shrink.plan.get_device` and friends stay importable from it.
"""
import sys as _sys
import types as _types
from .arch import Arch, LinearShape, from_hf_config
from .devices import DEVICES, Device, custom_device, get_device
from .numbers import parse_bytes, parse_count, parse_rate
from .presets import PRESETS, get_preset, is_preset

__all__ = [
    "Arch", "LinearShape", "from_hf_config", "PRESETS", "get_preset", "is_preset",
    "Device", "DEVICES", "get_device", "custom_device",
    "parse_count", "parse_bytes", "parse_rate",
]


class _CallablePackage(_types.ModuleType):
    def __call__(self, model=None, **kwargs):
        from .planner import build_plan

        return build_plan(model, **kwargs)


_sys.modules[__name__].__class__ = _CallablePackage
