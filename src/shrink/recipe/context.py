"""What a training step's runner is given besides the model it changes: the original model
(the teacher), the data, the quality metric, the seed and the progress callback."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from shrink.data.labeled import rebatch


@dataclass
class StepContext:
    original: nn.Module                    # the uncompressed model given to compress (never modified)
    calibration: list | None               # calibration batches (model inputs)
    train_data: list | None = None         # training batches (Labeled where the job has labels); default calibration
    evaluate: Callable | None = None       # the job's quality metric: model -> {"value", "higher_is_better", ...}
    seed: int = 0
    report: Callable[[int, int], None] | None = None   # progress(done, total) of this step
    checkpoint: Any = None                 # recipe.resume.StepCheckpoint of a checkpointed run, else None

    def engine_options(self) -> dict:
        """TrainOptions (or finetune) keywords that checkpoint the engine into the run's state and
        resume it from there (checkpoint, checkpoint_every, resume); {} when not checkpointed.
        One engine run per step: the file is the step's."""
        if self.checkpoint is None:
            return {}
        path, every, _ = self.checkpoint.training()
        return {"checkpoint": path, "checkpoint_every": every, "resume": True}

    def progress(self) -> Callable[[int, int], None] | None:
        """The engine's progress callback: the step's report, and the run's count of checkpoints."""
        if self.checkpoint is None:
            return self.report
        event, report = self.checkpoint.training()[2], self.report

        def progress(done: int, total: int) -> None:
            if report is not None:
                report(done, total)
            event(done, total)

        return progress

    def batches(self, batch_size: int | None = None, step: str = "training") -> list:
        """The training batches (train_data, else calibration), re-cut to batch_size rows."""
        data = self.train_data if self.train_data else self.calibration
        if not data:
            raise ValueError(f"{step}: no training data: give calibration data (compress(calibration=...)) "
                             "or train_data")
        return rebatch(list(data), batch_size) if batch_size else list(data)


def run_training_step(work: nn.Module, step, targets, ctx: StepContext, rec) -> nn.Module:
    """Training-time steps (issue 7); each returns the model it leaves (a distilled student
    or an early-exit wrapper replaces the model)."""
    from .prune_steps import Finetune
    from .train_steps import QAT, Distill, LoRA, LowRank

    if isinstance(step, Finetune):
        from .training import run_finetune
        return run_finetune(work, step, ctx, rec)
    if isinstance(step, QAT):
        from .qat import run_qat
        return run_qat(work, step, targets, ctx, rec)
    if isinstance(step, Distill):
        from .distill import run_distill
        return run_distill(work, step, ctx, rec)
    if isinstance(step, LowRank):
        from .lowrank import run_lowrank
        return run_lowrank(work, step, targets, ctx, rec)
    if isinstance(step, LoRA):
        from .lora import run_lora
        return run_lora(work, step, ctx, rec)
    from .early_exit import run_early_exit
    return run_early_exit(work, step, ctx, rec)
