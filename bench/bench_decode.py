"""Batch-1 greedy decode speed of the 374M Llama (bench/llama374m.py): fp32, bf16, shrink int4.

Run: .venv/bin/python bench/bench_decode.py [--new 64] [--prompt 16] [--repeat 3] [--threads 1,2]

The int4 model is `shrink.compress(model, "w4-rtn")` (int4-g128 RTN on every block
linear; lm_head stays fp32, as compress leaves heads alone); the variants with an
int8 (per channel) or int4-g128 lm_head replace it with QuantLinear.from_linear.
"bf16 act" variants run the whole model in bf16 (model.to(torch.bfloat16); QuantLinear
keeps its codes and scales, and skips its casts since its input is already bf16).

Each variant runs twice per round: greedy_decode(runtime="transformers") (the model's own
forward with a DynamicCache) and runtime="stepper" (shrink.modules.llama_stepper: the same
arithmetic with a preallocated cache, precomputed rotary tables and fused q/k/v and gate/up
kernel calls); "same tokens" says whether both produced the same 64 tokens. With
--compiled the int4 variants also run runtime="compiled" (the stepper's one-token steps
compiled by torch.compile, shrink.modules.llama_compiled; compiled once per variant in
the warm-up, which is reported and not counted), and "same tokens" covers it too.

Speeds are decode tokens/s after the prompt (prompt processing excluded, as
llama.cpp's "tg"), measured with shrink.modules.greedy_decode, and with
transformers' generate(do_sample=False) end to end (prompt included) for a few
variants. Every (variant, threads) pair runs once per round, round-robin, and the
median over rounds is reported, so that load from other processes hits all alike.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama374m  # noqa: E402

import shrink  # noqa: E402
from shrink.modules import QuantLinear, greedy_decode  # noqa: E402
from shrink.modules.decode import intra_op_threads  # noqa: E402
from shrink.quant import QuantSpec  # noqa: E402


def variants(with_fp: bool) -> dict[str, torch.nn.Module]:
    model = llama374m.build()
    model.generation_config.eos_token_id = None  # random weights: never stop early
    t = time.perf_counter()
    int4 = shrink.compress(model, "w4-rtn").model
    print(f"# shrink.compress(model, 'w4-rtn'): {time.perf_counter() - t:.0f} s, "
          f"{sum(isinstance(m, QuantLinear) for m in int4.modules())} QuantLinear layers", flush=True)

    def head(m, spec):
        m = copy.deepcopy(m)
        m.lm_head = QuantLinear.from_linear(m.lm_head, spec)
        return m

    out = {}
    if with_fp:
        out["fp32"] = model
        out["bf16"] = copy.deepcopy(model).to(torch.bfloat16)
    out["int4, lm_head fp32"] = int4
    out["int4, lm_head int8"] = head(int4, QuantSpec(bits=8))
    out["int4, lm_head int4"] = head(int4, QuantSpec.from_name("int4-g128"))
    out["int4 bf16 act, lm_head bf16"] = copy.deepcopy(int4).to(torch.bfloat16)
    out["int4 bf16 act, lm_head int4"] = copy.deepcopy(out["int4, lm_head int4"]).to(torch.bfloat16)
    return out


def generate_tps(model, ids, new: int, threads: int) -> float:
    with intra_op_threads(threads), torch.inference_mode():
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=new, do_sample=False, use_cache=True, pad_token_id=0)
        return new / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3, help="round-robin rounds (median reported)")
    ap.add_argument("--threads", default="1,2", help="comma-separated intra-op thread counts")
    ap.add_argument("--no-fp", action="store_true", help="skip the fp32 and bf16 baselines")
    ap.add_argument("--compiled", action="store_true", help="also runtime='compiled' for the int4 variants")
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    models = variants(not args.no_fp)
    ids = torch.randint(0, 32000, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    gen_names = [n for n in ("fp32", "int4, lm_head fp32", "int4, lm_head int4") if n in models]
    runs = {n: ("transformers", "stepper") + (("compiled",) if args.compiled and n.startswith("int4") else ())
            for n in models}
    for name, m in models.items():  # warm-up: first calls allocate and pack (and compile)
        for rt in runs[name]:
            t0 = time.perf_counter()
            greedy_decode(m, ids, 4, threads=threads[0], runtime=rt)
            if rt == "compiled":
                print(f"# {name}: first compiled decode (compiling) {time.perf_counter() - t0:.0f} s", flush=True)
    tps = {(n, t, rt): [] for n in models for t in threads for rt in runs[n]}
    gen = {(n, t): [] for n in gen_names for t in threads}
    ref_tokens, agree, same = {}, {}, {}
    loads = []
    for _ in range(args.repeat):
        for t in threads:
            for name, m in models.items():
                for rt in runs[name]:
                    res = greedy_decode(m, ids, args.new, threads=t, runtime=rt)
                    tps[(name, t, rt)].append(res.tokens_per_s)
                    ref_tokens.setdefault((name, rt), res.tokens)
                    agree[(name, rt)] = torch.equal(ref_tokens[(name, rt)], res.tokens)
                same[name] = all(torch.equal(ref_tokens[(name, "transformers")], ref_tokens[(name, rt)])
                                 for rt in runs[name])
            for name in gen_names:
                gen[(name, t)].append(generate_tps(models[name], ids, args.new, t))
            loads.append(os.getloadavg()[0])

    print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
          f"prompt {args.prompt} tokens, {args.new} new, batch 1, median of {args.repeat} round-robin rounds; "
          f"load average (1 min) during the rounds {min(loads):.1f}-{max(loads):.1f}")
    base = {t: statistics.median(tps[("fp32", t, "transformers")]) for t in threads} if "fp32" in models else None
    print("| model | threads | decode tok/s, transformers forward | decode tok/s, LlamaStepper | stepper speed-up "
          "| decode tok/s, compiled | compiled speed-up | stepper vs fp32 (transformers) | same tokens "
          "| generate() tok/s, prompt included |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for t in threads:
        for name in models:
            v, w = (statistics.median(tps[(name, t, rt)]) for rt in ("transformers", "stepper"))
            c = statistics.median(tps[(name, t, "compiled")]) if "compiled" in runs[name] else None
            cs = (f"{c:.1f}", f"{c / v:.2f}x") if c else ("-", "-")
            ratio = f"{w / base[t]:.2f}x" if base else "-"
            g = f"{statistics.median(gen[(name, t)]):.1f}" if (name, t) in gen else "-"
            print(f"| {name} | {t} | {v:.1f} | {w:.1f} | {w / v:.2f}x | {cs[0]} | {cs[1]} | {ratio} | {same[name]} | {g} |")
    if not all(agree.values()):
        print("# warning: a variant produced different tokens in different rounds")


if __name__ == "__main__":
    main()
