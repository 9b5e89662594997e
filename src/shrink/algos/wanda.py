"""Wanda: prune by weight magnitude times input activation norm (Sun et al. 2023).

The score of W[i, j] is |W[i, j]| x ||X_j||_2, the L2 norm of input feature j over
the calibration tokens: a small weight on a feature with huge activations (the
outlier features of LLMs) matters more than its magnitude says. Weights are
compared within each output row (each row loses the same number of weights), as
the reference does; there is no weight update (SparseGPT adds one).

The reference keeps the running mean of x_j^2 (a per-feature scale of the norm);
scaling a column's score by one number changes no row's ranking, so the plain
norm here gives the same masks.
"""
from __future__ import annotations

import torch

from shrink.algos.magnitude import check_sparsity, check_tensor
from shrink.algos.nm import check_pattern, nm_mask


class ActNorm:
    """Stream calibration batches, get the per-feature L2 norm over all tokens.

    update(x) with x of shape [..., in] (every leading index is one token);
    norm() -> float64 [in]. The sum of squares is kept in float64."""

    def __init__(self, in_features: int | None = None):
        bad = isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1
        if in_features is not None and bad:
            raise ValueError(f"ActNorm: in_features must be a positive integer, got {in_features!r}")
        self.in_features = in_features
        self.tokens = 0
        self._sumsq: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """Add a batch; returns x unchanged (so it can sit in a forward hook)."""
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            raise ValueError(f"ActNorm: expected a tensor of shape [..., in], got {getattr(x, 'shape', type(x).__name__)}")
        if self.in_features is None:
            self.in_features = x.shape[-1]
        if x.shape[-1] != self.in_features:
            raise ValueError(f"ActNorm: batch has {x.shape[-1]} features, expected {self.in_features} "
                             f"(shape {tuple(x.shape)})")
        if x.numel():  # an empty batch adds nothing
            check_tensor(x, f"ActNorm (batch after {self.tokens} tokens)", what="batch")
        flat = x.detach().reshape(-1, self.in_features)
        s = flat.to(torch.float64).square().sum(0)
        self._sumsq = s if self._sumsq is None else self._sumsq.add_(s)
        self.tokens += flat.shape[0]
        return x

    def norm(self) -> torch.Tensor:
        """||X_j||_2 over every token seen, float64 [in]."""
        if self._sumsq is None or self.tokens == 0:
            raise ValueError("ActNorm: no tokens seen yet; update() it with calibration inputs first")
        return self._sumsq.sqrt()


def act_norms_from_inputs(x: torch.Tensor) -> torch.Tensor:
    """Per-feature L2 norm over tokens of inputs [tokens, in] (or [..., in]): float64 [in]."""
    acc = ActNorm()
    acc.update(x)
    return acc.norm()


def wanda_scores(weight: torch.Tensor, act_norm: torch.Tensor, *, name: str = "weight") -> torch.Tensor:
    """|W_ij| x ||X_j||_2, [out, in]; float32 (float64 for a float64 weight)."""
    check_tensor(weight, name, dims=2)
    _check_act_norm(act_norm, weight.shape[1], name)
    dt = torch.float64 if weight.dtype == torch.float64 else torch.float32
    return weight.detach().abs().to(dt) * act_norm.detach().to(device=weight.device, dtype=dt)[None, :]


def wanda_mask(
    weight: torch.Tensor,
    act_norm: torch.Tensor,
    sparsity: float | None = None,
    *,
    pattern: tuple[int, int] | None = None,
    name: str = "weight",
) -> torch.Tensor:
    """Keep-mask (True = kept). Unstructured (sparsity): every output row loses exactly
    round(sparsity x in) of its lowest scores, ties: lower index pruned first. N:M
    (pattern=(n, m)): the n highest scores of every m consecutive inputs are kept.
    Give exactly one of sparsity / pattern."""
    if (sparsity is None) == (pattern is None):
        raise ValueError(f"{name}: give exactly one of sparsity (unstructured) or pattern (N:M, e.g. (2, 4))")
    scores = wanda_scores(weight, act_norm, name=name)
    if pattern is not None:
        n, m = _pattern(pattern, name)
        return nm_mask(scores, n, m, name=name)
    s = check_sparsity(sparsity, name)
    return row_prune_mask(scores, s)


def row_prune_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune round(sparsity x in) lowest scores in every row (stable: lower index first)."""
    k = round(sparsity * scores.shape[1])
    mask = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if k:
        lowest = torch.sort(scores, dim=1, stable=True).indices[:, :k]
        mask.scatter_(1, lowest, False)
    return mask


def _pattern(pattern, name: str) -> tuple[int, int]:
    if not isinstance(pattern, (tuple, list)) or len(pattern) != 2:
        raise ValueError(f"{name}: pattern must be (n, m) such as (2, 4); parse '2:4' with shrink.algos.nm.parse_pattern")
    return check_pattern(pattern[0], pattern[1], name)


def _check_act_norm(act_norm, in_features: int, name: str) -> None:
    check_tensor(act_norm, name, dims=1, what="act_norm")
    if act_norm.shape[0] != in_features:
        raise ValueError(
            f"{name}: act_norm has {act_norm.shape[0]} entries but the weight has {in_features} input "
            "columns; it must be the L2 norm of each input feature over the calibration tokens"
        )
    if bool((act_norm < 0).any()):
        raise ValueError(f"{name}: act_norm has negative entries; it must be a norm (>= 0) per input feature")
