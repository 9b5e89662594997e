"""Layer Hessians for the recipe steps, Linear and Conv2d targets alike.

A Linear's Hessian is 2/n sum x x^T over its input rows. A Conv2d is a Linear
applied to every patch of its input, so its Hessian is taken over the patches
(`surgery.conv_patches`), in `Target.weight_view()`'s column order.

A grouped conv (groups > 1) has no single Hessian: filter group g reads only
its own in_channels/groups input channels. It gets one Hessian per group, each
serving its rows g*out/groups .. (g+1)*out/groups - 1 of weight_view(); the
steps solve and measure the groups separately and stitch the rows together
(`stack_rows`), which for per-channel and per-group specs is exactly the
layer's QTensor.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from shrink.algos import gptq
from shrink.formats import pack_bits
from shrink.observe import GramCache, HessianObserver
from shrink.quant import QTensor, QuantSpec, dequantize, quantize
from shrink.surgery import Target, conv_patches


class HessianCollector:
    """on_input callback for SequentialRunner: feeds each target's inputs (a conv's
    patches, per filter group) to its observers; `hessians(name)` -> one [in, in]
    matrix per row group (a list of one for a Linear or an ungrouped conv)."""

    def __init__(self, targets: list[Target]):
        self._convs = {t.name: _geometry(t.module) for t in targets if t.kind in ("conv2d", "sparse_conv2d")}
        self.observers: dict[str, list[HessianObserver]] = {}
        self._cache = GramCache()  # q/k/v (gate/up) see one input tensor: one X^T X for them all

    def __call__(self, name: str, x: torch.Tensor) -> None:
        x = x.detach()
        conv = self._convs.get(name)
        rows = [x] if conv is None else [conv_patches(x, conv, group=g) for g in range(conv.groups)]
        obs = self.observers.get(name)
        if obs is None:
            obs = self.observers[name] = [HessianObserver(r.shape[-1], cache=self._cache) for r in rows]
        for o, r in zip(obs, rows):
            o.observe(r)

    def __contains__(self, name: str) -> bool:
        return name in self.observers

    def hessians(self, name: str) -> list[torch.Tensor]:
        return [o.hessian() for o in self.observers[name]]

    def pop(self, name: str) -> None:
        self.observers.pop(name, None)


def _geometry(mod: nn.Module) -> nn.Conv2d:
    """The nn.Conv2d whose patches the layer reads: the layer itself, or for a pruned
    SparseConv2d a weightless (meta) nn.Conv2d of its geometry (conv_patches reads only that)."""
    if isinstance(mod, nn.Conv2d):
        return mod
    return nn.Conv2d(mod.in_channels, mod.out_channels, mod.kernel_size, stride=mod.stride, padding=mod.padding,
                     dilation=mod.dilation, groups=mod.groups, bias=False, padding_mode=mod.padding_mode,
                     device="meta")


def row_parts(out_features: int, n: int) -> list[slice]:
    """The row slices of n equal row groups (a grouped conv's filter groups)."""
    per = out_features // n
    return [slice(g * per, (g + 1) * per) for g in range(n)]


def hessian_error(w: torch.Tensor, q: torch.Tensor, hs: list[torch.Tensor]) -> float:
    """sum over row groups of tr((W - Q) H (W - Q)^T): the layer's output error proxy.
    A record, not an input to any solve: the product runs in float32 (relative error
    ~1e-6, at twice float64's speed: two per layer cost as much as the GPTQ solve in
    float64), the sum in float64."""
    total = 0.0
    for rows, h in zip(row_parts(w.shape[0], len(hs)), hs):
        e = (w[rows] - q[rows]).float()
        total += float(((e @ h.to(e.dtype)) * e).sum(dtype=torch.float64))
    return total


def stack_rows(parts: list[QTensor], spec: QuantSpec) -> QTensor:
    """QTensors of consecutive row groups (per-channel or per-group scales) as one, codes unchanged."""
    if len(parts) == 1:
        return parts[0]
    if spec.granularity not in ("channel", "group"):
        raise ValueError(f"stack_rows: row groups stitch only under per-channel or per-group scales, not {spec}")
    w = torch.cat([dequantize(p) for p in parts])
    scale = torch.cat([p.scale for p in parts])
    zp = None if parts[0].zero_point is None else torch.cat([p.zero_point for p in parts])
    whole = quantize(w, spec, scale=scale, zero_point=zp)
    if not torch.equal(whole.int_codes(), torch.cat([p.int_codes() for p in parts])):  # same grid: exact
        raise RuntimeError("stitching separately solved row groups changed their codes")
    return whole


def gptq_row_groups(w: torch.Tensor, hs: list[torch.Tensor], spec: QuantSpec, **options) -> tuple[QTensor, list]:
    """GPTQ of w's row groups, each on its own Hessian (one Hessian: the whole layer),
    stitched into one QTensor; also returns each group's result (retries, damping)."""
    parts = [gptq(w[rows], h, spec, **options) for rows, h in zip(row_parts(w.shape[0], len(hs)), hs)]
    return stack_rows([p.qtensor for p in parts], spec), parts


def split_rows(qt: QTensor, start: int, stop: int, spec: QuantSpec) -> QTensor:
    """Rows [start, stop) of a per-channel or per-group QTensor, codes unchanged."""
    lay = qt.layout
    if lay.axis == 0 and qt.grid.bits <= 8 and qt.scale is not None and qt.scale.dim() >= 1:
        # Codes are stored row by row (channel axis first): the rows' codes are one
        # contiguous run, repacked as they are; the scales are the same rows.
        codes = qt.stored_codes()[start * lay.inner: stop * lay.inner]
        return dataclasses.replace(
            qt, data=pack_bits(codes, qt.grid.bits), shape=torch.Size((stop - start, *qt.shape[1:])),
            scale=qt.scale[start:stop], zero_point=None if qt.zero_point is None else qt.zero_point[start:stop])
    w = dequantize(qt)[start:stop]
    scale = qt.scale[start:stop]
    zp = None if qt.zero_point is None else qt.zero_point[start:stop]
    part = quantize(w, spec, scale=scale, zero_point=zp)
    if not torch.equal(part.int_codes(), qt.int_codes()[start:stop]):  # the grid is the same: exact
        raise RuntimeError("splitting a jointly solved weight changed its codes")
    return part


def gptq_shared(group: list[Target], h: torch.Tensor, spec: QuantSpec, step, mask: torch.Tensor | None = None):
    """GPTQ of the layers of `group` (one input, so one Hessian h) as one stacked weight:
    (result, [(target, its QTensor, error, error of RTN)] in group order). step: the recipe's
    GPTQ step (its options); mask: the stacked weights' kept entries (masked GPTQ)."""
    w = torch.cat([t.weight_view().detach().float() for t in group])
    res = gptq(w, h, spec, block_size=step.block_size, damp=step.damp, act_order=step.act_order,
               static_groups=step.static_groups, observer=step.observer, mask=mask)
    out, row = [], 0
    for t in group:
        qt = split_rows(res.qtensor, row, row + t.out_features, spec)
        row += t.out_features
        wt = t.weight_view().detach().float()
        out.append((t, qt, hessian_error(wt, dequantize(qt).float(), [h]),
                    hessian_error(wt, dequantize(quantize(wt, spec)).float(), [h])))
    return res, out
