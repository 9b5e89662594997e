"""Batch-1 decode in llama.cpp of shrink's GGUF exports, beside shrink's own runtime and the
memory-bandwidth bound (issue 5).

Run: .venv/bin/python bench/bench_llama_cpp.py [--models tiny-gpt,llama374m] [--new 64] [--rounds 2]

For each model: GGUF files written by `shrink export` at F32, Q8_0, Q4_0 and Q4_K_M, run by
llama.cpp (llama-cpp-python) with greedy decoding of --new tokens after a 16-token prompt,
decode tokens/s excluding the prompt (llama.cpp's "tg"); shrink's fp32 model and its
int4 model (w4-rtn, bf16 activations, int4 lm_head: shrink's fastest path) decoded with
shrink.modules.greedy_decode. The bound: bytes read per token (every weight but the
embedding table, of which one row is read) / the machine's memory bandwidth (--bandwidth,
default 32 GB/s: DESIGN.md section 8's measured 30-34 GB/s on this machine), the same
arithmetic `shrink plan` does for a device. The 374M model is bench/llama374m.py (random
weights) with tiny-gpt's tokenizer padded to its 32000-token vocabulary. Every variant
runs once per round, round-robin, and the median over rounds is reported.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama374m  # noqa: E402

import shrink  # noqa: E402
from shrink.export.gguf import write_gguf  # noqa: E402
from shrink.export.verify import _quiet_stderr, heldout_ids  # noqa: E402
from shrink.models.io import load_tokenizer  # noqa: E402
from shrink.modules import QuantLinear, greedy_decode  # noqa: E402
from shrink.quant import QuantSpec  # noqa: E402

TYPES = ("F32", "Q8_0", "Q4_0", "Q4_K_M")


def llama_cpp_decode(path: Path, prompt: list[int], n_new: int, threads: int) -> float:
    from llama_cpp import Llama

    with _quiet_stderr():
        llm = Llama(model_path=str(path), n_ctx=len(prompt) + n_new + 8, n_threads=threads,
                    n_threads_batch=threads, verbose=False)
        try:
            llm.eval(prompt)
            t0 = time.perf_counter()
            for _ in range(n_new):
                tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                llm.eval([tok])
            return n_new / (time.perf_counter() - t0)
        finally:
            llm.close()


def shrink_decode(model, prompt: list[int], n_new: int, threads: int) -> float:
    res = greedy_decode(model, torch.tensor([prompt]), n_new, threads=threads)
    return (res.new_tokens - 1) / res.decode_s


def weight_bytes_per_token(path: Path) -> int:
    import gguf

    reader = gguf.GGUFReader(path)
    total = 0
    for t in reader.tensors:
        n = int(t.n_bytes)
        if t.name == "token_embd.weight":
            n //= int(t.shape[-1])  # one row per token
        total += n
    return total


def shrink_int4(model):
    m = shrink.compress(model, "w4-rtn", measure_speed=False).model
    m.lm_head = QuantLinear.from_linear(m.lm_head, QuantSpec.from_name("int4-g128"))
    return copy.deepcopy(m).to(torch.bfloat16)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="tiny-gpt,llama374m")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bandwidth", type=float, default=32e9)
    args = ap.parse_args()
    tok = load_tokenizer("tiny-gpt")
    prompt = heldout_ids(tok, 16)
    print(f"# machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; batch 1, prompt "
          f"{len(prompt)}, {args.new} new tokens, {args.threads} threads, median of {args.rounds} round-robin "
          f"rounds; bound at {args.bandwidth / 1e9:.0f} GB/s")
    with tempfile.TemporaryDirectory() as td:
        for name in args.models.split(","):
            model = shrink.load("tiny-gpt") if name == "tiny-gpt" else llama374m.build()
            model.generation_config.eos_token_id = None
            variants: dict[str, tuple] = {}
            for t in TYPES:
                path = Path(td) / f"{name}-{t}.gguf"
                t0 = time.perf_counter()
                write_gguf(model, tok, path, t)
                print(f"# {name} {t}: written in {time.perf_counter() - t0:.1f} s, {path.stat().st_size / 1e6:.1f} MB",
                      flush=True)
                variants[f"llama.cpp {t}"] = ("gguf", path, weight_bytes_per_token(path))
            variants["shrink fp32"] = ("torch", model, None)
            variants["shrink int4 (w4-rtn, bf16 act, int4 head)"] = ("torch", shrink_int4(model), None)
            speeds: dict[str, list[float]] = {k: [] for k in variants}
            for _ in range(args.rounds):
                for label, (kind, obj, _) in variants.items():
                    fn = llama_cpp_decode if kind == "gguf" else shrink_decode
                    speeds[label].append(fn(obj, prompt, args.new, args.threads))
            params = sum(p.numel() for p in model.parameters())
            print(f"\n### {name} ({params / 1e6:.1f}M parameters)\n")
            print("| runtime, format | decode tok/s | vs shrink fp32 | bytes read per token | bandwidth bound tok/s |")
            print("| --- | --- | --- | --- | --- |")
            base = statistics.median(speeds["shrink fp32"])
            for label, (kind, obj, nbytes) in variants.items():
                s = statistics.median(speeds[label])
                bound = f"{args.bandwidth / nbytes:.0f}" if nbytes else "-"
                per = f"{nbytes / 1e6:.1f} MB" if nbytes else "-"
                print(f"| {label} | {s:.1f} | {s / base:.2f}x | {per} | {bound} |")


if __name__ == "__main__":
    main()
