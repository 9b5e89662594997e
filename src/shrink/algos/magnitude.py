"""Magnitude pruning: keep the largest |w|, per layer or with one threshold over many.

Masks are bool tensors of the weight's shape, True = kept. The pruned count is
exactly k = round(sparsity x numel) (Python's round, as shrink.calc.pruning and
torch.nn.utils.prune), never "everything under a percentile": ties at the
threshold are broken by position, the lower flat index pruned first, so the
result is the same on every machine and equals calc.pruning.magnitude_prune.

Cost: one k-th value selection over the |w| (no full sort), then elementwise
comparisons; the global variant concatenates the layers' |w| once (4 bytes per
weight for float32 layers), which is what a ~100M-weight model can afford.

The argument checks here are shared by the other pruning algorithms (nm, wanda,
sparsegpt, structured): every message starts with the layer's name.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch


def magnitude_mask(weight: torch.Tensor, sparsity: float, *, name: str = "weight") -> torch.Tensor:
    """Mask pruning the round(sparsity x numel) smallest |w| of `weight` (any shape).

    sparsity in [0, 1); ties: the lower flat index is pruned first.
    """
    check_tensor(weight, name)
    s = check_sparsity(sparsity, name)
    k = round(s * weight.numel())
    a = weight.detach().abs().reshape(-1).to(_work_dtype([weight]))
    return _prune_lowest([a], k)[0].reshape(weight.shape)


def global_magnitude_masks(
    weights: Mapping[str, torch.Tensor], sparsity: float, *, name: str = "weights"
) -> dict[str, torch.Tensor]:
    """One |w| threshold over all layers: exactly round(sparsity x total) weights pruned,
    wherever they are. Ties at the threshold: earlier layer (mapping order) first, then
    lower flat index. Returns {layer name: mask} in the mapping's order.

    Layers with small weights (e.g. a wide MLP next to attention) lose more than
    others: that is the point of a global threshold, and the danger (a layer can lose
    nearly all its weights); shrink.algos.sparsity.allocate_sparsity is the measured
    alternative.
    """
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError(f"{name}: expected a non-empty mapping of layer name -> weight tensor")
    for key, w in weights.items():
        check_tensor(w, str(key))
    s = check_sparsity(sparsity, name)
    total = sum(w.numel() for w in weights.values())
    k = round(s * total)
    dt = _work_dtype(list(weights.values()))
    flats = [w.detach().abs().reshape(-1).to(dt) for w in weights.values()]
    masks = _prune_lowest(flats, k)
    return {key: m.reshape(w.shape) for (key, w), m in zip(weights.items(), masks)}


def _prune_lowest(flats: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Keep-masks over 1-D score vectors taken in order as one: the k lowest pruned,
    ties broken by position (earlier vector, then lower index)."""
    if k <= 0:
        return [torch.ones(f.shape, dtype=torch.bool, device=f.device) for f in flats]
    joined = flats[0] if len(flats) == 1 else torch.cat(flats)
    thresh = joined.kthvalue(k).values  # the k-th smallest: everything below goes, some ties too
    del joined
    below = [f < thresh for f in flats]
    ties_left = k - sum(int(b.sum()) for b in below)  # >= 1: thresh itself is among the k
    masks = []
    for f, b in zip(flats, below):
        tie = f == thresh
        if ties_left > 0:
            # the first `ties_left` ties (in order) are pruned, the later ones kept
            rank = torch.cumsum(tie, 0, dtype=torch.int64)
            pruned_tie = tie & (rank <= ties_left)
            ties_left -= int(pruned_tie.sum())
            masks.append(~(b | pruned_tie))
        else:
            masks.append(~b)
    return masks


def _work_dtype(tensors: list[torch.Tensor]) -> torch.dtype:
    """float64 if any layer is float64, else float32 (exact for fp16/bf16 values)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# ---- argument checks shared by the pruning algorithms -------------------------------


def check_tensor(x, name: str, *, dims: int | None = None, what: str = "weight") -> None:
    """A non-empty, finite floating-point tensor (with `dims` dimensions when given)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor {what}, got {type(x).__name__}")
    if dims is not None and x.dim() != dims:
        shape = "[out, in]" if dims == 2 else f"{dims}-D"
        raise ValueError(f"{name}: {what} must be a {shape} tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: {what} must be a floating-point tensor, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name}: {what} of shape {tuple(x.shape)} is empty; nothing to prune")
    bad = ~torch.isfinite(x.detach())
    if bool(bad.any()):
        first = tuple(int(i) for i in torch.nonzero(bad)[0].tolist())
        raise ValueError(
            f"{name}: {what} of shape {tuple(x.shape)} has {int(bad.sum())} non-finite value(s) "
            f"(first at index {first}); replace or mask them before pruning"
        )


def check_sparsity(sparsity, name: str) -> float:
    """A fraction in [0, 1) (1.0 would remove the whole layer)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise ValueError(f"{name}: sparsity must be a number in [0, 1), got {sparsity!r}")
    s = float(sparsity)
    if not math.isfinite(s) or not 0.0 <= s < 1.0:
        hint = "; 1.0 would remove every weight (remove the layer instead)" if s >= 1.0 else ""
        raise ValueError(f"{name}: sparsity must be in [0, 1) (the fraction of weights removed), got {sparsity!r}{hint}")
    return s
