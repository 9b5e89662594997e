"""Argument checks shared by the calc modules.

Every message names the function and the argument, says what was expected
and shows what came: "kv_cache_bytes: context must be a positive integer, got 0".
"""
from __future__ import annotations

import math
import numbers as _numbers
import operator
from collections.abc import Sequence


def _is_number(value: object) -> bool:
    """A real number (int, float, Fraction, numpy scalars); not bool, not a numeric string."""
    return isinstance(value, _numbers.Real) and not isinstance(value, bool)


def number(fn: str, name: str, value: object) -> float:
    """Any finite real number."""
    if not _is_number(value) or not math.isfinite(float(value)):  # type: ignore[arg-type]
        raise ValueError(f"{fn}: {name} must be a finite number, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def positive(fn: str, name: str, value: object) -> float:
    """A finite number > 0."""
    if not _is_number(value) or not math.isfinite(float(value)) or float(value) <= 0:  # type: ignore[arg-type]
        raise ValueError(f"{fn}: {name} must be a positive finite number, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def non_negative(fn: str, name: str, value: object) -> float:
    """A finite number >= 0."""
    if not _is_number(value) or not math.isfinite(float(value)) or float(value) < 0:  # type: ignore[arg-type]
        raise ValueError(f"{fn}: {name} must be a non-negative finite number, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def positive_int(fn: str, name: str, value: object) -> int:
    """An integer >= 1 (bool refused; numpy integers accepted)."""
    if isinstance(value, bool):
        raise ValueError(f"{fn}: {name} must be a positive integer, got {value!r}")
    try:
        n = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{fn}: {name} must be a positive integer, got {value!r}") from None
    if n < 1:
        raise ValueError(f"{fn}: {name} must be a positive integer, got {value!r}")
    return n


def index(fn: str, name: str, value: object, size: int) -> int:
    """An integer in [0, size) (bool refused; numpy integers accepted)."""
    try:
        i = None if isinstance(value, bool) else operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        i = None
    if i is None or not 0 <= i < size:
        raise ValueError(f"{fn}: {name} must be an integer in [0, {size - 1}], got {value!r}")
    return i


def fraction(fn: str, name: str, value: object, *, low_open: bool = False,
             high_open: bool = True) -> float:
    """A number in [0, 1), or (0, 1) / [0, 1] / (0, 1] as the flags say."""
    if not _is_number(value) or not math.isfinite(float(value)):  # type: ignore[arg-type]
        ok = False
    else:
        v = float(value)  # type: ignore[arg-type]
        ok = (v > 0 if low_open else v >= 0) and (v < 1 if high_open else v <= 1)
    if not ok:
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ValueError(f"{fn}: {name} must lie in {lo}0, 1{hi}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def numbers(fn: str, name: str, values: object, *, min_len: int = 1) -> list[float]:
    """A sequence of finite numbers, at least `min_len` long."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"{fn}: {name} must be a sequence of numbers, got {values!r}")
    if len(values) < min_len:
        raise ValueError(f"{fn}: {name} must hold at least {min_len} value(s), got {len(values)}")
    out = []
    for i, v in enumerate(values):
        if not _is_number(v) or not math.isfinite(float(v)):
            raise ValueError(f"{fn}: {name}[{i}] must be a finite number, got {v!r}")
        out.append(float(v))
    return out


def choice(fn: str, name: str, value: object, options: Sequence[str]) -> str:
    if value not in options:
        raise ValueError(f"{fn}: {name} must be one of {', '.join(map(repr, options))}, got {value!r}")
    return value  # type: ignore[return-value]
