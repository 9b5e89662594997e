"""QuantLinear on a GPU: the CUDA int4/int8 kernels against bf16 and fp32 nn.Linear.

Run (on a machine with an NVIDIA GPU): python bench/bench_gpu.py [--repeat N]

For each weight shape and batch size, every candidate is timed side by side:
CUDA-graph-free eager calls, `--inner` calls back to back between two CUDA
events (so launch overhead counts, as it does in eager decoding), median over
`--repeat` rounds after a warm-up. Prints a Markdown table with each time as a
ratio to the bf16 nn.Linear of the same shape (the usual GPU baseline) and the
weight bytes each holds. Exits with a message when no GPU is present.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch
from torch import nn

from shrink.modules import QuantLinear
from shrink.quant import QuantSpec, quantize

SHAPES = ((4096, 4096), (11008, 4096))
BATCHES = (1, 16, 256)


def _time(fn, x, repeat: int, inner: int) -> float:
    """Median milliseconds of one call."""
    with torch.no_grad():
        for _ in range(3):
            fn(x)
        torch.cuda.synchronize()
        times = []
        for _ in range(repeat):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(inner):
                fn(x)
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / inner)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--inner", type=int, default=20)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gpu.py: no CUDA GPU here; run it on a machine with one")
    print(f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}; median of {args.repeat} rounds of "
          f"{args.inner} back-to-back calls; ratio = bf16 nn.Linear time / this time")
    print("| weight | batch | module | kernel | weight MiB | ms | speed vs bf16 |")
    print("|---|---|---|---|---|---|---|")
    for n, k in SHAPES:
        torch.manual_seed(0)
        lin = nn.Linear(k, n, bias=False)
        w = lin.weight.detach()
        mods = {
            "nn.Linear fp32": (lin.cuda(), torch.float32, "cuBLAS"),
            "nn.Linear bf16": (nn.Linear(k, n, bias=False).cuda().bfloat16().requires_grad_(False), torch.bfloat16,
                               "cuBLAS"),
            "QuantLinear int4-g128": (QuantLinear.from_qtensor(quantize(w, QuantSpec.from_name("int4-g128"))).cuda(),
                                      torch.bfloat16, None),
            "QuantLinear int8 per channel": (QuantLinear.from_qtensor(quantize(w, QuantSpec(bits=8))).cuda(),
                                             torch.bfloat16, None),
        }
        for m, _, _ in mods.values():
            m.requires_grad_(False)
        for batch in BATCHES:
            base = None
            rows = []
            for name, (m, dtype, kernel) in mods.items():
                x = torch.randn(batch, k, device="cuda", dtype=dtype)
                ms = _time(m, x, args.repeat, args.inner)
                if name == "nn.Linear bf16":
                    base = ms
                nbytes = (m.nbytes if isinstance(m, QuantLinear) else m.weight.numel() * m.weight.element_size())
                rows.append((name, kernel or m.kernel, nbytes / 2 ** 20, ms))
            for name, kernel, mib, ms in rows:
                print(f"| {n}x{k} | {batch} | {name} | {kernel} | {mib:.1f} | {ms:.4f} | {base / ms:.2f}x |")


if __name__ == "__main__":
    main()
