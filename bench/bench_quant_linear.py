"""QuantLinear latency at batch 1 against an fp32 nn.Linear, measured side by side.

Run: .venv/bin/python bench/bench_quant_linear.py [--quick] [--repeat N]
Prints a Markdown table; the issue's target is int4 QuantLinear (int4pack) at
least 5x faster than the fp32 nn.Linear at batch 1. The raw aten int4 kernel,
called on a ready bf16 input with no module around it, is timed too: the gap
between it and QuantLinear is the module's overhead (checks, casts, bias, reshapes).
Each thread count in --threads is a separate set of rounds.

The candidates are timed round-robin (one call of each per round, after a
warm-up), so that load from other processes hits them all alike; the median
over rounds is reported. The reference path (dequantize every forward) is
timed on fewer rounds: it is the slow fallback, here for scale.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from torch import nn

from shrink.modules import QuantLinear
from shrink.quant import QuantSpec, quantize

SHAPES = ((4096, 4096), (11008, 4096))  # [out_features, in_features]


def candidates(out_features: int, in_features: int) -> dict[str, tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    lin = nn.Linear(in_features, out_features, bias=False)
    x = torch.randn(1, in_features)
    w = lin.weight.detach()
    q4 = quantize(w, QuantSpec.from_name("int4-g128"))
    q8 = quantize(w, QuantSpec(bits=8))
    ql4 = QuantLinear.from_qtensor(q4)
    w4, s4, g4 = ql4._kernel_weight, ql4._kernel_scales, ql4._kernel_group
    op = torch.ops.aten._weight_int4pack_mm_for_cpu
    mods = {
        "fp32 nn.Linear": (lin, x),
        "bf16 nn.Linear (bf16 x)": (nn.Linear(in_features, out_features, bias=False).to(torch.bfloat16), x.bfloat16()),
        "QuantLinear int4-g128 (int4pack_cpu)": (ql4, x),
        "raw aten int4 kernel alone (bf16 x ready)": (lambda xb: op(xb, w4, g4, s4), x.bfloat16()),
        "QuantLinear int8 per channel (int8pack_cpu)": (QuantLinear.from_qtensor(q8), x),
        "QuantLinear int4-g128 (reference)": (QuantLinear.from_qtensor(q4, kernel="reference"), x),
    }
    assert mods["QuantLinear int4-g128 (int4pack_cpu)"][0].kernel == "int4pack_cpu"
    assert mods["QuantLinear int8 per channel (int8pack_cpu)"][0].kernel == "int8pack_cpu"
    return mods


def measure(mods, rounds: int, slow_rounds: int, warmup: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in mods}
    with torch.inference_mode():
        for _ in range(warmup):
            for m, x in mods.values():
                m(x)
        for r in range(rounds):
            for name, (m, x) in mods.items():
                if "reference" in name and r >= slow_rounds:
                    continue
                t = time.perf_counter()
                m(x)
                times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="1024x1024 only, fewer rounds")
    ap.add_argument("--repeat", type=int, default=200, help="rounds of timed calls (default 200)")
    ap.add_argument("--threads", default="2", help="comma-separated intra-op thread counts (default 2)")
    args = ap.parse_args()
    shapes = ((1024, 1024),) if args.quick else SHAPES
    rounds = 20 if args.quick else args.repeat
    rows, loads = [], []
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for out_f, in_f in shapes:
            t = measure(candidates(out_f, in_f), rounds, slow_rounds=min(rounds, 10), warmup=3)
            loads.append(os.getloadavg()[0])
            base = t["fp32 nn.Linear"]
            for name, sec in t.items():
                rows.append((f"{out_f}x{in_f}", threads, name, sec * 1e3, base / sec))

    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"batch 1, fp32 activations in and out "
          f"(the kernels cast to bf16 inside), median of {rounds} round-robin rounds, "
          f"load average (1 min) {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}\n")
    print("| weight [out x in] | threads | module | median ms | speed-up vs fp32 nn.Linear |")
    print("| --- | --- | --- | --- | --- |")
    for shape, threads, name, ms, ratio in rows:
        print(f"| {shape} | {threads} | {name} | {ms:.3f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
