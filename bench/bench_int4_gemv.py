"""The CPU int4 kernel alone at batch 1 (M=1), on the 374M Llama's layer shapes.

    .venv/bin/python bench/bench_int4_gemv.py [--repeat 300]

Times torch.ops.aten._weight_int4pack_mm_for_cpu (group 128, bf16 activations) for each
shape at 1 and 2 threads, and a fused q/k/v (3072 x 1024) and gate/up (5632 x 1024)
beside their parts: how much of a decode step the kernel itself takes, and what fusing
the layers that share an input would save in the kernel.
"""
from __future__ import annotations

import argparse
import time

import torch

SHAPES = [(1024, 1024), (3072, 1024), (2816, 1024), (5632, 1024), (1024, 2816)]   # (out, in)


def packed(n: int, k: int, group: int = 128):
    w = torch.randint(0, 16, (n, k), dtype=torch.int32)
    return (torch.ops.aten._convert_weight_to_int4pack_for_cpu(w, 1),
            torch.randn(k // group, n, 2, dtype=torch.bfloat16))


def seconds(n: int, k: int, repeat: int) -> float:
    wp, sz = packed(n, k)
    x = torch.randn(1, k, dtype=torch.bfloat16)
    mm = torch.ops.aten._weight_int4pack_mm_for_cpu
    for _ in range(20):
        mm(x, wp, 128, sz)
    t = time.perf_counter()
    for _ in range(repeat):
        mm(x, wp, 128, sz)
    return (time.perf_counter() - t) / repeat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=300)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"# torch {torch.__version__}; M=1, int4 group 128; median-free mean of {args.repeat} calls")
    print("| threads | out x in | us per call | GB/s of int4 weight |")
    print("| --- | --- | --- | --- |")
    per = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for n, k in SHAPES:
            s = seconds(n, k, args.repeat)
            per[threads, n, k] = s
            print(f"| {threads} | {n} x {k} | {s * 1e6:.1f} | {n * k / 2 / s / 1e9:.2f} |", flush=True)
    for threads in (1, 2):
        a = per[threads, 1024, 1024]
        block = 4 * a + 2 * per[threads, 2816, 1024] + per[threads, 1024, 2816]
        fused = per[threads, 3072, 1024] + a + per[threads, 5632, 1024] + per[threads, 1024, 2816]
        print(f"threads {threads}: one Llama block's 7 matmuls {block * 1e6:.0f} us, with q/k/v and gate/up fused "
              f"{fused * 1e6:.0f} us; x24 blocks = {24 * block * 1e3:.1f} ms vs {24 * fused * 1e3:.1f} ms a token")


if __name__ == "__main__":
    main()
