"""Knowledge-distillation losses, pure functions on tensors (Hinton et al. 2015; DistilBERT).

    L = alpha * T^2 * KL(p_teacher^T || p_student^T) + (1 - alpha) * CE(labels, p_student^1)

p^T = softmax(logits / T) over the last dimension; every other dimension is a row
(a sample, or a token position of a language model). KL is averaged over rows; CE over
the rows whose label is not `ignore_index`.

Why T^2: d KL / d s = (softmax(s/T) - softmax(t/T)) / T per row, and the difference of the
softened distributions itself shrinks like 1/T for large T, so the soft-target gradient
falls as 1/T^2. Multiplying by T^2 keeps it comparable to the hard-label gradient at any
temperature, so alpha alone sets the balance (seed 000, Ex. 6.4).

`hidden_loss` compares hidden states (DistilBERT's cosine loss, or MSE): rows are the
vectors along the last dimension.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

HIDDEN_KINDS = ("cosine", "mse")


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def _float(t: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 in fp32 (the losses are sums of many small terms); fp32/fp64 as they are."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def check_temperature(temperature, where: str = "kd_loss") -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"{where}: temperature must be a positive number (typically 2-20), got {temperature!r}")
    return float(temperature)


def check_alpha(alpha, where: str = "kd_loss") -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{where}: alpha (the weight of the teacher term) must be in [0, 1], got {alpha!r}")
    return float(alpha)


def _check_pair(student: torch.Tensor, teacher: torch.Tensor, what: str, where: str) -> None:
    for name, t in (("student", student), ("teacher", teacher)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{where}: the {name} {what} must be a floating-point tensor, got "
                            f"{type(t).__name__ if not isinstance(t, torch.Tensor) else t.dtype}")
    if student.shape != teacher.shape:
        raise ValueError(f"{where}: the student's {what} have shape {_shape(student)} but the teacher's have "
                         f"{_shape(teacher)}; a student must produce outputs of the teacher's shape (same classes, "
                         "vocabulary or hidden size)")
    if student.dim() == 0 or student.shape[-1] == 0:
        raise ValueError(f"{where}: the {what} need a last dimension of at least 1, got shape {_shape(student)}")


def _row_mask(mask: torch.Tensor | None, rows_shape: torch.Size, where: str) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask.shape != rows_shape:
        raise ValueError(f"{where}: mask has shape {list(mask.shape)}, expected {list(rows_shape)} (one entry per "
                         "row: the outputs' shape without the last dimension)")
    return mask.reshape(-1).to(torch.bool)


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0, *,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), the mean over rows (mask: rows to count)."""
    t = check_temperature(temperature, "soft_kl")
    _check_pair(student_logits, teacher_logits, "logits", "soft_kl")
    keep = _row_mask(mask, student_logits.shape[:-1], "soft_kl")
    k = student_logits.shape[-1]
    s = F.log_softmax(_float(student_logits).reshape(-1, k) / t, dim=-1)
    p = F.log_softmax(_float(teacher_logits).detach().reshape(-1, k).to(s.dtype) / t, dim=-1)
    per_row = (p.exp() * (p - s)).sum(-1)
    if keep is not None:
        per_row = per_row[keep.to(per_row.device)]
    if per_row.numel() == 0:
        return s.sum() * 0.0
    return per_row.mean() * (t * t)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None,
            temperature: float = 2.0, alpha: float = 0.5, *, mask: torch.Tensor | None = None,
            ignore_index: int = -100) -> torch.Tensor:
    """alpha * T^2 * KL(teacher^T || student^T) + (1 - alpha) * CE(labels, student).

    student_logits, teacher_logits: [..., classes] of one shape (the teacher's are detached).
    labels: class indices of shape [...] (ignore_index entries are left out of the CE), or
    None, which needs alpha = 1. mask: [...] bool, rows the KL term counts (e.g. not padding).
    """
    t = check_temperature(temperature)
    a = check_alpha(alpha)
    _check_pair(student_logits, teacher_logits, "logits", "kd_loss")
    if labels is None and a < 1.0:
        raise ValueError(f"kd_loss: alpha {a:g} < 1 gives the hard-label term weight {1 - a:g}, but no labels were "
                         "given; pass labels (class indices) or set alpha to 1 (teacher only)")
    loss = soft_kl(student_logits, teacher_logits, t, mask=mask) * a if a > 0 else None
    if a < 1.0:
        if labels.shape != student_logits.shape[:-1]:
            raise ValueError(f"kd_loss: labels have shape {_shape(labels)}, expected {_shape(student_logits)[:-1]} "
                             "(one class index per row of the logits)")
        k = student_logits.shape[-1]
        ce = F.cross_entropy(_float(student_logits).reshape(-1, k), labels.reshape(-1).to(student_logits.device),
                             ignore_index=ignore_index)
        loss = ce * (1 - a) if loss is None else loss + ce * (1 - a)
    return loss


def hidden_loss(student_h: torch.Tensor, teacher_h: torch.Tensor, kind: str = "cosine", *,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """Distance between hidden states [..., d]: "cosine" = mean over rows of 1 - cos(s, t)
    (DistilBERT), "mse" = mean squared difference. mask: [...] rows to count (not padding)."""
    if kind not in HIDDEN_KINDS:
        raise ValueError(f"hidden_loss: kind must be one of {', '.join(HIDDEN_KINDS)}, got {kind!r}")
    _check_pair(student_h, teacher_h, "hidden states", "hidden_loss")
    keep = _row_mask(mask, student_h.shape[:-1], "hidden_loss")
    d = student_h.shape[-1]
    s = _float(student_h).reshape(-1, d)
    t = _float(teacher_h).detach().reshape(-1, d).to(s.dtype)
    if keep is not None:
        keep = keep.to(s.device)
        s, t = s[keep], t[keep]
    if s.shape[0] == 0:
        return _float(student_h).sum() * 0.0
    if kind == "mse":
        return F.mse_loss(s, t)
    return (1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)).mean()
