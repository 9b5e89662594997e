"""Proof that an exported artifact works in its real runtime.

The same held-out token ids go through the runtime and through PyTorch, and the two
sets of next-token logits are compared: relative RMS error, the largest absolute
difference, top-1 agreement, and greedy decoding from a prompt (how many generated
tokens agree before the first divergence). Two references are used:

- the *stored* weights (what the file holds, dequantized, in shrink's own PyTorch
  model): any disagreement here is the runtime's arithmetic or a conversion bug, and
  beyond the format's expected error the export fails;
- shrink's compressed model as it was before export: the price of the format's
  rounding, recorded (and the same as the first for lossless and carried exports).

Tolerances (`TOLERANCES`) are per kind of stored type: llama.cpp multiplies F32
weights in float32, F16/BF16 weights with activations rounded to 16 bits, and
quantized weights against activations quantized to 8 bits, so each gets its own bound.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

# kind -> (max relative RMS error of the logits, min top-1 agreement) against the stored weights.
# Measured over held-out tokens (docs/BENCHMARKS.md): tiny-gpt (trained) F32 6e-5, F16 1.4e-4,
# BF16 1e-3, Q8_0..Q4_K_M 3.5e-3..4e-3 with top-1 >= 0.988; a random-weight Llama (hidden 256)
# F32 7e-4, Q8_0 0.019, k-quants 0.036 (llama.cpp quantizes activations per 256 for those),
# top-1 >= 0.91. A wrong tensor layout gives errors of order 1.
TOLERANCES = {"F32": (2e-3, 0.99), "F16": (1e-2, 0.98), "quantized": (6e-2, 0.88)}


class VerificationError(ValueError):
    """The artifact loads but disagrees with shrink's model beyond the format's expected error."""


@dataclass
class Agreement:
    rel_rmse: float
    max_abs: float
    top1: float
    tokens: int

    def as_dict(self) -> dict:
        return {"rel_rmse": self.rel_rmse, "max_abs": self.max_abs, "top1_agreement": self.top1,
                "tokens": self.tokens}


def compare_logits(got: np.ndarray, ref: np.ndarray) -> Agreement:
    got64, ref64 = got.astype(np.float64), ref.astype(np.float64)
    den = float(np.sqrt(np.mean(ref64 ** 2)))
    err = float(np.sqrt(np.mean((got64 - ref64) ** 2)))
    return Agreement(rel_rmse=err / den if den else err, max_abs=float(np.max(np.abs(got64 - ref64))),
                     top1=float(np.mean(got.argmax(-1) == ref.argmax(-1))), tokens=int(ref.shape[0]))


def heldout_ids(tokenizer, n_tokens: int = 256, eval_texts=None) -> list[int]:
    """The first `n_tokens` token ids of held-out text (the standard library's held-out
    modules unless `eval_texts` is given)."""
    from shrink.data.calibration import token_stream
    from shrink.data.corpus import stdlib_corpus

    texts = eval_texts if eval_texts is not None else stdlib_corpus(max_train_chars=1, max_heldout_chars=200_000).heldout_texts
    ids = token_stream(tokenizer, list(texts))[:n_tokens].tolist()
    if len(ids) < 8:
        raise ValueError(f"the held-out text gives only {len(ids)} tokens; give a longer text to verify with")
    return ids


@torch.no_grad()
def torch_logits(model: nn.Module, ids: list[int]) -> np.ndarray:
    out = model(torch.tensor([ids]))
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits[0].to(torch.float32).numpy()


@torch.no_grad()
def torch_greedy(model: nn.Module, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(torch_logits(model, ids)[-1].argmax()))
    return ids[len(prompt):]


def matching_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def reference_from_state(model: nn.Module, state: dict[str, np.ndarray]) -> nn.Module:
    """A float32 copy of `model` whose weights are `state` (the stored, dequantized weights).
    A tied output that the file stores separately is untied first."""
    from shrink.export.dense import plain_copy

    ref = plain_copy(model)
    head = getattr(ref, "lm_head", None)
    if head is not None and "lm_head.weight" in state:
        head.weight = nn.Parameter(head.weight.detach().clone())  # untie from the embedding
    params = dict(ref.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for key, value in state.items():
            if key in params:
                params[key].copy_(torch.from_numpy(np.ascontiguousarray(value)).reshape(params[key].shape))
    return ref


@contextlib.contextmanager
def _quiet_stderr():
    """llama.cpp's C code prints to fd 2 even with verbose=False; keep the user's terminal clean."""
    try:
        fd = os.dup(2)
    except OSError:
        yield
        return
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(fd, 2)
            os.close(fd)


def llama_cpp_run(path, ids: list[int], prompt_len: int, n_gen: int, threads: int | None = None) -> dict:
    """Load a GGUF in llama.cpp (llama-cpp-python), score `ids`, and decode greedily from the
    first `prompt_len` ids; logits of every position, generated tokens, timings."""
    try:
        from llama_cpp import Llama
    except ImportError as e:
        raise ImportError("verifying a GGUF export needs llama.cpp's Python binding: pip install "
                          "'shrink[export]' (llama-cpp-python builds llama.cpp from source, ~10 minutes)") from e
    threads = threads or max(1, min(os.cpu_count() or 1, torch.get_num_threads()))
    with _quiet_stderr():
        t0 = time.perf_counter()
        llm = Llama(model_path=str(path), n_ctx=max(len(ids), prompt_len + n_gen) + 8, n_batch=512,
                    logits_all=True, n_threads=threads, n_threads_batch=threads, verbose=False, seed=0)
        load_s = time.perf_counter() - t0
        try:
            t0 = time.perf_counter()
            llm.eval(ids)
            prefill_s = time.perf_counter() - t0
            logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
            llm.reset()
            llm.eval(ids[:prompt_len])
            gen: list[int] = []
            t0 = time.perf_counter()
            for _ in range(n_gen):
                tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                gen.append(tok)
                llm.eval([tok])
            decode_s = time.perf_counter() - t0
        finally:
            llm.close()
    return {"logits": logits, "greedy": gen, "load_s": load_s,
            "prefill_tokens_per_s": len(ids) / prefill_s, "decode_tokens_per_s": n_gen / decode_s,
            "threads": threads}


def tolerance_kind(types: set[str]) -> str:
    if types <= {"F32"}:
        return "F32"
    if types <= {"F32", "F16", "BF16"}:
        return "F16"
    return "quantized"


def verify_gguf(path, model: nn.Module, stored_state: dict, tensor_types: set[str], ids: list[int], *,
                prompt_len: int = 32, n_gen: int = 32, strict: bool = True) -> dict:
    """Run the GGUF at `path` in llama.cpp and compare with (a) shrink's model holding the
    stored weights and (b) shrink's model as exported. Raises VerificationError when (a)
    is beyond the tolerance of the file's types (strict)."""
    run = llama_cpp_run(path, ids, prompt_len, n_gen)
    stored = reference_from_state(model, stored_state)
    ref_logits = torch_logits(stored, ids)
    stored_greedy = torch_greedy(stored, ids[:prompt_len], n_gen)
    model_logits = torch_logits(model, ids)
    model_greedy = torch_greedy(model, ids[:prompt_len], n_gen)
    kind = tolerance_kind(tensor_types)
    max_rel, min_top1 = TOLERANCES[kind]
    vs_stored = compare_logits(run["logits"], ref_logits)
    vs_model = compare_logits(run["logits"], model_logits)
    report = {
        "runtime": "llama.cpp (llama-cpp-python)",
        "tokens": len(ids),
        "vs_stored_weights": {**vs_stored.as_dict(),
                              "greedy_match": matching_prefix(run["greedy"], stored_greedy)},
        "vs_shrink_model": {**vs_model.as_dict(), "greedy_match": matching_prefix(run["greedy"], model_greedy)},
        "greedy": {"prompt_tokens": prompt_len, "generated": n_gen, "runtime": run["greedy"],
                   "shrink_model": model_greedy},
        "tolerance": {"kind": kind, "max_rel_rmse": max_rel, "min_top1_agreement": min_top1},
        "latency": {"load_s": run["load_s"], "prefill_tokens_per_s": run["prefill_tokens_per_s"],
                    "decode_tokens_per_s": run["decode_tokens_per_s"], "threads": run["threads"]},
    }
    report["passed"] = vs_stored.rel_rmse <= max_rel and vs_stored.top1 >= min_top1
    if strict and not report["passed"]:
        raise VerificationError(
            f"{path}: llama.cpp disagrees with the weights the file stores: logits relative RMS error "
            f"{vs_stored.rel_rmse:.3g} (allowed {max_rel:g}), top-1 agreement {vs_stored.top1:.3f} (needed "
            f"{min_top1:g}) over {len(ids)} held-out tokens. The file is kept for inspection; this is a bug in "
            "the export, please report it")
    return report
