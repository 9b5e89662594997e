"""SparseGPT: one-shot pruning with Optimal-Brain-Surgeon weight updates
(Frantar & Alistarh 2023), optionally pruning and quantizing in the same sweep.

For the layer error ||W X - W' X||_F^2 with H = 2/n X X^T, columns are visited in
order; column i's value after pruning (0) or rounding (q) differs from its current
value by w_i - q_i, and e_i = (w_i - q_i) / U_ii is spread over the columns still
free as W[:, j] -= e_i U[i, j], U the upper Cholesky factor of H^-1: the GPTQ
sweep with zeros in place of some roundings. Which weights become zeros:

- unstructured: at the start of each column block, the block's share of the
  pruned count goes to the lowest w^2 / U_ii^2 of the block (over all its rows at
  once, as the reference: rows may end with different sparsities). Blocks see the
  updates from earlier blocks, not the ones made inside themselves;
- N:M: at every M-th column, each row keeps the N highest w^2 / U_ii^2 of the next
  M columns, which have received every earlier error.

Kept as in the reference: dead inputs (H_ii == 0) get H_ii = 1 and weight 0 (they
are pruned first: score 0); relative damping `damp` x mean(diag H), a failed
Cholesky retried with 10x (shrink.algos.gptq's factorization and retries); error
feedback inside a block column by column and across blocks in one matmul.

Where it differs, on purpose:
- the pruned count is exact: block b prunes round(s x out x i2) - round(s x out x i1)
  weights (columns i1..i2), so the layer loses exactly round(s x numel); the
  reference's threshold "<= the int(s x numel)-th score" prunes one more, plus ties.
  Ties go to the lower flat index of the block;
- the reference's N is the number pruned; here, as everywhere in shrink, N is the
  number kept ("2:4" is the same pattern either way);
- blocks are cut at multiples of M (block_size is rounded down to one, at least M);
  with quantization groups they are also aligned to groups as in gptq;
- with a spec (joint sparsify + quantize, the paper's 2:4 + 4-bit), kept weights are
  rounded with shrink.quant's own encode/decode inside the sweep (gptq's column
  coder) and their rounding error is fed back like a pruning error; scales per
  channel or tensor come from the original weight, per-group scales from the
  group's updated weights when its first column is reached (gptq's dynamic groups).
  Pruned weights are stored as the code of 0, so dequantize(qtensor) is exactly 0
  there (a grid without 0, e.g. a codebook lacking it, is refused);
- the loss is tr((W - W') H (W - W')^T) with the caller's H (damping taken out), the
  quantity rtn/gptq report and layer_loss() computes for any candidate W'.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable

import torch

from shrink.algos.gptq import OBSERVERS, _block_bounds, _ColumnCoder, _inverse_cholesky, _qparams
from shrink.algos.magnitude import _prune_lowest, check_sparsity, check_tensor
from shrink.algos.nm import check_pattern, nm_mask
from shrink.algos.rtn import check_hessian, check_weight, hessian_loss
from shrink.quant import QTensor, QuantSpec, dequantize, quantize
from shrink.quant.blocks import layout_for


@dataclasses.dataclass(frozen=True, eq=False)
class SparseGPTResult:
    """weight        float32 [out, in]: the surviving weights after the OBS updates (and
                  rounding, with a spec); exactly 0 where mask is False
    mask          bool [out, in], True = kept
    loss          tr((W - weight) H (W - weight)^T) with the caller's H: = 2/n ||W X - W' X||^2,
                  directly comparable with layer_loss() of magnitude or Wanda masks and
                  with rtn/gptq's QuantResult.loss
    qtensor       with a spec: the codes; dequantize(qtensor) equals weight (cast to the
                  input weight's dtype, which is the QTensor's), 0 at every pruned entry
    damp_used     relative damping that let the Cholesky succeed (fraction of mean diag H)
    retries       failed factorizations before that one (x10 damping each)
    dead_columns  inputs with H_ii == 0 (weight 0, pruned first)
    seconds       wall time
    """

    weight: torch.Tensor
    mask: torch.Tensor
    loss: float
    qtensor: QTensor | None = None
    damp_used: float = 0.0
    retries: int = 0
    dead_columns: int = 0
    seconds: float = 0.0


def layer_loss(w: torch.Tensor, w_new: torch.Tensor, hessian: torch.Tensor, *, name: str = "weight") -> float:
    """tr((W - W') H (W - W')^T) in float64 for W, W' [out, in] and H [in, in] (= 2/n X X^T:
    2/n ||W X - W' X||_F^2): the proxy every pruning or quantization result is compared by."""
    check_tensor(w, name, dims=2)
    check_tensor(w_new, name, dims=2, what="new weight")
    if w_new.shape != w.shape:
        raise ValueError(f"{name}: new weight has shape {tuple(w_new.shape)}, the weight {tuple(w.shape)}")
    _check_h(hessian, w.shape[1], name)
    return hessian_loss(w.detach(), w_new.detach(), hessian.detach())


def sparsegpt(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float | None = None,
    *,
    pattern: tuple[int, int] | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    spec: QuantSpec | None = None,
    observer: str = "minmax",
    max_retries: int = 4,
    progress: Callable[[int, int], None] | None = None,
    name: str = "weight",
) -> SparseGPTResult:
    """Prune a Linear weight [out, in] given H = 2/n X X^T of its inputs ([in, in], float64
    as shrink.observe.HessianObserver gives it): unstructured (`sparsity` in [0, 1),
    exactly round(sparsity x numel) pruned) or N:M (`pattern`=(n kept, m)); exactly one.
    spec: also quantize the kept weights in the same sweep (any channel/group/tensor
    QuantSpec whose grid holds 0); observer chooses its scales ("minmax", "percentile",
    "mse", defaults). damp / max_retries: as gptq. progress(done, total) after each block.
    """
    start = time.perf_counter()
    check_tensor(weight, name, dims=2)
    _check_h(hessian, weight.shape[1], name)
    if (sparsity is None) == (pattern is None):
        raise ValueError(f"{name}: give exactly one of sparsity (unstructured) or pattern (N:M, e.g. (2, 4))")
    out, n = weight.shape
    if pattern is not None:
        if not isinstance(pattern, (tuple, list)) or len(pattern) != 2:
            raise ValueError(f"{name}: pattern must be (n, m) such as (2, 4), got {pattern!r}")
        keep_n, m = check_pattern(pattern[0], pattern[1], name)
        if n % m:
            raise ValueError(f"{name}: {keep_n}:{m} needs in_features divisible by {m}, got {n}; "
                             "prune this layer unstructured or leave it dense")
        s = None
    else:
        s, keep_n, m = check_sparsity(sparsity, name), 1, 1
    _check_options(name, block_size, damp, max_retries, observer, spec, weight)
    cdt = torch.float64 if weight.dtype == torch.float64 else torch.float32
    nm = pattern is not None and keep_n < m
    grid = spec.grid() if spec is not None else None
    grouped = spec is not None and spec.has_scale and spec.granularity == "group"
    g = spec.group_size if grouped else n
    if grouped and nm and g % m:
        raise ValueError(f"{name}: quantization group_size {g} must be a multiple of M={m} for {keep_n}:{m} "
                         "(each N:M group must fall inside one quantization group)")

    with torch.no_grad():
        h = hessian.detach().to(torch.float64, copy=True)
        dead = torch.diagonal(h) == 0
        h[dead, :] = 0  # a Gram matrix with a zero diagonal entry has that row and column zero
        h[:, dead] = 0
        h[dead, dead] = 1
        w0 = weight.detach().to(cdt, copy=True)
        w0[:, dead] = 0

        scale = zp = coder = None
        if spec is not None:
            lay = layout_for(w0.shape, spec)
            if spec.has_scale:
                if grouped:  # filled group by group from the updated weights
                    scale = torch.empty(out, lay.groups, dtype=spec.scale_dtype, device=w0.device)
                    zp = torch.empty_like(scale) if spec.has_zero_point else None
                else:
                    sc, z = _qparams(lay.to_blocks(w0), spec, grid, observer, {})
                    scale, zp = sc[..., 0], (None if z is None else z[..., 0])
            coder = _ColumnCoder(spec, grid, scale, zp, cdt, g if grouped else None)

        try:
            u, damp_used, retries, lam = _inverse_cholesky(h, damp, max_retries)
        except ValueError as err:
            raise ValueError(f"{name}: sparsegpt: {str(err).removeprefix('gptq: ')}") from None
        u = u.to(cdt)

        wt = w0.t().clone(memory_format=torch.contiguous_format)  # [in, out]: a column is one row
        q = torch.empty_like(wt)  # each column's final value (0 where pruned)
        keep = torch.ones(wt.shape, dtype=torch.bool, device=wt.device)
        err_sq = torch.zeros((), dtype=torch.float64, device=wt.device)
        step = max(m, block_size // m * m)
        for i1, i2 in _block_bounds(n, step, g if grouped else None):
            u1 = u[i1:i2, i1:i2]
            d = torch.diagonal(u1)
            w1, k1, e1 = wt[i1:i2], keep[i1:i2], torch.empty(i2 - i1, out, dtype=cdt, device=wt.device)
            if s is not None:
                quota = round(s * out * i2) - round(s * out * i1)
                if quota > 0:  # the block's share, ranked over [out, block] in row-major order
                    score = (w1 / d[:, None]).square().t().reshape(-1)
                    k1.copy_(_prune_lowest([score], quota)[0].reshape(out, i2 - i1).t())
            k0 = 0  # errors e1[k0:i] are still pending for the block's columns i..
            for i in range(i2 - i1):
                j = i1 + i
                new_group = grouped and j % g == 0
                new_nm = nm and i % m == 0
                if (new_group or new_nm) and i > k0:  # decisions need fully updated columns
                    w1[i:] -= u1[k0:i, i:].t() @ e1[k0:i]
                    k0 = i
                if new_nm:
                    score = (w1[i:i + m] / d[i:i + m, None]).square()
                    k1[i:i + m] = nm_mask(score.t(), keep_n, m, name=name).t()
                if new_group:
                    sc, z = _qparams(wt[j:min(j + g, n)].t().unsqueeze(1), spec, grid, observer, {})
                    scale[:, j // g] = sc[:, 0, 0]
                    if zp is not None:
                        zp[:, j // g] = z[:, 0, 0]
                    coder.refresh(j // g)
                if i > k0:
                    w1[i] -= u1[k0:i, i] @ e1[k0:i]
                qj = w1[i] if coder is None else coder(w1[i], j)
                qj = torch.where(k1[i], qj, torch.zeros((), dtype=cdt, device=wt.device))
                q[j] = qj
                torch.div(w1[i] - qj, u1[i, i], out=e1[i])
            err_sq += e1.square().sum(dtype=torch.float64)
            if i2 < n:
                wt[i2:].addmm_(u[i1:i2, i2:].t(), e1, alpha=-1)
            if progress is not None:
                progress(i2, n)

        # sum e^2 is the damped objective tr(D (H + lam I) D^T), D = W0 - W'; take the damping out
        loss = float(err_sq) - lam * float((w0.t() - q).square().sum(dtype=torch.float64))
        mask = keep.t().contiguous()
        qt = None
        if spec is None:
            new_w = q.t().to(torch.float32).contiguous()
        else:
            # wt holds each column as it was rounded; pruned entries become the code of 0
            vals = torch.where(keep, wt, torch.zeros((), dtype=cdt, device=wt.device)).t().contiguous()
            params = {}
            if scale is not None:
                params = {"scale": scale.reshape(lay.param_shape),
                          "zero_point": None if zp is None else zp.reshape(lay.param_shape)}
            qt = quantize(vals, spec, **params)
            new_w = dequantize(dataclasses.replace(qt, dtype=torch.float32))
            if bool((new_w[~mask] != 0).any()):
                raise ValueError(f"{name}: the quantization grid of {spec.format!r} has no exact 0, so pruned "
                                 "weights cannot be stored; use an integer / nf4 / fp8 spec (or a codebook holding 0)")
            qt = dataclasses.replace(qt, dtype=weight.dtype)

    return SparseGPTResult(weight=new_w, mask=mask, loss=loss, qtensor=qt, damp_used=damp_used,
                           retries=retries, dead_columns=int(dead.sum()), seconds=time.perf_counter() - start)


def _check_h(hessian, in_features: int, name: str) -> None:
    if not isinstance(hessian, torch.Tensor) or not hessian.is_floating_point():
        raise ValueError(f"{name}: hessian must be a float [in, in] tensor (2/n X^T X of the layer's inputs), "
                         f"got {getattr(hessian, 'dtype', type(hessian).__name__)}")
    check_hessian(hessian, in_features, name)


def _check_options(name, block_size, damp, max_retries, observer, spec, weight) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"{name}: block_size must be a positive integer, got {block_size!r}")
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not math.isfinite(damp) or damp < 0:
        raise ValueError(f"{name}: damp must be a finite number >= 0 (a fraction of mean(diag H)), got {damp!r}")
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise ValueError(f"{name}: max_retries must be an integer >= 0, got {max_retries!r}")
    if observer not in OBSERVERS:
        raise ValueError(f"{name}: observer must be one of {', '.join(OBSERVERS)}; got {observer!r}")
    if spec is not None:
        if not isinstance(spec, QuantSpec):
            raise ValueError(f"{name}: spec must be a QuantSpec or None, got {type(spec).__name__}")
        check_weight(weight, spec, name)
