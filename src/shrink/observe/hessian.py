"""The input Hessian of a Linear layer, accumulated over calibration batches.

For the layer error ||W X - Q X||_F^2 / n the Hessian per output row is
H = 2/n sum_t x_t x_t^T over the n input vectors (tokens) seen: what GPTQ,
SparseGPT and friends consume. The Gram sum is kept in float64 by default (a
float32 sum over many tokens loses digits that the Cholesky of an
ill-conditioned H then needs) and scaled by 2/n when H is asked for; each
chunk of 2048 tokens is multiplied in the input's precision (float32 for
float32 activations: ~1e-7 of the largest entry, far below GPTQ's 1% damping)
and added to that sum.

Speed:
- only the upper triangle of blocks of X^T X is multiplied and summed (H is
  symmetric); hessian() mirrors it, which also makes every H exactly symmetric;
- layers fed the very same input tensor (q/k/v projections, gate/up) in a row
  can share one product: observers given the same GramCache reuse the last Gram
  while its input tensor is unmodified (see GramCache).
"""
from __future__ import annotations

import torch

from shrink.quant import check_finite

_DTYPES = (torch.float32, torch.float64)
# Column block of the triangular Gram product: wide enough for an efficient GEMM.
_BLOCK = 256
# Tokens per float32 product (bounds the float32 copy of a half-precision input).
_CHUNK = 2048
# Tokens whose float32 products are summed in float32 (accumulated in place by the
# GEMMs) before the sum joins the float64 total: one float64 add per 16k tokens
# instead of per chunk (each is a pass over n^2 doubles, ~40% of the GEMM time at n=2816).
_FLUSH = 16384


class HessianObserver:
    """observe(x) with x shaped [..., in_features] (every leading index is one
    token); hessian() -> [in_features, in_features]; samples = tokens seen.
    Observers over disjoint data combine with merge()."""

    def __init__(self, in_features: int, dtype: torch.dtype = torch.float64, cache: "GramCache | None" = None):
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"HessianObserver.in_features must be a positive integer, got {in_features!r}")
        if dtype not in _DTYPES:
            raise ValueError(f"HessianObserver.dtype must be torch.float32 or torch.float64, got {dtype!r}")
        self.in_features = in_features
        self.dtype = dtype
        self.samples = 0
        self.batches = 0
        # sum_t x_t x_t^T, only its upper triangle kept up to date (mirrored in hessian()):
        # products (float32 for float32 activations, as GPTQ implementations do) are summed
        # in float32 over up to _FLUSH tokens, then join the float64 `_sum`.
        self._sum = torch.zeros(in_features, in_features, dtype=dtype)
        self._pending: torch.Tensor | None = None
        self._pending_tokens = 0
        self._cache = cache

    def observe(self, x: torch.Tensor) -> torch.Tensor:
        """Add a batch of inputs; returns x unchanged (so it can sit in a forward hook)."""
        what = f"HessianObserver: batch {self.batches}"
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{what}: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"{what} has shape {tuple(x.shape)}; its last dimension must be in_features={self.in_features}"
            )
        if x.numel() == 0:
            raise ValueError(f"{what} of shape {tuple(x.shape)} holds no tokens")
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        with torch.no_grad():
            parts = None if self._cache is None else self._cache.lookup(x, compute)
            if parts is None:
                check_finite(x.detach(), what)
                flat = x.detach().reshape(-1, self.in_features)
                parts = []
                for t0 in range(0, flat.shape[0], _FLUSH):
                    part = flat[t0:t0 + _FLUSH]
                    g = None
                    for t in range(0, part.shape[0], _CHUNK):
                        g = _gram_upper(part[t:t + _CHUNK].to(compute), g)
                    parts.append((g, part.shape[0]))
                if self._cache is not None:
                    self._cache.remember(x, compute, parts)
            for g, tokens in parts:
                self._add(g, tokens)
        self.samples += x.numel() // self.in_features
        self.batches += 1
        return x

    def _add(self, g: torch.Tensor, tokens: int) -> None:
        if self._sum.device != g.device:  # the sum lives where the activations do (a GPU model's)
            self._sum = self._sum.to(g.device)
        if g.dtype == self.dtype or (not self._pending_tokens and tokens >= _FLUSH):
            self._sum.add_(g)
            return
        if self._pending is None:
            self._pending = torch.zeros_like(g)
        self._pending.add_(g)
        self._pending_tokens += tokens
        if self._pending_tokens >= _FLUSH:
            self._flush()

    def _flush(self) -> None:
        if self._pending is not None and self._pending_tokens:
            self._sum.add_(self._pending)
            self._pending.zero_()
            self._pending_tokens = 0

    __call__ = observe

    def merge(self, other: "HessianObserver") -> "HessianObserver":
        """Fold in another observer's data (e.g. from another worker); returns self."""
        if not isinstance(other, HessianObserver) or other.in_features != self.in_features:
            got = other.in_features if isinstance(other, HessianObserver) else type(other).__name__
            raise ValueError(f"HessianObserver.merge: need an observer with in_features={self.in_features}, got {got}")
        if other.samples:
            other._flush()
            self._flush()
            self._sum.add_(other._sum.to(device=self._sum.device, dtype=self.dtype))
            self.samples += other.samples
            self.batches += other.batches
        return self

    def hessian(self) -> torch.Tensor:
        """H = 2/n sum x x^T over all tokens seen (a copy, exactly symmetric)."""
        if self.samples == 0:
            raise ValueError("HessianObserver: no batches observed yet; feed the layer's inputs first")
        self._flush()
        total = torch.triu(self._sum)
        total.add_(torch.triu(self._sum, 1).T)  # mirror the upper triangle: exactly symmetric
        return total.mul_(2.0 / self.samples)


def gram_matrix(flat: torch.Tensor, dtype: torch.dtype = torch.float64, *, compute: torch.dtype | None = None,
                chunk: int = _CHUNK) -> torch.Tensor:
    """flat^T flat in `dtype` for flat [tokens, n]: exactly symmetric. The products run in
    `compute` (default: dtype) over chunks of `chunk` tokens, each chunk's product added
    to the `dtype` sum: a float32 product over 2048 tokens keeps ~6 digits, the float64
    sum keeps them however many chunks and batches follow, at float32 GEMM speed (2-4x
    float64's). Only the upper triangle of column blocks is multiplied, the lower mirrored."""
    compute = dtype if compute is None else compute
    n = flat.shape[1]
    total = None
    for t0 in range(0, flat.shape[0], chunk):
        g = _gram_upper(flat[t0:t0 + chunk].to(compute))
        total = g.to(dtype) if total is None else total.add_(g.to(dtype))
    # mirror the upper triangle (blocks below the diagonal were never computed)
    return torch.triu(total).add_(torch.triu(total, 1).T)


def _gram_upper(f: torch.Tensor, acc: torch.Tensor | None = None) -> torch.Tensor:
    """f^T f with at least the upper triangle right (the rest unspecified); with `acc`
    (an earlier result of this function), f^T f added to it in place by the GEMMs."""
    n = f.shape[1]
    if n <= 2 * _BLOCK:
        return f.T @ f if acc is None else acc.addmm_(f.T, f)
    g = torch.zeros(n, n, dtype=f.dtype, device=f.device) if acc is None else acc
    for i1 in range(0, n, _BLOCK):
        i2 = min(i1 + _BLOCK, n)
        # one GEMM: block row i1 of the upper part
        if acc is None:
            torch.mm(f[:, i1:i2].T, f[:, i1:], out=g[i1:i2, i1:])
        else:
            g[i1:i2, i1:].addmm_(f[:, i1:i2].T, f[:, i1:])
    return g


class GramCache:
    """The last Gram products (per token chunk) computed by the observers sharing this cache, and their input.

    The input is held (a strong reference: its memory cannot be freed and reused
    while remembered), so equal address, shape, strides, dtype and version counter
    mean the same, unmodified values: detach() views share the version counter, and
    in-place torch ops bump it. Inference tensors (no version counter) are never reused.
    Scope one to a calibration pass (clear() or drop it after) so nothing outlives it."""

    def __init__(self):
        self.x = self.key = self.gram = None

    @staticmethod
    def _key(x: torch.Tensor, dtype: torch.dtype):
        if x.is_inference() or x.layout != torch.strided or x.requires_grad:
            return None
        return (x._version, x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x.device, dtype)

    def lookup(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        if self.key is None:
            return None
        return self.gram if self._key(x, dtype) == self.key else None

    def remember(self, x: torch.Tensor, dtype: torch.dtype, gram: torch.Tensor) -> None:
        key = self._key(x, dtype)
        self.x, self.key, self.gram = (None, None, None) if key is None else (x, key, gram)

    def clear(self) -> None:
        self.x = self.key = self.gram = None
