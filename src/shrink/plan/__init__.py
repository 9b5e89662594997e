"""Deployment arithmetic: model architectures, devices, and the numbers users type."""
from .arch import Arch, LinearShape, from_hf_config
from .devices import DEVICES, Device, custom_device, get_device
from .numbers import parse_bytes, parse_count, parse_rate
from .presets import PRESETS, get_preset, is_preset

__all__ = [
    "Arch", "LinearShape", "from_hf_config", "PRESETS", "get_preset", "is_preset",
    "Device", "DEVICES", "get_device", "custom_device",
    "parse_count", "parse_bytes", "parse_rate",
]
