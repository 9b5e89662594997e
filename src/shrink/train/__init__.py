"""Training loops: fine-tuning after compression (distillation and QAT build on it)."""
from shrink.train.loop import TrainRecord, distill_loss, finetune, lm_loss, output_tensor

__all__ = ["TrainRecord", "distill_loss", "finetune", "lm_loss", "output_tensor"]
