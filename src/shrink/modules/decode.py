"""Greedy decoding with a KV cache: a lean loop for batch-1 CPU speed.

transformers' `generate` spends a share of every step on machinery a plain
greedy decode does not need (logits processors, stopping criteria, input
preparation, the full-vocabulary logits of every prompt position). This loop
calls the model once per token with the cache, the cache position and
`logits_to_keep=1`, and takes the argmax: the same tokens as
`generate(do_sample=False)`, timed, prefill apart from decode.

`threads` sets torch's intra-op thread count for the call only (restored after):
on a small shared CPU a batch-1 decode is a chain of ~10-100 us kernels, and
each one that splits over 2 threads waits at a barrier for the slower thread;
when another process holds a core that wait is a scheduler time slice, and the
decode slows several-fold. One thread avoids it at the price of one core's
memory bandwidth (docs/BENCHMARKS.md has the numbers).

torch's thread count is process-wide: when several threads decode with `threads` at
once, the count is set by the first to enter and restored by the last to leave (the
ones between run with the count in force), so the process never ends with another
block's setting.
"""
from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass

import torch
from torch import nn


RUNTIMES = ("auto", "stepper", "compiled", "transformers")


@dataclass(frozen=True)
class DecodeResult:
    """tokens: [batch, prompt + new] (the prompt included). prefill_s: the prompt's
    forward, which yields the first new token; decode_s: the other new_tokens - 1 steps."""
    tokens: torch.Tensor
    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float
    runtime: str = "transformers"   # "stepper" (LlamaStepper), "compiled" (its compiled step) or "transformers"
    runtime_note: str | None = None  # why the stepper was not used, when it was not

    @property
    def tokens_per_s(self) -> float:
        """Decode speed, prompt processing excluded (as llama.cpp's "tg" figure)."""
        steps = self.new_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else float("nan")


_THREADS_LOCK = threading.Lock()
_threads_state = {"active": 0, "before": None}   # blocks open now; the count to restore when the last leaves


@contextlib.contextmanager
def intra_op_threads(threads: int | None):
    """torch.set_num_threads(threads) inside the block, the previous count restored after (None: unchanged).
    Blocks open in several threads at once share one setting: the first sets it, the last restores it."""
    if threads is None:
        yield
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
    with _THREADS_LOCK:
        if _threads_state["active"] == 0:
            _threads_state["before"] = torch.get_num_threads()
            torch.set_num_threads(threads)
        _threads_state["active"] += 1
    try:
        yield
    finally:
        with _THREADS_LOCK:
            _threads_state["active"] -= 1
            if _threads_state["active"] == 0:
                torch.set_num_threads(_threads_state["before"])


def greedy_decode(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *,
                  eos_token_id: int | None = None, threads: int | None = None,
                  runtime: str = "auto") -> DecodeResult:
    """Greedy decode `max_new_tokens` after `input_ids` ([batch, prompt] token ids, no
    padding) with a transformers causal LM, under inference_mode. Stops early when every
    sequence has just produced `eos_token_id`.

    runtime: "auto" runs shrink's LlamaStepper (llama_stepper.py: the same arithmetic with
    less per-token overhead) when the model is a Llama it can take, else the model's own
    forward with a DynamicCache ("transformers"); "stepper" insists on the stepper (a
    ValueError says why a model cannot take it); "compiled" is the stepper with its one-token
    steps compiled by torch.compile (llama_compiled.py: the first decode step of a new shape
    compiles, tens of seconds; values equal to float rounding, not bit for bit; a ValueError
    says why a model cannot take it); "transformers" never uses it. The result
    says which ran (`runtime`) and why not the stepper (`runtime_note`)."""
    from shrink.modules.llama_stepper import LlamaStepper, why_not

    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError("greedy_decode: input_ids must be a [batch, prompt] tensor with at least one token")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"greedy_decode: max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if runtime not in RUNTIMES:
        raise ValueError(f"greedy_decode: runtime must be one of {', '.join(map(repr, RUNTIMES))}, got {runtime!r}")
    note = "runtime='transformers' was asked for" if runtime == "transformers" else why_not(model)
    if runtime in ("stepper", "compiled") and note is not None:
        raise ValueError(f"greedy_decode: the stepper cannot run this model: {note}")
    if note is None:
        step = LlamaStepper(model, int(input_ids.shape[0]), int(input_ids.shape[1]) + max_new_tokens,
                            compile=runtime == "compiled").step
    else:
        step = _transformers_step(model, input_ids.device)
    tokens, prefill_s, decode_s = _greedy_loop(step, input_ids, max_new_tokens, eos_token_id, threads)
    n_prompt = int(input_ids.shape[1])
    return DecodeResult(tokens=tokens, prompt_tokens=n_prompt, new_tokens=int(tokens.shape[1]) - n_prompt,
                        prefill_s=prefill_s, decode_s=decode_s,
                        runtime=("compiled" if runtime == "compiled" else "stepper") if note is None else "transformers",
                        runtime_note=note)


def _transformers_step(model: nn.Module, device: torch.device):
    """ids [batch, t] -> logits [batch, 1, vocab] of the last position: the model's own forward
    with a DynamicCache, the cache position and logits_to_keep=1."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    pos = [0]

    def step(ids: torch.Tensor) -> torch.Tensor:
        start, pos[0] = pos[0], pos[0] + ids.shape[1]
        return model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1,
                     cache_position=torch.arange(start, pos[0], device=device)).logits[:, -1:]

    return step


def _greedy_loop(step, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None,
                 threads: int | None) -> tuple[torch.Tensor, float, float]:
    """(tokens with the prompt, prefill seconds, decode seconds) of a greedy decode by `step`."""
    device = input_ids.device
    out_tokens = [input_ids]
    with intra_op_threads(threads), torch.inference_mode():
        t0 = time.perf_counter()
        tok = step(input_ids).argmax(-1)
        out_tokens.append(tok)
        sync_device(device)
        t1 = time.perf_counter()
        for _ in range(1, max_new_tokens):
            if eos_token_id is not None and bool((tok == eos_token_id).all()):
                break
            tok = step(tok).argmax(-1)
            out_tokens.append(tok)
        sync_device(device)  # a GPU runs behind the Python loop: wait for it before reading the clock
        t2 = time.perf_counter()
        tokens = torch.cat(out_tokens, dim=1)
    return tokens, t1 - t0, t2 - t1


def sync_device(device: torch.device) -> None:
    """Wait for a GPU's queued work (a no-op on the CPU): before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
