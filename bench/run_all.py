"""Benchmarks of the numeric primitives, as ratios measured side by side in one run.

Run: make bench   (or .venv/bin/python bench/run_all.py [--quick])
Prints a Markdown table; docs/BENCHMARKS.md records a run with its command.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings

import torch

from shrink.formats import pack_bits, unpack_bits
from shrink.quant import QuantSpec, dequantize, quantize

warnings.filterwarnings("ignore", message=".*quantize_per.*deprecated.*")


def timed(fn, repeat: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller tensors, fewer repeats")
    args = ap.parse_args()
    n = 1024 if args.quick else 4096
    repeat = 3 if args.quick else 5
    torch.manual_seed(0)
    w = torch.randn(n, n)
    rows = []

    # int8 per-channel: shrink.quantize vs torch.quantize_per_channel (same codes)
    spec8 = QuantSpec(bits=8, full_range=True)
    qt = quantize(w, spec8)
    s64 = qt.scale.double()
    zeros = torch.zeros(n, dtype=torch.long)
    t_torch = timed(lambda: torch.quantize_per_channel(w, s64, zeros, 0, torch.qint8), repeat)
    t_ours = timed(lambda: quantize(w, spec8, scale=qt.scale), repeat)
    rows.append(("int8 per-channel quantize, given scales", f"torch.quantize_per_channel {t_torch*1e3:.1f} ms",
                 f"{t_ours*1e3:.1f} ms", t_ours / t_torch))

    t_minmax = timed(lambda: quantize(w, QuantSpec.from_name("int4-g128")), repeat)
    t_mse = timed(lambda: quantize(w, QuantSpec.from_name("int4-g128"), observer="mse"), 1)
    rows.append(("int4-g128 quantize: MSE observer vs min/max", f"minmax {t_minmax*1e3:.1f} ms",
                 f"mse {t_mse*1e3:.1f} ms", t_mse / t_minmax))

    q4 = quantize(w, QuantSpec.from_name("int4-g128"))
    t_deq = timed(lambda: dequantize(q4), repeat)
    t_copy = timed(lambda: w.clone(), repeat)
    rows.append(("int4-g128 dequantize vs fp32 copy", f"copy {t_copy*1e3:.1f} ms", f"{t_deq*1e3:.1f} ms", t_deq / t_copy))

    codes = torch.randint(0, 8, (n * n,), dtype=torch.uint8)
    t_p3 = timed(lambda: pack_bits(codes, 3), repeat)
    packed = pack_bits(codes, 3)
    t_u3 = timed(lambda: unpack_bits(packed, 3, codes.numel()), repeat)
    mb = codes.numel() / 1e6
    rows.append(("3-bit pack / unpack throughput", f"pack {mb/t_p3:.0f} Mcodes/s", f"unpack {mb/t_u3:.0f} Mcodes/s", t_u3 / t_p3))

    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, tensor [{n}, {n}] fp32\n")
    print("| what | baseline | shrink | ratio (shrink / baseline) |")
    print("| --- | --- | --- | --- |")
    for what, base, ours, ratio in rows:
        print(f"| {what} | {base} | {ours} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
