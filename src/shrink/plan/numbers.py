"""Numbers as users write them (API.md): ``7B``, ``350M``, ``8GB``, ``8GiB``, ``1.5T``, ``4096``.

Decimal suffixes are powers of 1000 (``K``, ``M``, ``B``/``G``, ``T``, ``P``);
``B`` after a decimal suffix means bytes (``8GB`` = 8 x 10^9), so ``B`` alone
means billion (``7B`` = 7 x 10^9 parameters). Binary suffixes ``KiB``, ``MiB``,
``GiB``, ``TiB`` are powers of 1024. Rates may end in ``/s`` (``2TB/s``).

Parsing goes through Decimal so that ``6.7B`` is exactly 6,700,000,000.
Every error is a ValueError with one line naming what was being read.
"""
from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation, Overflow

_DECIMAL = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12, "P": 10**15}
_BINARY = {"KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40, "PI": 2**50}

_PATTERN = re.compile(
    r"""^\s*
    (?P<num>[+-]?(?:\d[\d_]*(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)
    \s*
    (?P<suffix>[A-Za-z]*)
    (?P<rate>\s*/\s*s(?:ec)?)?
    \s*$""",
    re.VERBOSE,
)

_LARGEST = Decimal(10) ** 30  # far beyond any model or device; stops "1e999999999" building a huge int
EXAMPLES = "write e.g. 7B, 350M, 8GB, 8GiB, 1.5T or a plain number"


def _multiplier(suffix: str, text: str, what: str) -> int:
    s = suffix.upper()
    if s in _DECIMAL:
        return _DECIMAL[s]
    if len(s) == 2 and s[1] == "B" and s[0] in "KMGTP":      # KB, MB, GB, TB, PB: bytes
        return _DECIMAL[s[0]]
    if s.endswith("B") and s[:-1] in _BINARY:                # KiB, MiB, GiB, TiB
        return _BINARY[s[:-1]]
    if s in _BINARY:                                         # Ki, Mi, Gi without the B
        return _BINARY[s]
    raise ValueError(f"{what}: {text!r} has an unknown suffix {suffix!r}; {EXAMPLES}")


def _parse_decimal(value: object, what: str, allow_rate: bool) -> Decimal:
    """The exact value of a number with an optional suffix; positive and finite."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float, Decimal)):
        raise ValueError(f"{what}: {value!r} is not a number; {EXAMPLES}")
    if isinstance(value, (int, Decimal)):
        exact = Decimal(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{what} must be a finite number, got {value!r}")
        exact = Decimal(repr(value))
    else:
        m = _PATTERN.match(value)
        if m is None:
            raise ValueError(f"{what}: {value!r} is not a number; {EXAMPLES}")
        if m.group("rate") and not allow_rate:
            raise ValueError(f"{what}: {value!r} is a rate (per second); a plain quantity is needed here")
        digits = m.group("num").replace("_", "")
        try:
            exact = Decimal(digits) * _multiplier(m.group("suffix"), value, what)
        except Overflow:
            raise ValueError(f"{what}: {value!r} is implausibly large (over 10^30)") from None
        except InvalidOperation:
            raise ValueError(f"{what}: {value!r} is not a number; {EXAMPLES}") from None
    if not exact.is_finite():
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    if exact <= 0:
        raise ValueError(f"{what} must be positive, got {value!r}")
    if exact > _LARGEST:
        raise ValueError(f"{what}: {value!r} is implausibly large (over 10^30)")
    return exact


def parse_count(value: object, what: str = "count") -> int:
    """A positive whole number: parameters, tokens, batch. ``7B`` -> 7_000_000_000."""
    exact = _parse_decimal(value, what, allow_rate=False)
    if exact != exact.to_integral_value():
        raise ValueError(f"{what} must be a whole number, got {value!r}")
    return int(exact)


def parse_bytes(value: object, what: str = "size") -> int:
    """A positive size in bytes: ``8GB`` -> 8 x 10^9, ``8GiB`` -> 8 x 2^30; fractions of a byte round."""
    exact = _parse_decimal(value, what, allow_rate=False)
    n = int(exact.to_integral_value())
    if n < 1:
        raise ValueError(f"{what} must be at least one byte, got {value!r}")
    return n


def parse_rate(value: object, what: str = "bandwidth") -> float:
    """A positive rate per second: ``2TB/s``, ``2039GB/s``, ``2e12`` -> bytes (or operations) per second."""
    rate = float(_parse_decimal(value, what, allow_rate=True))
    if rate <= 0:  # a positive Decimal too small for a float
        raise ValueError(f"{what} must be positive, got {value!r}")
    return rate


def format_bytes(n: float) -> str:
    """Short human form in decimal units (the seeds' GB = 10^9): 13476831232 -> '13.48 GB'."""
    for unit, scale in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"
