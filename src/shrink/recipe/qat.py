"""The qat recipe step: wrap the target layers for quantization-aware training
(train/qat.py), train them with the shared loop, freeze the observers after
`freeze_after` of the steps, and convert to QuantLinear / QuantConv2d.

The loss (loss: auto): with labeled batches (the digits classifiers) half cross-entropy
on the labels plus half distillation from the uncompressed model (KL, T^2-scaled); with
unlabeled batches distillation alone (logits, or the last hidden states of an encoder).
Measured on digits-mlp and digits-cnn at int2 per channel and int2-g128 (docs/BENCHMARKS.md,
QAT): the mixed loss was the best of ce, distill and ce+distill in 3 of the 4 settings (by
1 to 5 test images) and 3 images behind ce in the fourth; "ce", "distill", "ce+distill" and
"lm" can be asked for by name.

What trains: the target layers' float weights through their fake quantizers (and their
scales with lsq), and every other trainable float parameter of the model (biases, norms,
layers left float). Ranges: min/max of each block, frozen after `freeze_after` of the steps.

Targets an earlier PTQ step quantized with the same format (gptq, rtn, awq) start from
its codes and scales: QAT refines the PTQ result. Activations fake-quantized in training
(act_bits) run in float after conversion (QuantLinear / QuantConv2d are weight-only); the
step record says so and gives the quality with and without them.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from shrink.data.labeled import split_batch
from shrink.quant import dequantize
from shrink.surgery import Target
from shrink.surgery.capture import call_model
from shrink.train.engine import TrainOptions, train
from shrink.train.loop import distill_loss, has_logits, make_loss, output_tensor, resolve_loss
from shrink.train.qat import QATLayer, convert_qat, freeze_qat, prepare_qat, same_grid

from .context import StepContext
from .install import fmt, sqnr
from .records import LayerRecord, StepRecord
from .train_steps import QAT

CALIBRATION_BATCHES = 8   # batches the activation observers see before training starts


def qat_loss(kind: str, teacher: nn.Module | None, temperature: float, teacher_logits: bool):
    """loss_fn(model, batch) for the engine; "ce+distill" is 0.5 * CE(labels) + 0.5 * T^2 KL."""
    if kind != "ce+distill":
        return make_loss(kind, teacher, temperature, teacher_logits)

    def fn(model: nn.Module, batch) -> torch.Tensor:
        inputs, labels = split_batch(batch)
        out = output_tensor(call_model(model, inputs))
        with torch.no_grad():
            ref = output_tensor(call_model(teacher, inputs))
        ce = F.cross_entropy(out.float().reshape(-1, out.shape[-1]), labels.to(out.device).reshape(-1))
        return 0.5 * ce + 0.5 * distill_loss(out, ref, temperature, logits=True)
    return fn


def choose_loss(step: QAT, model: nn.Module, batch, teacher: nn.Module | None) -> str:
    labeled = split_batch(batch)[1] is not None
    if step.loss == "auto":
        if teacher is not None and labeled and has_logits(teacher, batch):
            return "ce+distill"
        return resolve_loss("auto", model, batch, teacher)
    if step.loss in ("ce", "ce+distill") and not labeled:
        raise ValueError(f"qat: loss {step.loss!r} needs labeled batches (Labeled(inputs, labels)); these have no "
                         "labels: use loss auto or distill")
    if step.loss in ("distill", "ce+distill") and teacher is None:
        raise ValueError(f"qat: loss {step.loss!r} needs the uncompressed model as a teacher")
    return step.loss


def _observe_activations(model: nn.Module, layers: dict[str, QATLayer], batches: list) -> None:
    """Show the activation observers a few batches (the rest of the model in eval mode)."""
    acts = [m.act for m in layers.values() if m.act is not None]
    if not acts:
        return
    model.eval()
    for a in acts:
        a.train()
    try:
        with torch.no_grad():
            for b in batches[:CALIBRATION_BATCHES]:
                call_model(model, split_batch(b)[0])
    finally:
        for a in acts:
            a.eval()


def _start(t: Target, step: QAT) -> str:
    if t.kind in ("quant_linear", "quant_conv2d"):
        if same_grid(t.module.spec, step.spec()):
            return "from the PTQ layer's codes and scales (frozen: QAT refines them)"
        return (f"from the PTQ layer's dequantized weight; its format {fmt(t.module.spec)} differs from "
                f"{fmt(step.spec())}, so ranges were observed afresh")
    if t.kind == "sparse_linear":
        return "from the pruned layer's weights; pruned weights held at zero (stored dense as int codes)"
    return "from the float weights"


def run_qat(work: nn.Module, step: QAT, targets: list[Target], ctx: StepContext, rec: StepRecord) -> nn.Module:
    spec = step.spec()
    if not targets:
        raise ValueError("qat: no layer to train: the model has no Linear, Conv1D or Conv2d layer (or a QuantLinear / "
                         "QuantConv2d from an earlier PTQ step) that include/exclude selected; check the patterns")
    batches = ctx.batches(step.batch_size, "qat")
    teacher = ctx.original
    kind = choose_loss(step, work, batches[0], teacher)
    teacher_logits = kind in ("distill", "ce+distill") and has_logits(teacher, batches[0])
    before = {t.name: t.weight_view().detach().float().clone() for t in targets}
    starts = {t.name: _start(t, step) for t in targets}
    t0 = time.perf_counter()
    layers = prepare_qat(work, targets, spec, act_bits=step.act_bits, lsq=step.lsq)
    _observe_activations(work, layers, batches)
    options = TrainOptions(steps=step.steps, epochs=step.epochs, lr=step.lr, seed=ctx.seed, precision=step.precision,
                           **ctx.engine_options())
    total = options.total_steps(len(batches))
    freeze_at = round(step.freeze_after * total)
    if freeze_at == 0:
        freeze_qat(work)

    def callback(done: int, model: nn.Module) -> None:
        if done == freeze_at:
            freeze_qat(model)

    masks = {m.weight: m.mask for m in layers.values() if m.mask is not None}
    was_training = teacher.training
    teacher.eval()
    try:
        tr = train(work, batches, qat_loss(kind, teacher, step.temperature, teacher_logits), options, masks=masks,
                   progress=ctx.progress(), callback=callback, label=f"qat ({kind})")
    finally:
        teacher.train(was_training)
    freeze_qat(work)   # a run that stopped before freeze_at (or freeze_after 1) fixes its last ranges
    details = {"training": tr.to_dict(), "loss": kind, "freeze_step": freeze_at, "lsq": step.lsq,
               "act_bits": step.act_bits, "format": fmt(spec)}
    if step.act_bits is not None:
        details["activations"] = {n: m.act.describe() for n, m in layers.items()}
        details["activations_note"] = ("activations were fake-quantized to int"
                                       f"{step.act_bits} (per tensor) in training; the converted QuantLinear / "
                                       "QuantConv2d layers are weight-only, so activations run in float after "
                                       "conversion")
        if ctx.evaluate is not None:
            details["quality_fake_quant_activations"] = ctx.evaluate(work)
    per = (time.perf_counter() - t0) / len(targets)
    new = convert_qat(work)
    for t in targets:
        q = new[t.name]
        w0 = before[t.name]
        w = dequantize(q.to_qtensor()).float().reshape(w0.shape)
        note = (f"QAT {starts[t.name]}; {'learned step sizes (LSQ)' if step.lsq else f'ranges frozen at step {freeze_at}'}"
                "; error = weight MSE to the weights before QAT (training moves them: not a quality measure)")
        if getattr(q, "kernel_reason", None):
            note += f"; kernel fallback: {q.kernel_reason}"
        rec.layers.append(LayerRecord(name=t.name, shape=(t.out_features, t.in_features), format=fmt(spec),
                                      bytes_fp32=4 * w0.numel(), bytes_stored=q.nbytes,
                                      error=float(((w - w0.to(w.device)) ** 2).mean()), error_rtn=None,
                                      sqnr_db=sqnr(w0.to(w.device), w), seconds=per, kernel=q.kernel, note=note))
    rec.details.update(details)
    work.eval()
    return work
