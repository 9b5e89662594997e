"""QuantLinear on a GPU: the CUDA int4/int8 kernels against bf16 and fp32 nn.Linear.

Run (on a machine with an NVIDIA GPU): python bench/bench_gpu.py [--repeat N]

For each weight shape and batch size, every candidate is timed side by side:
CUDA-graph-free eager calls, `--inner` calls back to back between two CUDA
events (so launch overhead counts, as it does in eager decoding), median over
`--repeat` rounds after a warm-up. Prints a Markdown table with each time as a
ratio to the bf16 nn.Linear of the same shape (the usual GPU baseline) and the
weight bytes each holds. Exits with a message when no GPU is present.

--decode also decodes with the 374M Llama of bench/llama374m.py at batch 1
(greedy, 64 new tokens after 16, shrink.modules.greedy_decode): bf16 weights
against shrink's int4 (w4-rtn; every Linear in the blocks, lm_head bf16).
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
    ap.add_argument("--decode", action="store_true", help="also time batch-1 decoding of the 374M Llama")
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
    if args.decode:
        decode()


def decode(new: int = 64, prompt: int = 16, rounds: int = 3) -> None:
    import os
    import time

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import llama374m

    import shrink
    from shrink.modules import greedy_decode

    base = llama374m.build(0).cuda().bfloat16()
    q = shrink.compress(llama374m.build(0).cuda(), "w4-rtn").model
    q.lm_head.bfloat16()
    q.model.embed_tokens.bfloat16()
    q.model.norm.bfloat16()
    for layer in q.model.layers:  # norms in bf16 too, so activations stay bf16 as in the bf16 model
        layer.input_layernorm.bfloat16()
        layer.post_attention_layernorm.bfloat16()
    kernels = sorted({m.kernel for m in q.modules() if hasattr(m, "kernel")})
    ids = torch.randint(0, 32000, (1, prompt), generator=torch.Generator().manual_seed(0)).cuda()
    print(f"\n# batch-1 greedy decode, 374M Llama, {new} new tokens after {prompt}; median of {rounds} rounds")
    print("| weights | kernels | tok/s |")
    print("|---|---|---|")
    for name, model, ks in (("bf16", base, "cuBLAS"), ("int4 g128 (shrink w4-rtn)", q, ", ".join(kernels))):
        greedy_decode(model, ids, 8)
        tps = []
        for _ in range(rounds):
            torch.cuda.synchronize()
            tps.append(greedy_decode(model, ids, new).tokens_per_s)
        print(f"| {name} | {ks} | {statistics.median(tps):.1f} |")


if __name__ == "__main__":
    main()
