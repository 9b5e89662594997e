"""Run the lowrank step: truncated SVD of each Linear / Conv1D target, a LowRankLinear in its
place where the factors are smaller, then an optional fine-tune.

Rank per layer: the smallest keeping `energy` of the squared singular values, a fixed
`rank`, or the largest within `keep` of the layer's parameters. A layer whose factors
would hold as many parameters as the matrix or more (r (out + in) >= out x in) stays
dense, with the reason in the step's skipped list: trained weights often have flat
spectra, so a high energy threshold can ask for more than the break-even rank.

Evidence: a LayerRecord per factorized layer (format lowrank-r{r}, stored bytes, error =
||W - AB||_F / ||W||_F, note with the energy kept) and, in details["lowrank"], every
analysed layer's rank choice and singular-value energy curve (at most 64 points) for the
report.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from shrink.algos.svd import pays_off, rank_for_budget, rank_for_energy, spectrum, truncated_svd
from shrink.modules import LowRankLinear
from shrink.surgery import Target, replace_module
from shrink.train.loop import finetune

from .context import StepContext
from .install import sqnr
from .records import LayerRecord, StepRecord
from .train_steps import LowRank

CURVE_POINTS = 64


def run_lowrank(work: nn.Module, step: LowRank, targets: list[Target], ctx: StepContext,
                rec: StepRecord) -> nn.Module:
    targets = _factorizable(work, targets, rec)
    criterion, value = _criterion(step)
    if step.rank is not None:   # a fixed rank no layer can take is the recipe's mistake: say so before any work
        for t in targets:
            if step.rank > min(t.out_features, t.in_features):
                raise ValueError(f"lowrank: rank {step.rank} is larger than layer {t.name} "
                                 f"({t.out_features}x{t.in_features}) allows (at most min(out, in) = "
                                 f"{min(t.out_features, t.in_features)}); lower the rank or exclude the layer")
    layers, before, after = [], 0, 0
    for n, t in enumerate(targets, 1):
        t0 = time.perf_counter()
        w = t.weight_view().detach()
        out_f, in_f = t.out_features, t.in_features
        sp = spectrum(w, name=t.name)
        r = _rank(step, sp.s, out_f, in_f)
        entry = {"layer": t.name, "shape": [out_f, in_f], "rank": r, "max_rank": min(out_f, in_f),
                 "break_even": out_f * in_f / (out_f + in_f), **_curve(sp.energy, r)}
        params = out_f * in_f
        before += params
        if r == 0 or not pays_off(out_f, in_f, r):
            why = (f"keep={step.keep:g} allows no rank: rank 1 alone needs {out_f + in_f} of {params} parameters"
                   if r == 0 else
                   f"rank {r} ({criterion} {value:g}) needs r(out+in) = {r * (out_f + in_f):,} parameters, not fewer "
                   f"than the matrix's {params:,} (break-even rank {params / (out_f + in_f):.1f}); left dense")
            rec.skipped.append({"name": t.name, "reason": why})
            layers.append({**entry, "factorized": False, "energy_kept": _kept(sp.energy, r)})
            after += params
            if ctx.report:
                ctx.report(n, len(targets))
            continue
        res = truncated_svd(w, r, name=t.name, spec=sp)
        bias = getattr(t.module, "bias", None)
        new = LowRankLinear.from_factors(res.a, res.b, None if bias is None else bias.detach(),
                                         source="conv1d" if t.kind == "conv1d" else "linear")
        replace_module(work, t.name, new)
        stored = r * (out_f + in_f) * w.element_size()
        after += r * (out_f + in_f)
        layers.append({**entry, "factorized": True, "energy_kept": res.energy_kept,
                       "relative_error": res.relative_error})
        rec.layers.append(LayerRecord(
            name=t.name, shape=(out_f, in_f), format=f"lowrank-r{r}", bytes_fp32=4 * params, bytes_stored=stored,
            error=res.relative_error, error_rtn=None,
            sqnr_db=sqnr(w.float(), (res.a.float() @ res.b.float())), seconds=time.perf_counter() - t0,
            kernel="two matmuls",
            note=f"rank {r} of {min(out_f, in_f)} ({criterion} {value:g}): keeps {100 * res.energy_kept:.2f}% of the "
                 f"squared singular values, {r * (out_f + in_f) / params:.1%} of the weights; error = "
                 "||W - AB||_F / ||W||_F"))
        if ctx.report:
            ctx.report(n, len(targets))
    rec.details["lowrank"] = {"criterion": criterion, "value": value, "layers": layers,
                              "factorized": sum(1 for e in layers if e["factorized"]),
                              "params_before": before, "params_after": after}
    if step.finetune is not None:
        _finetune(work, step, ctx, rec)
    work.eval()
    return work


def _factorizable(work: nn.Module, targets: list[Target], rec: StepRecord) -> list[Target]:
    lowrank = {name for name, m in work.named_modules() if isinstance(m, LowRankLinear)}
    out = []
    for t in targets:
        if t.name.rpartition(".")[0] in lowrank:
            rec.skipped.append({"name": t.name, "reason": "a factor of a layer an earlier lowrank step factorized"})
        elif t.kind == "conv2d":
            rec.skipped.append({"name": t.name, "reason": "Conv2d: lowrank factorizes Linear and Conv1D layers (a "
                                                          "conv would split into a k x k conv to r channels and a "
                                                          "1 x 1 conv, which shrink does not build); left as it is"})
        elif t.kind in ("linear", "conv1d"):
            out.append(t)
        else:
            rec.skipped.append({"name": t.name, "reason": f"{t.kind}: lowrank factorizes dense Linear and Conv1D "
                                                          "layers"})
    if not out:
        raise ValueError("lowrank: no dense Linear or Conv1D layer to factorize (include/exclude matched none, or "
                         "an earlier step replaced them); put lowrank first in the recipe")
    return out


def _criterion(step: LowRank) -> tuple[str, float]:
    if step.rank is not None:
        return "rank", step.rank
    if step.keep is not None:
        return "keep", step.keep
    return "energy", step.energy


def _rank(step: LowRank, s: torch.Tensor, out_f: int, in_f: int) -> int:
    if step.rank is not None:
        return step.rank
    if step.keep is not None:
        return rank_for_budget(out_f, in_f, step.keep)
    return rank_for_energy(s, step.energy)


def _kept(energy: torch.Tensor, r: int) -> float:
    return float(energy[r - 1]) if r >= 1 else 0.0


def _curve(energy: torch.Tensor, r: int, points: int = CURVE_POINTS) -> dict:
    """At most `points` (rank, cumulative energy) pairs, evenly spaced in rank, always with
    rank 1, the chosen rank and the full rank."""
    k = energy.numel()
    if k <= points:
        ranks = list(range(1, k + 1))
    else:
        ranks = sorted({round(1 + i * (k - 1) / (points - 2)) for i in range(points - 1)} | {min(max(r, 1), k)})
    return {"ranks": ranks, "energy": [float(energy[i - 1]) for i in ranks]}


def _finetune(work: nn.Module, step: LowRank, ctx: StepContext, rec: StepRecord) -> None:
    ft = step.finetune
    if ctx.evaluate is not None:
        rec.details["quality_before_finetune"] = ctx.evaluate(work)
    tr = finetune(work, ctx.batches(ft.batch_size, "lowrank"), steps=ft.steps, epochs=ft.epochs, lr=ft.lr,
                  loss=ft.loss, teacher=ctx.original, temperature=ft.temperature, progress=ctx.progress(),
                  seed=ctx.seed, precision=ft.precision, **ctx.engine_options())
    rec.details["training"] = tr.to_dict()
