"""Knowledge distillation: train a student to match a teacher with the shared loop
(train/engine.py) and the losses of shrink.algos.kd.

What the teacher term compares, by model kind (decided from the teacher and a batch):
- "classifier" (outputs logits, not a causal LM): alpha * T^2 * KL on the logits, plus
  (1 - alpha) * cross-entropy on the labels of Labeled batches;
- "causal" (a causal LM): the same per token position (padding left out), the hard labels
  being the next tokens (the loss lm_loss computes);
- "encoder" (no logits: last hidden states, e.g. a sentence embedder): embedding
  distillation, 1 - cosine (or MSE with hidden_loss "mse") between the student's and the
  teacher's mean-pooled embeddings. There are no hard labels, so alpha must be 1.
alpha None: 0.5 where there are hard labels, else 1.

hidden_loss ("cosine" | "mse"): also match hidden states, student layer j to teacher layer
layer_map[j] (DistilBERT), weighted by hidden_weight and averaged over the mapped layers.
Layer outputs are caught by forward hooks on the transformer blocks (or the Sequential's
hidden blocks), not output_hidden_states: GPT-2 and Llama apply their final norm to the
last entry of hidden_states, which would then not be comparable with a middle teacher layer.
The frozen teacher's outputs are kept per batch (up to TEACHER_CACHE_BYTES), so the epochs
after the first run the student alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from shrink.algos.kd import check_alpha, check_temperature, hidden_loss as hidden_distance, kd_loss
from shrink.data.labeled import split_batch
from shrink.models.io import is_causal_lm
from shrink.surgery.capture import call_model

from .engine import TrainOptions, TrainRecord, train
from .loop import _token_ids, has_logits, output_tensor
from .students import default_layer_map, layer_taps

KINDS = ("classifier", "causal", "encoder")
TEACHER_CACHE_BYTES = 256 * 2**20   # teacher outputs kept across epochs (an LM's logits soon exceed it)


@dataclass(frozen=True)
class DistillSetup:
    kind: str                       # classifier | causal | encoder
    alpha: float                    # weight of the teacher term (resolved)
    temperature: float
    hidden_loss: str | None
    hidden_weight: float
    layer_map: tuple[int, ...] | None   # student layer j <- teacher layer layer_map[j] (with hidden_loss)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "alpha": self.alpha, "temperature": self.temperature,
                "hidden_loss": self.hidden_loss, "hidden_weight": self.hidden_weight,
                "layer_map": None if self.layer_map is None else list(self.layer_map)}


def _mask(inputs) -> torch.Tensor | None:
    if isinstance(inputs, dict) and isinstance(inputs.get("attention_mask"), torch.Tensor):
        return inputs["attention_mask"]
    return None


def _shape_check(student: nn.Module, teacher: nn.Module, inputs) -> None:
    with torch.no_grad():
        s = output_tensor(call_model(student, inputs))
        t = output_tensor(call_model(teacher, inputs))
    if s.shape != t.shape:
        raise ValueError(f"distill: the student's output has shape {list(s.shape)} but the teacher's has "
                         f"{list(t.shape)} on the first training batch; a student must produce the teacher's "
                         "outputs (the same classes, vocabulary or hidden size)")


def setup(student: nn.Module, teacher: nn.Module, batch, *, temperature: float = 2.0, alpha: float | None = None,
          hidden_loss: str | None = None, hidden_weight: float = 1.0,
          layer_map: Sequence[int] | None = None) -> DistillSetup:
    """Resolve the model kind, alpha and the layer map, checking them against a batch."""
    t = check_temperature(temperature, "distill")
    inputs, labels = split_batch(batch)
    if not has_logits(teacher, inputs):
        kind = "encoder"
    elif is_causal_lm(teacher) and _token_ids(inputs) is not None:
        kind = "causal"
    else:
        kind = "classifier"
    hard = kind == "causal" or (kind == "classifier" and labels is not None)
    if alpha is None:
        alpha = 0.5 if hard else 1.0
    a = check_alpha(alpha, "distill")
    if a < 1 and not hard:
        why = ("an encoder's embeddings have no hard labels" if kind == "encoder" else
               "the training batches carry no labels (give Labeled(inputs, labels) batches)")
        raise ValueError(f"distill: alpha {a:g} < 1 weighs a hard-label term, but {why}; set alpha to 1 or null")
    if hidden_loss is not None and hidden_loss not in ("cosine", "mse"):
        raise ValueError(f"distill: hidden_loss must be cosine, mse or None, got {hidden_loss!r}")
    _shape_check(student, teacher, inputs)
    lmap = None
    if hidden_loss is not None:
        n_s, n_t = len(layer_taps(student)), len(layer_taps(teacher))
        if not n_s or not n_t:
            raise ValueError(f"distill: hidden_loss needs layers to compare, and the "
                             f"{'student' if not n_s else 'teacher'} has none shrink recognises (transformer "
                             "blocks or the hidden blocks of an nn.Sequential)")
        lmap = tuple(default_layer_map(n_s, n_t) if layer_map is None else (int(i) for i in layer_map))
        if len(lmap) != n_s or any(not 0 <= i < n_t for i in lmap):
            raise ValueError(f"distill: layer_map {list(lmap)} must give one teacher layer (0..{n_t - 1}) for each "
                             f"of the student's {n_s} layers")
    return DistillSetup(kind, a, t, hidden_loss, float(hidden_weight), lmap)


class _Catch:
    """Forward hooks keeping the latest output of each tapped module."""

    def __init__(self, modules: list[nn.Module]):
        self.out: list[torch.Tensor | None] = [None] * len(modules)
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(modules)]

    def _hook(self, i: int):
        def fn(mod, args, out):
            self.out[i] = out[0] if isinstance(out, (tuple, list)) else out
        return fn

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _rows(h: torch.Tensor) -> torch.Tensor:
    """Feature vectors last: a conv map [N, C, H, W] as [N, H, W, C]."""
    return h.permute(0, 2, 3, 1) if h.dim() == 4 else h


def _pooled(h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return h.float().mean(1)
    m = mask.to(h.device).unsqueeze(-1).float()
    return (h.float() * m).sum(1) / m.sum(1).clamp_min(1.0)


class _TeacherCache:
    """The frozen teacher's outputs (and tapped layers) per batch object, while they fit in
    `limit` bytes: every epoch after the first then runs the student alone."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self.store: dict[int, tuple] = {}

    def get(self, batch):
        hit = self.store.get(id(batch))
        return hit[1] if hit is not None and hit[0] is batch else None

    def put(self, batch, value: tuple) -> None:
        n = sum(t.numel() * t.element_size() for t in (value[0], *value[1]))
        if self.used + n <= self.limit:
            self.store[id(batch)] = (batch, value)   # the batch is held, so its id is not reused
            self.used += n


def make_distill_loss(teacher: nn.Module, cfg: DistillSetup, student_taps: _Catch | None = None,
                      teacher_taps: _Catch | None = None, kept: dict[int, torch.Tensor] | None = None,
                      cache_bytes: int = 0) -> Callable[[nn.Module, object], torch.Tensor]:
    """loss_fn(model, batch) for the engine. cache_bytes > 0: keep the teacher's outputs of
    each batch object up to that many bytes (the teacher is frozen and in eval mode)."""
    kept = kept or {}
    cache = _TeacherCache(cache_bytes)

    def fn(model: nn.Module, batch) -> torch.Tensor:
        inputs, labels = split_batch(batch)
        hit = cache.get(batch)
        if hit is None:
            with torch.no_grad():
                t_out = output_tensor(call_model(teacher, inputs))
            t_hidden = list(teacher_taps.out) if teacher_taps is not None else []
            cache.put(batch, (t_out, t_hidden))
        else:
            t_out, t_hidden = hit
        s_out = output_tensor(call_model(model, inputs))
        mask = _mask(inputs)
        if cfg.kind == "encoder":
            loss = cfg.alpha * hidden_distance(_pooled(s_out, mask), _pooled(t_out, mask), cfg.hidden_loss or "cosine")
        elif cfg.kind == "causal":
            ids = _token_ids(inputs).to(s_out.device)
            target = torch.full_like(ids, -100)
            target[:, :-1] = ids[:, 1:]
            if mask is not None:
                target[:, :-1][mask[:, 1:].to(ids.device) == 0] = -100
            loss = kd_loss(s_out, t_out, target if cfg.alpha < 1 else None, cfg.temperature, cfg.alpha, mask=mask)
        else:
            loss = kd_loss(s_out, t_out, labels if cfg.alpha < 1 else None, cfg.temperature, cfg.alpha)
        if cfg.hidden_loss is not None and cfg.hidden_weight > 0:
            terms = []
            for j, i in enumerate(cfg.layer_map):
                s_h, t_h = _rows(student_taps.out[j]), _rows(t_hidden[i])
                if j in kept:
                    t_h = t_h.index_select(-1, kept[j].to(t_h.device))
                try:
                    terms.append(hidden_distance(s_h, t_h, cfg.hidden_loss,
                                                 mask=mask if mask is not None and s_h.dim() == 3 else None))
                except ValueError as e:
                    raise ValueError(f"distill: student layer {j} <- teacher layer {i}: {e}") from None
            loss = loss + cfg.hidden_weight * torch.stack(terms).mean()
        return loss

    return fn


def distill(student: nn.Module, teacher: nn.Module, batches: Sequence, options: TrainOptions, *,
            temperature: float = 2.0, alpha: float | None = None, hidden_loss: str | None = None,
            hidden_weight: float = 1.0, layer_map: Sequence[int] | None = None,
            kept: dict[int, torch.Tensor] | None = None, evaluate=None, progress=None) -> TrainRecord:
    """Train `student` in place to match `teacher` (kept frozen, in eval mode) on `batches`.

    kept: for a student narrowed from the teacher, student layer j -> the teacher units it
    carries (Student.kept), so hidden states are compared unit for unit. The record's
    label is "distill"; `setup()` gives the resolved alpha, kind and layer map.
    """
    if not batches:
        raise ValueError("distill: no training batches (give the recipe calibration or training data)")
    if student is teacher:
        raise ValueError("distill: the student is the teacher itself; give a copy or a smaller model")
    teacher_training = teacher.training
    teacher.eval()
    s_taps = t_taps = None
    try:
        cfg = setup(student, teacher, batches[0], temperature=temperature, alpha=alpha, hidden_loss=hidden_loss,
                    hidden_weight=hidden_weight, layer_map=layer_map)
        if cfg.hidden_loss is not None:
            s_taps, t_taps = _Catch(layer_taps(student)), _Catch(layer_taps(teacher))
        loss_fn = make_distill_loss(teacher, cfg, s_taps, t_taps, kept, TEACHER_CACHE_BYTES)
        return train(student, batches, loss_fn, options, evaluate=evaluate, progress=progress, label="distill")
    finally:
        for c in (s_taps, t_taps):
            if c is not None:
                c.close()
        teacher.train(teacher_training)
