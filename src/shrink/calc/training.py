"""Training-time arithmetic: memory of a training run, QAT time, LoRA and low-rank
parameter counts, SVD energy, and the scalar rules of QAT and loss scaling.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from shrink.calc import _check as c


@dataclass(frozen=True)
class TrainingMemory:
    """Bytes of each part of a training step's memory."""

    weights: float
    gradients: float
    optimizer: float
    master_weights: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.master_weights + self.activations


def training_memory(params: float, *, mixed_precision: bool = False,
                    weight_bits: int | None = None, grad_bits: int | None = None,
                    master_bits: int | None = None, optimizer_states: int = 2,
                    optimizer_state_bits: int = 32, activation_bytes: float = 0.0) -> TrainingMemory:
    """Memory of training with Adam: weights + gradients + optimizer states + master copy + activations.

    weights    = params x weight_bits / 8      (32; 16 under mixed precision)
    gradients  = params x grad_bits / 8        (same as the weights by default)
    optimizer  = params x optimizer_states x optimizer_state_bits / 8  (Adam: m and v in fp32 = 8 B)
    master     = params x master_bits / 8      (fp32 master weights under mixed precision, else 0)
    activations: given in bytes (they depend on batch and sequence, not on params).
    Seed 002, ch. 0: 7B in fp32 with Adam = 7B x (4 + 4 + 4 + 4) = 112 GB.
    """
    fn = "training_memory"
    p = c.positive(fn, "params", params)
    wb = c.positive_int(fn, "weight_bits", weight_bits if weight_bits is not None
                        else (16 if mixed_precision else 32))
    gb = c.positive_int(fn, "grad_bits", grad_bits) if grad_bits is not None else wb
    if master_bits is None:
        mb = 32 if mixed_precision else 0
    else:
        mb = 0 if master_bits == 0 else c.positive_int(fn, "master_bits", master_bits)
    if isinstance(optimizer_states, bool) or not isinstance(optimizer_states, int) or optimizer_states < 0:
        raise ValueError(f"{fn}: optimizer_states must be a non-negative integer, got {optimizer_states!r}")
    ob = c.positive_int(fn, "optimizer_state_bits", optimizer_state_bits)
    act = c.non_negative(fn, "activation_bytes", activation_bytes)
    return TrainingMemory(weights=p * wb / 8, gradients=p * gb / 8,
                          optimizer=p * optimizer_states * ob / 8,
                          master_weights=p * mb / 8, activations=act)


def bytes_at_precision(nbytes: float, from_bits: float, to_bits: float) -> float:
    """The same tensors stored at another width: bytes x to_bits / from_bits
    (seed 000, Ex. 8.1: 60 GB of fp32 activations -> 30 GB in fp16)."""
    n = c.non_negative("bytes_at_precision", "nbytes", nbytes)
    f = c.positive("bytes_at_precision", "from_bits", from_bits)
    t = c.positive("bytes_at_precision", "to_bits", to_bits)
    return n * t / f


def training_hours(epochs: float, samples_per_epoch: float, samples_per_s: float) -> float:
    """hours = epochs x samples / throughput / 3600 (seed 000, Ex. 3.3: 100 epochs ~ 28 h)."""
    e = c.positive("training_hours", "epochs", epochs)
    n = c.positive("training_hours", "samples_per_epoch", samples_per_epoch)
    r = c.positive("training_hours", "samples_per_s", samples_per_s)
    return e * n / r / 3600


def qat_hours(original_epochs: float, samples_per_epoch: float, samples_per_s: float,
              epoch_fraction: float = 0.1, overhead: float = 0.3) -> float:
    """QAT time = (epochs x fraction) x samples / (throughput / (1 + overhead)) / 3600
    (seed 000, Ex. 3.3: 10 epochs x 1M / (1000 / 1.3) = 3.61 h)."""
    f = c.fraction("qat_hours", "epoch_fraction", epoch_fraction, low_open=True, high_open=False)
    o = c.non_negative("qat_hours", "overhead", overhead)
    r = c.positive("qat_hours", "samples_per_s", samples_per_s)
    return training_hours(c.positive("qat_hours", "original_epochs", original_epochs) * f,
                          samples_per_epoch, r / (1 + o))


# ---- LoRA and low rank ----------------------------------------------------------------

def low_rank_params(m: int, n: int, rank: int) -> int:
    """[m, n] ~ U[m, r] V[r, n]: r x (m + n) parameters (seed 003 §5; seed 004 Method 4)."""
    fn = "low_rank_params"
    return c.positive_int(fn, "rank", rank) * (c.positive_int(fn, "m", m) + c.positive_int(fn, "n", n))


def low_rank_compression_ratio(m: int, n: int, rank: int) -> float:
    """m x n / (r x (m + n)) (seed 003 §5: 1000x1000 at r=50 -> 10x; seed 004: 1024^2 at r=64 -> 8x)."""
    return m * n / low_rank_params(m, n, rank)


def break_even_rank(m: int, n: int) -> float:
    """Rank where r(m + n) = mn, i.e. r = mn / (m + n); d/2 for square d x d (seed 000, Ex. 7.1)."""
    mm = c.positive_int("break_even_rank", "m", m)
    nn = c.positive_int("break_even_rank", "n", n)
    return mm * nn / (mm + nn)


def lora_params(d_in: int, d_out: int, rank: int, matrices: int = 1) -> int:
    """Trainable LoRA parameters = r x (d_in + d_out) per adapted matrix x matrices
    (seed 000, ch. 7 and Ex. 7.2/7.5: 2 x 4096 x 16 = 131,072 per matrix)."""
    k = c.positive_int("lora_params", "matrices", matrices)
    return low_rank_params(d_in, d_out, rank) * k


def lora_compression_ratio(d: int, rank: int) -> float:
    """For a square d x d matrix: d^2 / (2 d r) = d / (2r) (seed 000, ch. 7: d=4096, r=16 -> 128x)."""
    dd = c.positive_int("lora_compression_ratio", "d", d)
    r = c.positive_int("lora_compression_ratio", "rank", rank)
    return dd / (2 * r)


def energy_captured(singular_values: Sequence[float], rank: int) -> float:
    """Energy at rank r = sum of the top-r sigma^2 / sum of all sigma^2
    (seed 000, Ex. 7.4: 99.79% at r=4; seed 004 Method 4)."""
    s = c.numbers("energy_captured", "singular_values", singular_values)
    if any(v < 0 for v in s):
        raise ValueError(f"energy_captured: singular_values must be non-negative, got {list(singular_values)!r}")
    r = c.positive_int("energy_captured", "rank", rank)
    sq = sorted((v * v for v in s), reverse=True)
    total = sum(sq)
    if total == 0:
        raise ValueError("energy_captured: singular_values must not all be zero")
    return sum(sq[:r]) / total


def rank_for_energy(singular_values: Sequence[float], threshold: float = 0.95) -> int:
    """Smallest r with energy_captured(sigma, r) >= threshold (seed 004, Method 4 Step 2)."""
    t = c.fraction("rank_for_energy", "threshold", threshold, low_open=True, high_open=False)
    s = c.numbers("rank_for_energy", "singular_values", singular_values)
    for r in range(1, len(s) + 1):
        if energy_captured(s, r) >= t - 1e-12:
            return r
    return len(s)


# ---- QAT and mixed-precision scalars ----------------------------------------------------

def fake_quantize_value(x: float, scale: float, zero_point: float, qmin: int, qmax: int) -> float:
    """x_hat = (clamp(round(x / scale + zp), qmin, qmax) - zp) x scale, round half to even
    like torch.round (seed 000, ch. 3 and Ex. 3.4: x=1.6, s=0.01, zp=100 -> 1.55)."""
    fn = "fake_quantize_value"
    v = c.number(fn, "x", x)
    s = c.positive(fn, "scale", scale)
    z = c.number(fn, "zero_point", zero_point)
    lo, hi = c.number(fn, "qmin", qmin), c.number(fn, "qmax", qmax)
    if lo >= hi:
        raise ValueError(f"{fn}: qmin must be below qmax, got qmin={qmin!r}, qmax={qmax!r}")
    q = min(max(round(v / s + z), lo), hi)
    return (q - z) * s


def ste_gradient(grad: float, x: float, clip_min: float, clip_max: float) -> float:
    """Straight-through estimator: dL/dx = dL/dx_hat x 1{clip_min <= x <= clip_max}
    (seed 000, Ex. 3.1 and 3.5; seed 001 ch. 6)."""
    g = c.number("ste_gradient", "grad", grad)
    v = c.number("ste_gradient", "x", x)
    lo = c.number("ste_gradient", "clip_min", clip_min)
    hi = c.number("ste_gradient", "clip_max", clip_max)
    if lo > hi:
        raise ValueError(f"ste_gradient: clip_min must not exceed clip_max, got {lo!r} > {hi!r}")
    return g * (1.0 if lo <= v <= hi else 0.0)


def unscale_gradients(grads: Sequence[float], loss_scale: float) -> list[float]:
    """Loss scaling, step 3: divide the scaled gradients by the scale before the fp32 update;
    skipping it multiplies the effective learning rate by loss_scale (seed 000, Ex. 8.5)."""
    g = c.numbers("unscale_gradients", "grads", grads, min_len=0)
    s = c.positive("unscale_gradients", "loss_scale", loss_scale)
    return [v / s for v in g]


def lora_trainable_fraction(trainable_params: float, total_params: float) -> float:
    """trainable / total (seed 000, Ex. 7.2: 16.8M / 7B = 0.24%)."""
    t = c.non_negative("lora_trainable_fraction", "trainable_params", trainable_params)
    n = c.positive("lora_trainable_fraction", "total_params", total_params)
    if t > n:
        raise ValueError(f"lora_trainable_fraction: trainable_params must not exceed total_params, got {t!r} > {n!r}")
    return t / n

