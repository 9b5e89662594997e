"""Knowledge-distillation math on plain lists of floats: temperature softmax, entropy,
KL divergence, cross-entropy and the Hinton distillation loss. Natural logarithms (nats).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from shrink.calc import _check as c

_SUM_TOL = 1e-6


def softmax_with_temperature(logits: Sequence[float], temperature: float = 1.0) -> list[float]:
    """q_i = exp(z_i / T) / sum_j exp(z_j / T), max subtracted for stability
    (seed 000, ch. 6 and Ex. 6.1/6.5; seed 002, ch. 7; seed 003 §4)."""
    z = c.numbers("softmax_with_temperature", "logits", logits)
    t = c.positive("softmax_with_temperature", "temperature", temperature)
    scaled = [v / t for v in z]
    top = max(scaled)
    exps = [math.exp(v - top) for v in scaled]
    total = sum(exps)
    return [e / total for e in exps]


def _probs(fn: str, name: str, probs: Sequence[float]) -> list[float]:
    p = c.numbers(fn, name, probs)
    if any(v < 0 for v in p) or not math.isclose(sum(p), 1.0, abs_tol=_SUM_TOL):
        raise ValueError(f"{fn}: {name} must be non-negative and sum to 1, got {list(probs)!r}")
    return p


def entropy(probs: Sequence[float]) -> float:
    """H = -sum p_i ln p_i, in nats; 0 ln 0 = 0 (seed 000, Ex. 6.1: H(T=1) = 0.847, H(T=5) = 1.087)."""
    p = _probs("entropy", "probs", probs)
    return -sum(v * math.log(v) for v in p if v > 0)


def kl_divergence(p: Sequence[float], q: Sequence[float]) -> float:
    """KL(p || q) = sum p_i ln(p_i / q_i), nats; inf where q_i = 0 < p_i (seed 000, Ex. 6.6)."""
    pp = _probs("kl_divergence", "p", p)
    qq = _probs("kl_divergence", "q", q)
    if len(pp) != len(qq):
        raise ValueError(f"kl_divergence: p and q must have the same length, got {len(pp)} and {len(qq)}")
    total = 0.0
    for a, b in zip(pp, qq):
        if a == 0:
            continue
        if b == 0:
            return math.inf
        total += a * math.log(a / b)
    return total


def cross_entropy(probs: Sequence[float], label: int) -> float:
    """Hard-label cross-entropy CE(y, p) = -ln p_label (seed 000, ch. 6; seed 004 L_hard)."""
    p = _probs("cross_entropy", "probs", probs)
    i = c.index("cross_entropy", "label", label, len(p))
    return math.inf if p[i] == 0 else -math.log(p[i])


def distillation_loss_from_terms(kl_soft: float, ce_hard: float, alpha: float,
                                 temperature: float) -> float:
    """L = alpha x T^2 x KL_soft + (1 - alpha) x CE_hard
    (seed 000, Ex. 6.3: 0.7 x 16 x 0.05 + 0.3 x 2.3 = 1.25)."""
    fn = "distillation_loss_from_terms"
    kl = c.non_negative(fn, "kl_soft", kl_soft)
    ce = c.non_negative(fn, "ce_hard", ce_hard)
    a = c.fraction(fn, "alpha", alpha, high_open=False)
    t = c.positive(fn, "temperature", temperature)
    return a * t * t * kl + (1 - a) * ce


def soft_distillation_loss(student_logits: Sequence[float], teacher_logits: Sequence[float],
                           temperature: float) -> float:
    """T^2 x KL(softmax(teacher / T) || softmax(student / T)) for one example
    (seed 003 §4: F.kl_div(log_softmax(s/T), softmax(t/T)) x T x T; seed 001 ch. 6)."""
    fn = "soft_distillation_loss"
    s = c.numbers(fn, "student_logits", student_logits)
    t = c.numbers(fn, "teacher_logits", teacher_logits)
    if len(s) != len(t):
        raise ValueError(f"{fn}: student_logits and teacher_logits must have the same length, "
                         f"got {len(s)} and {len(t)}")
    temp = c.positive(fn, "temperature", temperature)
    p_t = softmax_with_temperature(t, temp)
    p_s = softmax_with_temperature(s, temp)
    return temp * temp * kl_divergence(p_t, p_s)


def distillation_loss(student_logits: Sequence[float], teacher_logits: Sequence[float],
                      label: int, alpha: float, temperature: float) -> float:
    """L = alpha x T^2 x KL(p_teacher^T || p_student^T) + (1 - alpha) x CE(label, p_student^1),
    computed from logits (seed 000, ch. 6 "Knowledge distillation loss"; seed 001 ch. 6
    `distillation_loss`)."""
    a = c.fraction("distillation_loss", "alpha", alpha, high_open=False)
    soft = soft_distillation_loss(student_logits, teacher_logits, temperature)
    hard = cross_entropy(softmax_with_temperature(student_logits, 1.0), label)
    return a * soft + (1 - a) * hard


def distillation_gradient_factor(temperature: float) -> float:
    """Softening by T scales the soft-target gradients by 1/T^2, which the T^2 in the loss
    undoes (seed 000, Ex. 6.4 and 6.6: at T=10, a 100x reduction without it)."""
    t = c.positive("distillation_gradient_factor", "temperature", temperature)
    return 1.0 / (t * t)
