"""SparseLinear latency and stored bytes against a dense fp32 nn.Linear, side by side.

Run: .venv/bin/python bench/bench_sparse.py [--quick] [--repeat N] [--shapes 1024x1024,4096x4096]
Prints two Markdown tables: forward speed as a ratio to the dense Linear (above 1 is
faster) at each sparsity and batch, and stored bytes as a ratio to the dense fp32 weight.

The weight is random normal, pruned at random to each sparsity (what magnitude pruning
of an unstructured weight looks like to a kernel); "nm" is 2:4 by magnitude and so
exists only at 50% sparsity (and 1:4 at 75%). All modules run fp32 under
torch.inference_mode(), as a deployed model does: bitmask and nm rebuild the dense
weight each call, csr runs torch.sparse.mm (layouts and kernels: shrink.modules.sparse_linear).

The candidates are timed round-robin (one call of each per round, after a warm-up), so
that load from other processes hits them all alike; the median over rounds is reported.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from torch import nn

from shrink.modules import SparseLinear

SPARSITIES = (0.5, 0.75, 0.9, 0.95, 0.99)
BATCHES = (1, 64)
NM = {0.5: (2, 4), 0.75: (1, 4)}


def _nm_mask(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    groups = w.abs().reshape(w.shape[0], -1, m)
    return (groups.argsort(-1, descending=True).argsort(-1) < n).reshape(w.shape)


def candidates(out_f: int, in_f: int, sparsity: float) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    dense = nn.Linear(in_f, out_f)
    w = dense.weight.detach()
    mask = torch.rand(out_f, in_f) >= sparsity
    mods = {"dense": dense}
    for layout in ("bitmask", "csr"):
        mods[layout] = SparseLinear.from_dense(w, dense.bias.detach(), mask, layout)
    if sparsity in NM:
        n, m = NM[sparsity]
        mods["nm"] = SparseLinear.from_dense(w, dense.bias.detach(), _nm_mask(w, n, m), "nm", n=n, m=m)
    return mods


def measure(mods: dict[str, nn.Module], x: torch.Tensor, rounds: int, warmup: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in mods}
    with torch.inference_mode():
        for _ in range(warmup):
            for m in mods.values():
                m(x)
        for _ in range(rounds):
            for name, m in mods.items():
                t = time.perf_counter()
                m(x)
                times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="1024x1024 only, fewer rounds")
    ap.add_argument("--repeat", type=int, default=20, help="rounds of timed calls (default 20)")
    ap.add_argument("--shapes", default="1024x1024,4096x4096", help="comma-separated OUTxIN (default %(default)s)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shapes = [(1024, 1024)] if args.quick else [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")]
    rounds = 5 if args.quick else args.repeat
    speed, size, loads = [], [], []
    for out_f, in_f in shapes:
        for s in SPARSITIES:
            mods = candidates(out_f, in_f, s)
            dense_bytes = mods["dense"].weight.nbytes + mods["dense"].bias.nbytes
            size.append((f"{out_f}x{in_f}", s, {k: m.nbytes / dense_bytes for k, m in mods.items() if k != "dense"}))
            for b in BATCHES:
                x = torch.randn(b, in_f)
                t = measure(mods, x, rounds, warmup=2)
                loads.append(os.getloadavg()[0])
                speed.append((f"{out_f}x{in_f}", s, b, t["dense"], {k: t["dense"] / v for k, v in t.items()
                                                                     if k != "dense"}))

    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} threads, fp32, torch.inference_mode(), median of {rounds} round-robin rounds, "
          f"load average (1 min) {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores\n")
    print("Speed as a ratio to the dense nn.Linear (dense ms / module ms; above 1.00x is faster):\n")
    print("| weight [out x in] | sparsity | batch | dense ms | bitmask | csr | nm |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for shape, s, b, dense, r in speed:
        nm = f"{r['nm']:.2f}x ({':'.join(map(str, NM[s]))})" if "nm" in r else "-"
        print(f"| {shape} | {s:.0%} | {b} | {dense * 1e3:.3f} | {r['bitmask']:.2f}x | {r['csr']:.2f}x | {nm} |")
    print("\nStored bytes (values + pattern + bias) as a ratio to the dense fp32 weight and bias:\n")
    print("| weight [out x in] | sparsity | bitmask | csr | nm |")
    print("| --- | --- | --- | --- | --- |")
    for shape, s, r in size:
        nm = f"{r['nm']:.3f} ({':'.join(map(str, NM[s]))})" if "nm" in r else "-"
        print(f"| {shape} | {s:.0%} | {r['bitmask']:.3f} | {r['csr']:.3f} | {nm} |")


if __name__ == "__main__":
    main()
