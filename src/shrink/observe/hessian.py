"""The input Hessian of a Linear layer, accumulated over calibration batches.

For the layer error ||W X - Q X||_F^2 / n the Hessian per output row is
H = 2/n sum_t x_t x_t^T over the n input vectors (tokens) seen: what GPTQ,
SparseGPT and friends consume. It is kept as a running mean, so its entries
stay O(x^2) however many tokens flow through, in float64 by default: a
float32 sum over many tokens loses digits that the Cholesky of an
ill-conditioned H then needs.
"""
from __future__ import annotations

import torch

from shrink.quant import check_finite

_DTYPES = (torch.float32, torch.float64)


class HessianObserver:
    """observe(x) with x shaped [..., in_features] (every leading index is one
    token); hessian() -> [in_features, in_features]; samples = tokens seen.
    Observers over disjoint data combine with merge()."""

    def __init__(self, in_features: int, dtype: torch.dtype = torch.float64):
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"HessianObserver.in_features must be a positive integer, got {in_features!r}")
        if dtype not in _DTYPES:
            raise ValueError(f"HessianObserver.dtype must be torch.float32 or torch.float64, got {dtype!r}")
        self.in_features = in_features
        self.dtype = dtype
        self.samples = 0
        self.batches = 0
        self._h = torch.zeros(in_features, in_features, dtype=dtype)

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
        check_finite(x.detach(), what)
        with torch.no_grad():
            flat = x.detach().reshape(-1, self.in_features).to(self.dtype)
            self._add(flat.T @ flat, flat.shape[0])
        self.batches += 1
        return x

    __call__ = observe

    def _add(self, gram: torch.Tensor, count: int) -> None:
        # Running mean: H_new = n_old/n_new * H_old + 2/n_new * X^T X.
        total = self.samples + count
        self._h.mul_(self.samples / total).add_(gram, alpha=2.0 / total)
        self.samples = total

    def merge(self, other: "HessianObserver") -> "HessianObserver":
        """Fold in another observer's data (e.g. from another worker); returns self."""
        if not isinstance(other, HessianObserver) or other.in_features != self.in_features:
            got = other.in_features if isinstance(other, HessianObserver) else type(other).__name__
            raise ValueError(f"HessianObserver.merge: need an observer with in_features={self.in_features}, got {got}")
        if other.samples:
            # other's H is 2/m X^T X, so m/2 * H is its Gram matrix.
            self._add(other._h.to(self.dtype) * (other.samples / 2.0), other.samples)
            self.batches += other.batches
        return self

    def hessian(self) -> torch.Tensor:
        """H = 2/n sum x x^T over all tokens seen (a copy, exactly symmetric)."""
        if self.samples == 0:
            raise ValueError("HessianObserver: no batches observed yet; feed the layer's inputs first")
        return (self._h + self._h.T) / 2
