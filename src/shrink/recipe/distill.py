"""Run the distill step: build the student (from the model as the earlier steps left it:
narrower, fewer layers, a saved model, or that model itself), teach it from the original
model given to compress, and leave the student as the recipe's model.

Recorded in the step's details: how the student was made, its parameters against the
teacher's, the layer map, modules re-initialized to re-wire a shortened Sequential, whether
a transformers config still describes it, the resolved alpha / temperature / kind, the
student's quality before and after training, and the training record (loss curve,
evaluations every tenth of the run).
"""
from __future__ import annotations

from torch import nn

from shrink.train.distill import distill, setup
from shrink.train.engine import TrainOptions
from shrink.train.students import Student, build_student, n_params

from .context import StepContext
from .records import StepRecord
from .train_steps import Distill


def _same_shapes(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape for k in sa)


def run_distill(work: nn.Module, step: Distill, ctx: StepContext, rec: StepRecord) -> nn.Module:
    teacher = ctx.original
    batches = ctx.batches(step.batch_size, "distill")
    if step.student is None:
        student = Student(work, "the model itself")   # as the recipe left it, trained in place
    else:
        student = build_student(work, step.student, ctx.seed)
    if student.kept and not _same_shapes(work, teacher):
        student.kept = {}   # narrowed from a model an earlier step changed: its units are not the teacher's
    cfg = setup(student.model, teacher, batches[0], temperature=step.temperature, alpha=step.alpha,
                hidden_loss=step.hidden_loss, hidden_weight=step.hidden_weight, layer_map=student.layer_map)
    options = TrainOptions(steps=step.steps, epochs=step.epochs, lr=step.lr, seed=ctx.seed, precision=step.precision,
                           eval_every=max(1, TrainOptions(steps=step.steps, epochs=step.epochs).total_steps(
                               len(batches)) // 10) if ctx.evaluate is not None else None, **ctx.engine_options())
    p_teacher, p_student = n_params(teacher), n_params(student.model)
    details = rec.details
    details["student"] = {"from": student.source, "params": p_student, "teacher_params": p_teacher,
                          "param_reduction": p_teacher / max(1, p_student)}
    if student.reinitialized:
        details["student"]["reinitialized"] = student.reinitialized
    if student.config is not None:
        details["student"]["config"] = student.config
    if student.kept:
        details["student"]["kept_units"] = {str(j): int(k.numel()) for j, k in student.kept.items()}
    details["setup"] = cfg.to_dict()
    details["layer_map"] = None if cfg.layer_map is None else list(cfg.layer_map)
    if cfg.layer_map is None and student.layer_map is not None:
        details["layer_map"] = student.layer_map   # the teacher layers the student kept (no hidden loss used them)
    if ctx.evaluate is not None:
        details["quality_before"] = ctx.evaluate(student.model)
    tr = distill(student.model, teacher, batches, options, temperature=step.temperature, alpha=cfg.alpha,
                 hidden_loss=step.hidden_loss, hidden_weight=step.hidden_weight, layer_map=cfg.layer_map,
                 kept=student.kept, evaluate=ctx.evaluate, progress=ctx.progress())
    details["training"] = tr.to_dict()
    return student.model.eval()

