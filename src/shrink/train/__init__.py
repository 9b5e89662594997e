"""Training loops: the shared engine (engine.py), fine-tuning (loop.py), mixed precision (amp.py)."""
from shrink.train.amp import LossScaler
from shrink.train.engine import TrainOptions, TrainRecord, train
from shrink.train.loop import distill_loss, finetune, lm_loss, output_tensor
