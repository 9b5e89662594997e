"""GPTQ in one pass per block: each layer is quantized when the block's forward reaches it.

The two-pass way (recipe/run.py `_gptq`) runs a block once with float weights to
collect every layer's Hessian, solves them all, then runs the block again with the
quantized layers to make the next block's inputs. Here the calibration batches are
joined into one batch and the block runs once: a forward pre-hook on each target
takes the input the layer is about to see (the quantized layers before it in the
block already made it), accumulates its Hessian, solves GPTQ, and makes that very
call use the quantized weight (a float forward of the dequantized weight). The
block's output is then the next block's input. That is the reference GPTQ's
"true sequential" order (later layers of a block are fitted to the earlier layers'
quantized outputs) at the cost of one forward pass instead of two.

Layers called one after another on the same input tensor (q/k/v, gate/up) are solved
together on one Hessian: which ones are is learnt in the first block of each layer type (there each
is solved alone, the same rows either way) and kept in the checkpoint, so a resumed
run groups them as the uninterrupted one did. A layer grouped ahead of its call is
held back until its own call brings the very same input tensor; otherwise it is
solved again on what it got.

It needs every calibration row in memory at once, through the widest layer of a
block: `join_batches` joins only batches of the same shape, and only within a fixed
byte budget (plan/jobmem.py's one_pass_bytes and ONE_PASS_BUDGET, which the job
memory plan uses too), so the choice depends on the model and the data alone, never
on the machine: two runs give the same bytes. SHRINK_GPTQ_ONEPASS=0 turns the mode
off, =1 lifts the budget. Otherwise the run takes the two-pass way.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from shrink.algos import rtn
from shrink.modules.quant_linear import QuantLinear
from shrink.observe import HessianObserver
from shrink.plan.jobmem import ONE_PASS_BUDGET, one_pass_bytes
from shrink.quant import QTensor, QuantSpec, dequantize

from .hessians import gptq_shared
from .install import fmt as _fmt, install as _install, sparse_pattern

ENV = "SHRINK_GPTQ_ONEPASS"


def _rows(batch) -> int | None:
    """Rows (tokens) a batch feeds the model: token ids count each id, float inputs each vector."""
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 0:
            return None
        return batch.numel() if not batch.is_floating_point() else batch.numel() // batch.shape[-1]
    if isinstance(batch, dict):
        for k in ("input_ids", "inputs_embeds", "pixel_values"):
            if isinstance(batch.get(k), torch.Tensor):
                return _rows(batch[k])
        return None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return _rows(batch[0])
    return None


def _cat(parts: list):
    """Batches of one structure joined along dim 0, or None where they differ."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        if not all(isinstance(p, torch.Tensor) and p.dim() == first.dim() >= 1 and p.shape[1:] == first.shape[1:]
                   and p.dtype == first.dtype and p.device == first.device for p in parts):
            return None
        return torch.cat(parts)
    if isinstance(first, dict):
        if not all(isinstance(p, dict) and p.keys() == first.keys() for p in parts):
            return None
        out = {}
        for k in first:
            vals = [p[k] for p in parts]
            if isinstance(vals[0], torch.Tensor):
                out[k] = _cat(vals)
                if out[k] is None:
                    return None
            elif all(v == vals[0] for v in vals):
                out[k] = vals[0]
            else:
                return None
        return out
    if isinstance(first, (tuple, list)):
        if not all(type(p) is type(first) and len(p) == len(first) for p in parts):
            return None
        cols = [_cat([p[j] for p in parts]) for j in range(len(first))]
        return None if any(c is None for c in cols) else type(first)(cols)
    return None


def join_batches(batches: list, widest: int) -> tuple[list | None, str]:
    """([one batch], why) when the batches can run as one within the memory budget, else (None, why)."""
    mode = os.environ.get(ENV, "").strip()
    if mode == "0":
        return None, f"{ENV}=0"
    rows = [_rows(b) for b in batches]
    if any(r is None for r in rows):
        return None, "calibration batches of a kind whose size cannot be told"
    need = one_pass_bytes(sum(rows), widest)
    if mode != "1" and need > ONE_PASS_BUDGET:
        return None, (f"one pass over the {sum(rows):,} calibration rows ({len(batches)} batches) would need ~"
                      f"{need / 2**30:.2f} GiB of activations, over the {ONE_PASS_BUDGET / 2**30:g} GiB "
                      f"budget ({ENV}=1 lifts it)")
    if len(batches) == 1:
        return list(batches), "one calibration batch"
    joined = _cat(list(batches))
    if joined is None:
        return None, "calibration batches of different shapes cannot be joined"
    return [joined], f"{len(batches)} calibration batches joined into one"


def eligible(targets) -> bool:
    """Plain Linear / Conv1D layers only (no conv patches, no pruned patterns to keep)."""
    return bool(targets) and all(t.kind in ("linear", "conv1d") and sparse_pattern(t) is None for t in targets)


def float_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 mm: torch.dtype | None = None) -> torch.Tensor:
    """x @ weight^T + bias as the one-pass forward computes it: in x's dtype, or with the
    matmul in `mm` (x and weight rounded to it; the result back in x's dtype, then the bias)."""
    if mm is None or x.dtype == mm or not x.is_floating_point():
        return nn.functional.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    y = nn.functional.linear(x.to(mm), weight.to(mm)).to(x.dtype)
    return y if bias is None else y + bias.to(x.dtype)


def matmul_dtype(step) -> torch.dtype | None:
    """The dtype of the GPTQ step's one-pass matmuls (None: the model's own)."""
    return None if step.matmul_dtype == "float32" else getattr(torch, step.matmul_dtype)


def _float_forward(weight: torch.Tensor, bias: torch.Tensor | None, mm: torch.dtype | None):
    if mm is not None:
        weight = weight.to(mm)   # cast once, not at every call

    def forward(x: torch.Tensor) -> torch.Tensor:
        return float_linear(x, weight, bias, mm)
    return forward


@contextmanager
def float_replay(block: nn.Module, mm: torch.dtype | None = None) -> Iterator[None]:
    """Run the block's QuantLinears as a float forward of their dequantized weights, the
    forward the one-pass solver gave them in the uninterrupted run (a resumed run's replay)."""
    done = []
    try:
        for m in block.modules():
            if type(m) is QuantLinear:
                m.forward = _float_forward(m.dequantized_weight(), m.bias, mm)
                done.append(m)
        yield
    finally:
        for m in done:
            del m.forward


class OnePassGPTQ:
    """The on_input callback of SequentialRunner.run(inline=True) and its process_block."""

    def __init__(self, model: nn.Module, step, spec: QuantSpec, runner, rec, report, done: list,
                 total: int, groups: dict | None = None):
        self.model, self.step, self.spec, self.runner = model, step, spec, runner
        self.rec, self.report, self.done, self.total = rec, report, done, total
        self.mm = matmul_dtype(step)
        # layer key -> groups of names relative to the block that share an input
        self.groups: dict[str, list[list[str]]] = dict(groups or {})
        self._by_name = {t.name: (i, t) for i, ts in enumerate(runner.block_targets) for t in ts}
        # A forward pre-hook cannot change the function the call runs (nn.Module binds it
        # first), so every target runs this forward, on the weight the hook settled on.
        self.live: dict[str, tuple] = {}
        for _, t in self._by_name.values():
            t.module.forward = self._forward_of(t.name)
        self._reset()

    def _forward_of(self, name: str):
        def forward(x: torch.Tensor) -> torch.Tensor:
            w, b = self.live[name]
            return float_linear(x, w, b, self.mm)
        return forward

    def close(self) -> None:
        """Give every target not yet installed its own forward back (after a failure)."""
        for _, t in self._by_name.values():
            t.module.__dict__.pop("forward", None)

    def _reset(self) -> None:
        self.solved: dict[str, tuple] = {}     # name -> (qt, err, err_rtn, seconds, note)
        self.held: dict[str, tuple] = {}       # name -> (input tensor, its version, solved tuple)
        # Groups seen in this block: consecutive calls on the very same input tensor
        # (only the last input is held, so no activation outlives its layer's call).
        self.seen: list[list[str]] = []
        self.last: torch.Tensor | None = None
        self.last_version, self.last_h = -1, None

    def _rel(self, i: int, name: str) -> str:
        return name[len(self.runner.block_names[i]) + 1:]

    def _siblings(self, i: int, t) -> list:
        rel = self._rel(i, t.name)
        for g in self.groups.get(str(self.runner.keys[i]), []):
            if rel in g:
                prefix = self.runner.block_names[i] + "."
                names = [prefix + r for r in g]
                return [self._by_name[n][1] for n in names
                        if n in self._by_name and n != t.name and n not in self.solved]
        return []

    def __call__(self, name: str, x: torch.Tensor) -> None:
        if name in self.solved:   # called again within the block: already quantized
            return
        i, t = self._by_name[name]
        shared = x is self.last and x._version == self.last_version
        if shared:
            self.seen[-1].append(name)
        else:
            self.seen.append([name])
            self.last, self.last_version, self.last_h = x, x._version, None
        got = self.held.pop(name, None)
        if got is not None and got[0] is x and got[1] == x._version:
            self._use(t, got[2])
            return
        group = [t] + self._siblings(i, t)
        t0 = time.perf_counter()
        if self.last_h is None:   # layers called on the same input share its Hessian
            obs = HessianObserver(t.in_features)
            obs.observe(x)
            self.last_h = obs.hessian()
        res, solved = gptq_shared(group, self.last_h, self.spec, self.step)
        per = (time.perf_counter() - t0) / len(group)
        for m, qt, err, err_rtn in solved:
            note = "one pass: solved on the inputs the block's earlier quantized layers give it"
            if len(group) > 1:
                note += "; shares its input: solved with " + ", ".join(o.name for o in group if o is not m)
            elif shared:
                note += f"; shares its input (and Hessian) with {', '.join(self.seen[-1][:-1])}"
            if res.retries:
                note += f"; Cholesky retried {res.retries}x, damp {res.damp_used:g}"
            got = (qt, err, err_rtn, per, note)
            if m is t:
                self._use(t, got)
            else:
                self.held[m.name] = (x, x._version, got)

    def _use(self, t, got: tuple) -> None:
        qt: QTensor = got[0]
        self.solved[t.name] = got
        bias = getattr(t.module, "bias", None)
        # This call and the rest of the pass see the quantized layer, as float math.
        self.live[t.name] = (dequantize(qt).to(self.mm or t.weight_view().dtype),
                             None if bias is None else bias.detach())
        self.done[0] += 1
        if self.report:
            self.report(self.done[0], self.total)

    def process_block(self, i: int, block: nn.Module, targets: list) -> None:
        """After block i's pass: learn its groups, install its layers (RTN for any never called)."""
        key = str(self.runner.keys[i])   # str: the groups go through a JSON checkpoint
        if key not in self.groups:
            self.groups[key] = [[self._rel(i, n) for n in g] for g in self.seen if len(g) > 1]
        for t in targets:
            got = self.solved.get(t.name)
            if got is None:
                qt = rtn(t.weight_view().detach(), self.spec).qtensor
                w = t.weight_view().detach().float()
                got = (qt, float(((dequantize(qt).float() - w) ** 2).mean()), None, 0.0,
                       "never called while the block ran on the calibration data: RTN")
                self.done[0] += 1
            t.module.__dict__.pop("forward", None)
            self.live.pop(t.name, None)
            qt, err, err_rtn, per, note = got
            _install(self.model, t, qt, self.rec, _fmt(self.spec), err, err_rtn, per, note)
        self._reset()


def run_one_pass(model: nn.Module, step, targets: list, batches: list, rec, report, sc=None):
    """GPTQ of `targets` in one pass per block; returns the runner, or None (and nothing
    changed) where the step must take the two-pass way (see join_batches, eligible)."""
    from shrink.surgery import SequentialRunner

    from .resume import block_hooks

    if not step.true_sequential or not targets:   # none left: a resumed run past its last block
        return None
    mm = matmul_dtype(step)
    unused = (f"; matmul_dtype {step.matmul_dtype} not applied (it is for the one-pass forward)"
              if mm is not None else "")
    if not eligible(targets):
        rec.details["gptq_pass"] = ("two passes per block: true_sequential takes plain Linear / Conv1D layers only"
                                    + unused)
        return None
    joined, why = join_batches(batches, max(max(t.in_features, t.out_features) for t in targets))
    if joined is None:
        rec.details["gptq_pass"] = f"two passes per block: {why}{unused}"
        return None
    runner = SequentialRunner(model, targets=targets)
    done = [0]
    resumed = sc.resumed.pos.get("groups") if sc is not None and sc.resumed is not None else None
    solver = OnePassGPTQ(model, step, step.spec(), runner, rec, report, done, len(targets), resumed)
    start, after = block_hooks(sc, runner, done, extra=lambda: {"groups": solver.groups})
    rec.details["gptq_pass"] = f"one pass per block: {why}" + (
        f"; the target layers' matmuls in {step.matmul_dtype}" if mm is not None else "")
    try:
        runner.run(joined, solver.process_block, on_input=solver, start=start, after_block=after, inline=True,
                   replay=lambda block: float_replay(block, mm))
    finally:
        solver.close()
    return runner
