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
EXAMPLE_MEMORY = 2 << 30   # nor does it need 2 GiB more address space


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


@contextmanager
def memory_limit(extra_bytes: int = EXAMPLE_MEMORY):
    """At most `extra_bytes` more address space for the block (RLIMIT_AS, where there is one):
    an allocation sized by a corrupt length fails the example with MemoryError instead of
    taking the machine's memory (the fuzzers once OOM-killed a run with 21 GB)."""
    try:
        import resource

        with open("/proc/self/statm") as f:
            used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    except (ImportError, OSError, ValueError):
        yield
        return
    cap = used + extra_bytes
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def outcome(read, *args, names: str | None = None) -> str | None:
    """None if `read(*args)` succeeds, else its ValueError/FileNotFoundError message, which
    must be one line and contain `names` (the file); any other exception, or a library's
    raw ValueError subclass (UnicodeDecodeError, JSONDecodeError), propagates or fails."""
    try:
        with time_limit(EXAMPLE_TIMEOUT_S), memory_limit():
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


# ----------------------------------------------------------------------------- the real files mutated

TEXTS = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.",
         "import os\nprint(os.path.join('a', 'b'))\n"]


def build_gguf(path: Path) -> Path:
    """A 1-block Llama with a 300-token BPE vocabulary, written by shrink's GGUF exporter (Q8_0)."""
    from tests_support import tiny_llama

    from shrink.export.gguf import write_gguf
    from shrink.models.tiny_gpt import train_tokenizer

    tok = train_tokenizer(TEXTS * 4, vocab_size=300)
    model = tiny_llama(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1)
    write_gguf(model, tok, path, "Q8_0")
    return path


def build_hf_dir(d: Path) -> Path:
    """A tiny Llama written by save_pretrained (config.json + model.safetensors), and its state
    dict pickled weights-only beside the directory (weights.bin)."""
    import torch
    from tests_support import tiny_llama

    model = tiny_llama(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1)
    model.save_pretrained(d)
    (d / "generation_config.json").unlink(missing_ok=True)
    torch.save(model.state_dict(), d.parent / "weights.bin")
    return d


def build_compressed_dir(d: Path) -> Path:
    """A tiny Llama compressed by shrink (int8 per channel and w4 g16 RTN), saved by save_compressed."""
    from tests_support import tiny_llama

    from shrink.models.compressed import save_compressed
    from shrink.recipe import compress

    model = tiny_llama(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1)
    recipe = [{"rtn": {"bits": 8, "group_size": None, "include": ["*.q_proj", "*.k_proj", "*.mlp.*"]}},
              {"rtn": {"bits": 4, "group_size": 16, "include": ["*.v_proj", "*.o_proj"]}}]
    return save_compressed(compress(model, recipe).model, d, base={"kind": "hf"})


def build_onnx(path: Path) -> Path:
    """A small classifier (Linear-ReLU-Linear) written by shrink's ONNX exporter."""
    import torch
    from torch import nn

    from shrink.export.onnx import export_onnx

    torch.manual_seed(0)
    export_onnx(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval(), path)
    return path
