"""GPTQ: quantize a Linear weight column by column, correcting for each rounding
error with the inputs' second-order statistics (Frantar et al. 2022).

For the layer error E(Q) = ||W X - Q X||_F^2 the Hessian per output row is
H = 2/n X X^T. Columns are quantized in order; after column i the rounding
error e_i = (w_i - q_i) / [U]_ii is spread over the columns still free as
W[:, j] -= e_i U[i, j], where U is the upper Cholesky factor of H^-1 (row i of
U is the Optimal Brain Surgeon update once columns < i are fixed). Each row
(output channel) is solved independently with the same H, so stacked weights
([q; k; v] rows of one input) with per-channel or per-group scales give the
same result as solving each alone.

What the reference implementation does and this one keeps:
- dead inputs (H[i, i] == 0) get H[i, i] = 1 and W[:, i] = 0;
- relative damping damp * mean(diag H) on the diagonal; a failed Cholesky
  retries with 10x the damping (`retries`, `damp_used` in the result);
- lazy batch updates: columns are processed in blocks of `block_size`, and the
  columns after a block receive its accumulated update in one matmul (inside
  a block, a column receives the block's earlier errors when it is reached:
  one vector-matrix product instead of a rank-1 update of the whole block);
- act_order: columns in order of decreasing H[i, i].

Where it differs, on purpose:
- the factorization runs in float64 whatever the weight's dtype (O(in^3)
  once; it keeps H^-1 accurate for the ill-conditioned H of real activations),
  and U comes from one Cholesky of the order-reversed H and one triangular
  inverse instead of Cholesky, inverse and Cholesky again; the column sweep
  runs in float32 (float64 for float64 weights);
- group scales are computed from the fully updated weights when a group's
  first column is reached: blocks are aligned to groups so no pending lazy
  update is missing (the reference reads stale columns when a group starts
  inside a block), which makes the result independent of block_size (up to
  rounding);
- act_order with groups always uses static groups (scales from the original
  weight per original group, the reference's static_groups): scales chosen in
  permuted order would need a per-column group index, and with static groups
  the QTensor is an ordinary per-group tensor in the original column order;
- each column is coded by shrink.quant's own encode/decode, and the QTensor is
  built by quantize() from the exact values that were rounded, so
  dequantize(result.qtensor) is bit for bit the weight GPTQ settled on;
- the reported loss is tr((W - Q) H (W - Q)^T) with the caller's H, not the
  damped objective, so it compares directly with rtn's.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable

import torch

from shrink.algos.result import QuantResult
from shrink.algos.rtn import check_hessian, check_weight
from shrink.formats import IntFormat
from shrink.quant import QuantSpec, quantize
from shrink.quant.blocks import layout_for
from shrink.quant.core import decode, encode, inverse_scale
from shrink.quant.ranges import minmax_range, mse_range, percentile_range, qparams_from_range

OBSERVERS = ("minmax", "percentile", "mse")
# The first retry when damp=0 fails (10x of nothing is nothing).
_FIRST_RETRY_DAMP = 1e-3


def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    observer: str = "minmax",
    max_retries: int = 4,
    progress: Callable[[int, int], None] | None = None,
    mask: torch.Tensor | None = None,
    **observer_kwargs,
) -> QuantResult:
    """GPTQ-quantize a Linear weight [out, in] given H = 2/n X X^T of its inputs [in, in].

    spec: any QuantSpec; scales per tensor, per output channel (axis 0) or per
    group of `group_size` input columns (a ragged last group is fine).
    Stacked weights (e.g. [q; k; v] rows sharing one input) may be passed
    together: with per-channel or per-group scales rows are solved
    independently, so the result equals solving each.
    act_order: columns in order of decreasing H[i, i]; with groups this implies
    static_groups (scales from the original weight, fixed up front).
    block_size only trades speed (the result does not depend on it, up to rounding).
    damp: a fraction of mean(diag H) added to the diagonal; a failed Cholesky is
    retried with 10x more, at most max_retries times (then a ValueError).
    observer / observer_kwargs choose scales from the weights as quantize() does.
    progress(done_columns, total_columns) is called after each block.
    mask: a bool [out, in] (True = kept) of a pruned weight whose zeros must stay zero: each
    column is masked before it is rounded (the error feedback never revives a pruned weight),
    so where the grid holds 0 the pruned entries dequantize to exactly 0.
    """
    start = time.perf_counter()
    check_weight(weight, spec, "gptq")
    check_hessian(hessian, weight.shape[1], "gptq")
    if mask is not None and (mask.shape != weight.shape or mask.dtype != torch.bool):
        raise ValueError(f"gptq: mask must be a bool tensor of the weight's shape {tuple(weight.shape)}, "
                         f"got {mask.dtype} {tuple(mask.shape)}")
    _check_options(block_size, damp, max_retries, observer, observer_kwargs)
    out, n = weight.shape
    cdt = torch.float64 if weight.dtype == torch.float64 else torch.float32
    grid = spec.grid()
    grouped = spec.has_scale and spec.granularity == "group"
    static = grouped and (static_groups or act_order)
    g = spec.group_size if grouped else n

    with torch.no_grad():
        h = hessian.detach().to(torch.float64, copy=True)
        dead = torch.diagonal(h) == 0
        # A Gram matrix with a zero diagonal entry has that whole row and column zero.
        h[dead, :] = 0
        h[:, dead] = 0
        h[dead, dead] = 1
        w0 = weight.detach().to(cdt, copy=True)
        w0[:, dead] = 0

        # Scales: fixed up front except for dynamic groups, which fill `scale` as they go.
        lay = layout_for(w0.shape, spec)
        scale = zp = None
        if spec.has_scale:
            if grouped and not static:
                scale = torch.empty(out, lay.groups, dtype=spec.scale_dtype, device=w0.device)
                zp = torch.empty_like(scale) if spec.has_zero_point else None
            else:
                s, z = _qparams(lay.to_blocks(w0), spec, grid, observer, observer_kwargs)
                scale, zp = s[..., 0], (None if z is None else z[..., 0])  # [rows, groups]

        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else None
        wt = w0.t().clone(memory_format=torch.contiguous_format)  # [in, out]: a column is one row
        keep = None if mask is None else mask.t().to(device=w0.device, dtype=cdt)
        if keep is not None:
            wt *= keep
        if perm is not None:
            wt, h = wt[perm], h[perm][:, perm]
            keep = None if keep is None else keep[perm]
        u, damp_used, retries, lam = _inverse_cholesky(h, damp, max_retries)
        u = u.to(cdt)

        q = torch.empty_like(wt)
        cols = list(range(n)) if perm is None else perm.tolist()  # original index of each column
        coder = _ColumnCoder(spec, grid, scale, zp, cdt, g if grouped else None)
        err_sq = torch.zeros((), dtype=torch.float64, device=w0.device)
        for i1, i2 in _block_bounds(n, block_size, g if grouped and not static else None):
            u1 = u[i1:i2, i1:i2]
            w1 = wt[i1:i2]  # a view: updates land in wt
            e1 = torch.empty_like(w1)
            k0 = 0  # errors e1[k0:i] are still pending for the block's columns i..
            for i in range(i2 - i1):
                j = i1 + i
                if grouped and not static and j % g == 0:
                    if i > k0:  # a group's scales must see its columns fully updated
                        w1[i:] -= u1[k0:i, i:].t() @ e1[k0:i]
                        k0 = i
                    s, z = _qparams(wt[j:min(j + g, n)].t().unsqueeze(1), spec, grid, observer, observer_kwargs)
                    scale[:, j // g] = s[:, 0, 0]
                    if zp is not None:
                        zp[:, j // g] = z[:, 0, 0]
                    coder.refresh(j // g)
                # Pending errors reach a column only when it is rounded: a vector-matrix
                # product per column instead of a rank-1 update of the whole block.
                if i > k0:
                    w1[i] -= u1[k0:i, i] @ e1[k0:i]
                if keep is not None:
                    w1[i] *= keep[j]
                qj = coder(w1[i], cols[j])
                q[j] = qj
                torch.div(w1[i] - qj, u1[i, i], out=e1[i])
            err_sq += e1.square().sum(dtype=torch.float64)
            if i2 < n:
                wt[i2:].addmm_(u[i1:i2, i2:].t(), e1, alpha=-1)
            if progress is not None:
                progress(i2, n)

        if perm is not None:
            inv = torch.argsort(perm)
            wt, q = wt[inv], q[inv]
        # wt holds each column as it was when rounded; quantize() re-derives the same codes.
        params = {}
        if scale is not None:
            params["scale"] = scale.reshape(lay.param_shape)
            params["zero_point"] = None if zp is None else zp.reshape(lay.param_shape)
        qt = quantize(wt.t().contiguous(), spec, **params)
        if qt.dtype != weight.dtype:
            qt = dataclasses.replace(qt, dtype=weight.dtype)
        # sum e^2 is the damped objective tr(D (H + lam I) D^T), D = W0 - Q; take the damping out
        # (what is left is negative only if the caller's H is itself indefinite).
        loss = float(err_sq) - lam * float((w0.t() - q).square().sum(dtype=torch.float64))

    return QuantResult(
        qtensor=qt, loss=loss, damp_used=damp_used, retries=retries, dead_columns=int(dead.sum()),
        perm=perm, static_groups=static, seconds=time.perf_counter() - start,
    )


class _ColumnCoder:
    """Round one column (a vector over output rows) to the grid: decode(encode(w)) with the
    column's scale and zero-point, as shrink.quant.core computes it. For integer grids the
    per-group factors (1/scale in float32 then float64, zero-point in float64 and float32,
    scale in float32) are converted once per group instead of once per column, and the
    codes stay float (small integers, exact): the same operations in the same precisions,
    so the same bits, for a fraction of the per-column calls."""

    def __init__(self, spec: QuantSpec, grid, scale, zp, cdt: torch.dtype, group: int | None):
        self.grid, self.scale, self.zp, self.cdt, self.group = grid, scale, zp, cdt, group
        self.fast = isinstance(grid, IntFormat) and scale is not None
        self.qmin, self.qmax = (grid.qmin, grid.qmax) if self.fast else (None, None)
        self.params: dict[int, tuple] = {}

    def refresh(self, gi: int) -> None:
        """Group gi's scale / zero-point were (re)written: forget its cached factors."""
        self.params.pop(gi, None)

    def _factors(self, gi: int) -> tuple:
        f = self.params.get(gi)
        if f is None:
            s = self.scale[:, gi]
            inv = inverse_scale(s)
            if self.zp is None:
                f = (inv, None, None, s.to(torch.float32))
            else:
                z = self.zp[:, gi]
                f = (inv.to(torch.float64), z.to(torch.float64), z.to(torch.float32), s.to(torch.float32))
            self.params[gi] = f
        return f

    def __call__(self, w: torch.Tensor, col: int) -> torch.Tensor:
        gi = 0 if self.group is None else col // self.group
        if not self.fast:
            s = None if self.scale is None else self.scale[:, gi]
            z = None if self.zp is None else self.zp[:, gi]
            return decode(encode(w, s, z, self.grid), s, z, self.grid).to(self.cdt)
        inv, z64, z32, s32 = self._factors(gi)
        if z64 is None:  # core.scaled_int without an addend: the float32 product
            c = torch.round(w.to(torch.float32) * inv)
            c.clamp_(self.qmin, self.qmax)
            return (c * s32).to(self.cdt)
        # core.scaled_int: fma(x, 1/scale, zp) rounded once to float32, via float64
        y = w.to(torch.float32).to(torch.float64) * inv
        y += z64
        c = torch.round(y.to(torch.float32))
        c.clamp_(self.qmin, self.qmax)
        c -= z32
        c *= s32
        return c.to(self.cdt)


def _check_options(block_size, damp, max_retries, observer, observer_kwargs) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"gptq: block_size must be a positive integer, got {block_size!r}")
    if not isinstance(damp, (int, float)) or isinstance(damp, bool) or not math.isfinite(damp) or damp < 0:
        raise ValueError(f"gptq: damp must be a finite number >= 0 (a fraction of mean(diag H)), got {damp!r}")
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise ValueError(f"gptq: max_retries must be an integer >= 0, got {max_retries!r}")
    if observer not in OBSERVERS:
        raise ValueError(f"gptq: observer must be one of {', '.join(OBSERVERS)}; got {observer!r}")
    if observer == "minmax" and observer_kwargs:
        raise ValueError(f"gptq: observer options {sorted(observer_kwargs)} need observer='percentile' or 'mse'")


def _qparams(blocks, spec, grid, observer, observer_kwargs):
    """(scale, zero_point) per block [rows, groups, 1], as quantize()'s observers choose them."""
    if observer == "minmax":
        lo, hi = minmax_range(blocks)
    elif observer == "percentile":
        lo, hi = percentile_range(blocks, **observer_kwargs)
    else:
        lo, hi = mse_range(blocks, spec, grid, **observer_kwargs)
    return qparams_from_range(lo, hi, spec, grid)


def _block_bounds(n: int, block_size: int, group: int | None) -> list[tuple[int, int]]:
    """Column blocks for the lazy updates. With dynamic groups every group start
    is a block start or lies inside the block holding the whole group, so a
    group's scales see every earlier column's update."""
    if group is None or group <= block_size:
        step = block_size if group is None else block_size // group * group
        return [(i, min(i + step, n)) for i in range(0, n, step)]
    return [(s, min(s + block_size, gs + group, n))
            for gs in range(0, n, group) for s in range(gs, min(gs + group, n), block_size)]


def _inverse_cholesky(h: torch.Tensor, damp: float, max_retries: int):
    """Upper Cholesky factor U of (H + damp * mean(diag H) I)^-1 (so U^T U is that inverse),
    retrying with 10x the damping on failure. Returns (U, damp, retries, absolute damping)."""
    mean_diag = float(torch.diagonal(h).mean())
    d = float(damp)
    tried = []
    for attempt in range(max_retries + 1):
        hd = h.clone()
        hd.diagonal().add_(d * mean_diag)
        # With J the order reversal and J H J = L L^T, H^-1 = (J L^-1 J)^T (J L^-1 J)
        # and J L^-1 J is upper triangular with a positive diagonal: the factor
        # the reference gets from cholesky(cholesky_inverse(cholesky(H)), upper=True),
        # at a third of the cost and without forming H^-1.
        chol, info = torch.linalg.cholesky_ex(hd.flip(0, 1))
        if int(info) == 0:
            u = _lower_inverse(chol).flip(0, 1)
            if bool(torch.isfinite(u).all()) and bool((torch.diagonal(u) > 0).all()):
                return u, d, attempt, d * mean_diag
        tried.append(d)
        d = d * 10 if d > 0 else _FIRST_RETRY_DAMP
    raise ValueError(
        f"gptq: the Hessian is not positive definite even with damping {', '.join(f'{t:g}' for t in tried)} "
        "x mean(diag H); it should be 2/n X^T X of the layer's inputs (symmetric, positive "
        "semi-definite): check how it was built, or raise damp / max_retries"
    )


def _lower_inverse(low: torch.Tensor, block: int = 512) -> torch.Tensor:
    """L^-1 of a lower-triangular L, a block of columns at a time: columns j.. of the
    inverse are zero above row j, so each block solves only L[j:, j:] (n^3 / 3 flops in
    all, against n^3 for one solve with the whole identity as right-hand side)."""
    n = low.shape[0]
    out = torch.zeros_like(low)
    for j in range(0, n, block):
        e = min(j + block, n)
        rhs = torch.zeros(n - j, e - j, dtype=low.dtype, device=low.device)
        rhs.diagonal().fill_(1)
        out[j:, j:e] = torch.linalg.solve_triangular(low[j:, j:], rhs, upper=False)
    return out
