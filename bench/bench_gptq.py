"""GPTQ speed and error: shrink.algos.gptq against a plain column-by-column GPTQ.

Run: .venv/bin/python bench/bench_gptq.py [--n 4096] [--tokens 8192] [--spec int4-g128]
Not part of the test suite. Both run in float32 on the same weight and Hessian;
the plain one is the test suite's reference (tests/algos/test_gptq.py) with its
working dtype made a parameter: every later column updated after each column
(no lazy blocks), scales through the public quantize(). The Hessian is "real-ish":
2/n X^T X of activations with low-rank correlation, a per-feature scale spread
over two decades and a few outlier features, as LLM layer inputs have.
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

from shrink.algos import gptq, rtn
from shrink.observe import HessianObserver
from shrink.quant import QuantSpec, dequantize, quantize


def reference_gptq(weight, hessian, spec, damp=0.01, dtype=torch.float64):
    """Plain GPTQ, one column at a time (copied from the tests, dtype added)."""
    W = weight.detach().to(dtype, copy=True)
    H = hessian.detach().to(dtype, copy=True)
    n = W.shape[1]
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * H.diagonal().mean() * torch.eye(n, dtype=dtype)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    g = spec.group_size if spec.granularity == "group" else n
    col_spec = spec.with_(granularity="channel", group_size=None)
    Q = torch.zeros_like(W)
    for i in range(n):
        if i % g == 0:
            p = quantize(W[:, i:i + g], col_spec)
            s, z = p.scale, p.zero_point
        Q[:, i] = dequantize(quantize(W[:, i:i + 1], col_spec, scale=s, zero_point=z))[:, 0]
        e = (W[:, i] - Q[:, i]) / U[i, i]
        W[:, i + 1:] -= e[:, None] * U[i, i + 1:][None, :]
    return Q


def trace_loss(w, q, h):
    d = w.double() - q.double()
    return float(((d @ h) * d).sum())


def realish_hessian(n: int, tokens: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rank = max(8, n // 8)
    mix = torch.randn(rank, n, generator=g) / rank ** 0.5
    feature_scale = torch.logspace(-1, 1, n)[torch.randperm(n, generator=g)]
    obs = HessianObserver(n)
    for start in range(0, tokens, 1024):
        m = min(1024, tokens - start)
        x = torch.randn(m, rank, generator=g) @ mix + 0.3 * torch.randn(m, n, generator=g)
        x = x * feature_scale
        x[:, :4] *= 20  # outlier features
        obs.observe(x)
    return obs.hessian()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4096, help="the layer is n x n")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--spec", default="int4-g128")
    args = ap.parse_args()
    spec = QuantSpec.from_name(args.spec)
    torch.manual_seed(0)
    w = torch.randn(args.n, args.n) * 0.02
    t = time.perf_counter()
    h = realish_hessian(args.n, args.tokens)
    t_h = time.perf_counter() - t

    r_rtn = rtn(w, spec, hessian=h)
    res = gptq(w, h, spec)
    res_ao = gptq(w, h, spec, act_order=True)
    t = time.perf_counter()
    q_ref = reference_gptq(w, h, spec, dtype=torch.float32)
    t_ref = time.perf_counter() - t
    q = res.dequantize()
    loss_ref = trace_loss(w, q_ref, h)
    same = float((q == q_ref).double().mean())

    print(f"# GPTQ {args.n}x{args.n}, {args.spec}, H from {args.tokens} tokens; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"HessianObserver over {args.tokens} tokens: {t_h:.2f} s")
    print("| method | time (s) | loss tr(DHD^T) | loss / RTN |")
    print("| --- | --- | --- | --- |")
    print(f"| RTN | {r_rtn.seconds:.2f} | {r_rtn.loss:.5g} | 1.000 |")
    print(f"| plain column-by-column GPTQ (fp32) | {t_ref:.2f} | {loss_ref:.5g} | {loss_ref / r_rtn.loss:.3f} |")
    print(f"| shrink gptq | {res.seconds:.2f} | {res.loss:.5g} | {res.loss / r_rtn.loss:.3f} |")
    print(f"| shrink gptq act_order | {res_ao.seconds:.2f} | {res_ao.loss:.5g} | {res_ao.loss / r_rtn.loss:.3f} |")
    print(f"speed: shrink gptq is {t_ref / res.seconds:.1f}x faster than the plain loop; "
          f"same quantized value for {100 * same:.3f}% of weights; "
          f"loss ratio shrink/plain {res.loss / loss_ref:.6f}; damp_used {res.damp_used:g}, retries {res.retries}")


if __name__ == "__main__":
    main()
