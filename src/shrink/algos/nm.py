"""N:M semi-structured sparsity: in every run of M consecutive input weights of a
row, only N are kept (NVIDIA's convention: "2:4" = 2 kept of every 4, the pattern
Ampere's sparse tensor cores run at up to 2x).

The groups run along the input dimension of an [out, in] weight (the reduction
axis of the matmul), which is what the hardware needs; in_features must be a
multiple of M.
"""
from __future__ import annotations

import re

import torch

from shrink.algos.magnitude import check_tensor


def parse_pattern(text: str) -> tuple[int, int]:
    """"2:4" -> (2, 4): N kept of every M."""
    if not isinstance(text, str):
        raise ValueError(f"N:M pattern must be a string such as '2:4', got {text!r}")
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
    if not m:
        raise ValueError(f"N:M pattern {text!r} is not of the form 'N:M' (e.g. '2:4' keeps 2 of every 4 weights)")
    n, mm = int(m.group(1)), int(m.group(2))
    check_pattern(n, mm, f"pattern {text!r}")
    return n, mm


def check_pattern(n, m, name: str = "weight") -> tuple[int, int]:
    """Integers with 1 <= N <= M (N == M keeps everything)."""
    for label, v in (("N", n), ("M", m)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{name}: N:M needs integers, got {label}={v!r}")
    if n < 1:
        raise ValueError(f"{name}: N:M needs N >= 1 weight kept per group, got {n}:{m}")
    if n > m:
        raise ValueError(f"{name}: N > M in {n}:{m}; N is the number KEPT of every M (e.g. 2:4)")
    return n, m


def nm_mask(scores: torch.Tensor, n: int, m: int, *, name: str = "weight") -> torch.Tensor:
    """Keep-mask (True = kept) with the n largest scores of each run of m consecutive
    input columns of every row. scores: [out, in] (|W|, Wanda's |W| x ||X||, ...).
    Ties: the lower index is kept."""
    check_tensor(scores, name, dims=2, what="scores")
    check_pattern(n, m, name)
    out, cols = scores.shape
    if cols % m:
        raise ValueError(
            f"{name}: {n}:{m} needs in_features divisible by {m}, got {cols}; "
            "prune this layer unstructured or leave it dense"
        )
    if n == m:
        return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    g = scores.detach().reshape(out, cols // m, m)
    # An ascending stable sort of -score puts the largest first and, among equal
    # scores, the lower index first (torch.topk makes no promise about ties).
    order = torch.sort(-g, dim=-1, stable=True).indices[..., :n]
    mask = torch.zeros(g.shape, dtype=torch.bool, device=scores.device)
    mask.scatter_(-1, order, True)
    return mask.reshape(out, cols)


def check_nm(mask: torch.Tensor, n: int, m: int) -> bool:
    """True iff every run of m consecutive entries along the last dimension keeps at
    most n. A mask whose last dimension is not a multiple of m is not N:M (False)."""
    if not isinstance(mask, torch.Tensor) or mask.dim() < 1:
        raise ValueError(f"check_nm: expected a mask tensor, got {type(mask).__name__}")
    check_pattern(n, m, "check_nm")
    if mask.shape[-1] % m:
        return False
    kept = (mask != 0).reshape(*mask.shape[:-1], mask.shape[-1] // m, m).sum(-1)
    return bool((kept <= n).all())
