"""Low-rank factorization by truncated SVD: W [out, in] ~ A B with A = U_r sqrt(S_r) [out, r]
and B = sqrt(S_r) V_r^T [r, in] (seed 004, Method 4: absorb sqrt(Sigma) into both factors so
neither carries the whole scale).

By Eckart-Young the rank-r truncation is the best rank-r approximation in the Frobenius
norm, and its squared error is exactly the energy of the discarded singular values,
||W - A B||_F^2 = sum_{i > r} sigma_i^2. The decomposition runs in float64 (a float32 SVD of
a 4096-wide matrix loses the small singular values the energy curve is about), the
factors are cast back to the weight's dtype.

Rank choice:
- rank_for_energy: the smallest r keeping `energy` of sum sigma^2 (seed 000, Ex. 7.4);
- rank_for_budget: the largest r with r (out + in) <= keep * out * in parameters;
- pays_off: r (out + in) < out * in, below the break-even rank out*in/(out+in)
  (d/2 for a square matrix, seed 000, Ex. 7.1). Above it the two factors are larger
  than the matrix they replace.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch


@dataclass(frozen=True, eq=False)
class Spectrum:
    """The thin SVD of a [out, in] matrix in float64: W = U diag(S) Vh."""

    u: torch.Tensor     # [out, k], k = min(out, in)
    s: torch.Tensor     # [k], descending, >= 0
    vh: torch.Tensor    # [k, in]

    @property
    def energy(self) -> torch.Tensor:
        return energy_curve(self.s)


@dataclass(frozen=True, eq=False)
class LowRankResult:
    """a                [out, r] = U_r sqrt(S_r), in the weight's dtype
    b                [r, in]  = sqrt(S_r) V_r^T, in the weight's dtype
    singular_values  all min(out, in) singular values of W (float64, descending)
    energy           cumulative fraction of sum sigma^2 kept at rank 1..min(out, in) (float64)
    error            ||W - a b||_F^2 of the returned (cast) factors, computed in float64
    discarded        sum_{i > r} sigma_i^2: the Eckart-Young value of that error
    total            ||W||_F^2 = sum sigma_i^2
    """

    a: torch.Tensor
    b: torch.Tensor
    singular_values: torch.Tensor
    energy: torch.Tensor
    error: float
    discarded: float
    total: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[1])

    @property
    def energy_kept(self) -> float:
        return float(self.energy[self.rank - 1])

    @property
    def relative_error(self) -> float:
        """||W - a b||_F / ||W||_F (0 for a zero matrix)."""
        return math.sqrt(self.error / self.total) if self.total > 0 else 0.0


def check_weight(weight: torch.Tensor, name: str = "weight") -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"{name}: low-rank factorization takes a 2-D [out, in] weight, got shape "
                         f"{tuple(weight.shape)} (reshape a conv kernel to [out, in*kh*kw] first)")
    if not weight.is_floating_point():
        raise ValueError(f"{name}: weight must be floating point, got {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError(f"{name}: weight of shape {tuple(weight.shape)} is empty")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"{name}: weight has NaN or infinite values; an SVD of it is meaningless")


def spectrum(weight: torch.Tensor, *, name: str = "weight") -> Spectrum:
    """The thin SVD of `weight` (2-D, finite), computed in float64 on the weight's device."""
    check_weight(weight, name)
    u, s, vh = torch.linalg.svd(weight.detach().to(torch.float64), full_matrices=False)
    return Spectrum(u, s, vh)


def energy_curve(singular_values: torch.Tensor) -> torch.Tensor:
    """Cumulative fraction of sum sigma^2 kept at ranks 1..k (all ones for a zero matrix:
    any rank keeps all of nothing)."""
    sq = singular_values.detach().to(torch.float64) ** 2
    total = sq.sum()
    if float(total) == 0.0:
        return torch.ones_like(sq)
    return (torch.cumsum(sq, 0) / total).clamp(max=1.0)


def truncated_svd(weight: torch.Tensor, rank: int, *, name: str = "weight",
                  spec: Spectrum | None = None) -> LowRankResult:
    """W ~ a b at `rank` (1 <= rank <= min(out, in)). `spec`: the weight's spectrum when
    already computed (e.g. to choose the rank), so the SVD runs once."""
    check_weight(weight, name)
    out_f, in_f = weight.shape
    _check_rank(rank, out_f, in_f, name)
    sp = spectrum(weight, name=name) if spec is None else spec
    if tuple(sp.u.shape[:1]) + tuple(sp.vh.shape[1:]) != (out_f, in_f):
        raise ValueError(f"{name}: the spectrum given is of a {sp.u.shape[0]}x{sp.vh.shape[1]} matrix, "
                         f"the weight is {out_f}x{in_f}")
    root = sp.s[:rank].sqrt()
    a64 = sp.u[:, :rank] * root[None, :]
    b64 = root[:, None] * sp.vh[:rank]
    a, b = a64.to(weight.dtype), b64.to(weight.dtype)
    w64 = weight.detach().to(torch.float64)
    error = float(((w64 - a.to(torch.float64) @ b.to(torch.float64)) ** 2).sum())
    sq = sp.s ** 2
    return LowRankResult(a=a, b=b, singular_values=sp.s, energy=energy_curve(sp.s), error=error,
                         discarded=float(sq[rank:].sum()), total=float(sq.sum()))


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """The smallest r whose top-r singular values keep at least `energy` (in (0, 1]) of
    sum sigma^2; 1 for a zero matrix."""
    if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0.0 < energy <= 1.0:
        raise ValueError(f"rank_for_energy: energy must be a fraction in (0, 1], got {energy!r}")
    s = torch.as_tensor(singular_values, dtype=torch.float64)
    if s.dim() != 1 or s.numel() == 0:
        raise ValueError(f"rank_for_energy: singular_values must be a non-empty 1-D sequence, got shape "
                         f"{tuple(s.shape)}")
    if bool((s < 0).any()) or not bool(torch.isfinite(s).all()):
        raise ValueError("rank_for_energy: singular values must be finite and non-negative")
    curve = energy_curve(s.sort(descending=True).values)
    # a tolerance of a few ulps: energy 1.0 must not demand more than the full rank
    hit = torch.nonzero(curve >= energy - 1e-12)
    return int(hit[0]) + 1 if hit.numel() else int(s.numel())


def rank_for_budget(out_features: int, in_features: int, keep: float) -> int:
    """The largest r with r (out + in) <= keep * out * in (at most min(out, in)); 0 when
    even rank 1 is over the budget. Exact arithmetic: no float rounding at the boundary."""
    _check_dims(out_features, in_features, "rank_for_budget")
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not math.isfinite(keep) or not 0 < keep <= 1:
        raise ValueError(f"rank_for_budget: keep must be a fraction in (0, 1], got {keep!r}")
    r = math.floor(Fraction(keep) * out_features * in_features / (out_features + in_features))
    return min(r, out_features, in_features)


def pays_off(out_features: int, in_features: int, rank: int) -> bool:
    """Whether the factors hold fewer parameters than the matrix: r (out + in) < out * in."""
    _check_dims(out_features, in_features, "pays_off")
    return rank * (out_features + in_features) < out_features * in_features


def _check_dims(out_features: int, in_features: int, fn: str) -> None:
    for field, v in (("out_features", out_features), ("in_features", in_features)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{fn}: {field} must be a positive integer, got {v!r}")


def _check_rank(rank: int, out_f: int, in_f: int, name: str) -> None:
    most = min(out_f, in_f)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{name}: rank must be a positive integer, got {rank!r}")
    if rank > most:
        raise ValueError(f"{name}: rank {rank} is larger than a {out_f}x{in_f} matrix allows (at most "
                         f"min(out, in) = {most}); choose rank <= {most}")
