"""Shared by the reader fuzzers: mutations of real files as hypothesis strategies, the
bounded settings, and the one assertion every reader must satisfy.

A reader given any bytes either succeeds or raises ValueError / FileNotFoundError (exit 2
in the CLI, one line naming the file); anything else is a crash. Each fuzzer runs
SHRINK_FUZZ_EXAMPLES examples (default: a bounded, derandomized run for the suite; set the
variable to run longer, with fresh random examples). A crash found is kept under
tests/fuzz/corpus/<reader>/ and replayed by test_fuzz_corpus.py.
"""
from __future__ import annotations

import json
import os
import signal
import struct
from contextlib import contextmanager
from pathlib import Path

from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st

CORPUS = Path(__file__).parent / "corpus"
EXAMPLE_TIMEOUT_S = 30   # a reader that takes longer on a tiny file hangs


def fuzz_settings(default_examples: int):
    """Bounded (the suite) or longer and random (SHRINK_FUZZ_EXAMPLES=n)."""
    env = os.environ.get("SHRINK_FUZZ_EXAMPLES", "").strip()
    n = int(env) if env else default_examples
    return settings(max_examples=n, deadline=10_000, derandomize=not env, database=None,
                    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large], print_blob=True)


# ----------------------------------------------------------------------------- mutations

HUGE = (1 << 31, 1 << 32, 1 << 40, 1 << 62, (1 << 63) - 1, (1 << 64) - 1, 0xFFFF_FFFF, 0x7FFF_FFFF)


def _at(frac: float, n: int) -> int:
    return min(int(frac * n), max(n - 1, 0))


def mutate(data: bytes, ops: list) -> bytes:
    """Apply (op, args) mutations in turn; positions are fractions of the current length."""
    b = bytearray(data)
    for op, frac, arg in ops:
        n = len(b)
        if n == 0:
            b = bytearray(arg if isinstance(arg, bytes) else b"\0")
            continue
        i = _at(frac, n)
        if op == "truncate":
            del b[i:]
        elif op == "flip":
            b[i] ^= 1 << (arg % 8)
        elif op == "overwrite":
            b[i:i + len(arg)] = arg
        elif op == "insert":
            b[i:i] = arg
        elif op == "delete":
            del b[i:i + arg]
        elif op == "u64":
            b[i:i + 8] = struct.pack("<Q", arg)
        elif op == "u32":
            b[i:i + 4] = struct.pack("<I", arg & 0xFFFF_FFFF)
    return bytes(b)


def mutations(regions: list[tuple[float, float]] | None = None, max_ops: int = 3):
    """A list of 1..max_ops mutations; `regions` (fractions of the file) bias where they land
    (the header of a file whose data dominates its size)."""
    frac = st.floats(0, 1, exclude_max=True, allow_nan=False)
    if regions:
        frac = st.one_of(frac, *[st.floats(lo, hi, exclude_max=True, allow_nan=False) for lo, hi in regions])
    small = st.binary(min_size=1, max_size=16)
    op = st.one_of(
        st.tuples(st.just("truncate"), frac, st.none()),
        st.tuples(st.just("flip"), frac, st.integers(0, 7)),
        st.tuples(st.just("overwrite"), frac, small),
        st.tuples(st.just("insert"), frac, small),
        st.tuples(st.just("delete"), frac, st.integers(1, 64)),
        st.tuples(st.just("u64"), frac, st.sampled_from(HUGE)),
        st.tuples(st.just("u32"), frac, st.sampled_from(HUGE)),
    )
    return st.lists(op, min_size=1, max_size=max_ops)


# ----------------------------------------------------------------------------- the contract

@contextmanager
def time_limit(seconds: int):
    """Fail an example that hangs (SIGALRM; the main thread on POSIX)."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def hung(signum, frame):
        raise TimeoutError(f"the reader ran longer than {seconds} s on a small file: a hang")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def outcome(read, *args, names: str | None = None) -> str | None:
    """None if `read(*args)` succeeds, else its ValueError/FileNotFoundError message, which
    must be one line and contain `names` (the file); any other exception, or a library's
    raw ValueError subclass (UnicodeDecodeError, JSONDecodeError), propagates or fails."""
    try:
        with time_limit(EXAMPLE_TIMEOUT_S):
            read(*args)
    except (UnicodeError, json.JSONDecodeError):
        raise
    except (ValueError, FileNotFoundError) as e:
        msg = str(e)
        assert msg and "\n" not in msg.strip(), f"a refusal must be one line: {msg!r}"
        assert names is None or names in msg, f"the refusal does not name {names}: {msg!r}"
        _event("refused")
        return msg
    _event("loaded")
    return None


def _event(what: str) -> None:
    """Counted in --hypothesis-show-statistics; outside a hypothesis test, nothing."""
    try:
        event(what)
    except Exception:  # noqa: BLE001 - hypothesis refuses events outside a test it runs
        pass
