"""A recommended strategy from the seeds' decision trees.

Seed 001 (ch. 9): no training budget -> PTQ: int8 if it fits, else GPTQ/AWQ int4;
with training compute -> QAT (+ distillation when accuracy is critical); more than
~10x compression needed -> distill to a smaller architecture first, then quantize.
Seed 004 (decision tree by platform): server quantizes if possible, edge goes to
int4 or prunes, mobile distills and quantizes, a microcontroller needs extreme
compression (prune + distill + int8). Accuracy costs quoted are the seeds'
cheat-sheet ranges, not measurements of this model.
"""
from __future__ import annotations

from .numbers import format_bytes

TIER_ADVICE = {
    "server": "server tier: quantize if possible (seed 004)",
    "desktop": "workstation GPU: int8 if it fits, else INT4 GPTQ/AWQ (seed 001 decision tree)",
    "edge": "edge tier: INT4 or pruning (seed 004)",
    "mobile": "mobile tier: distill + quantize (seed 004)",
    "mcu": "microcontroller tier: extreme compression, prune + distill + int8 (seed 004)",
}
INT4 = ("int4-g128", "nf4-g64", "int4")


def recommend(plan, *, max_drop: float = 1.0, can_train: bool = False) -> dict | None:
    """None without a device memory to fit into."""
    if not 0 < max_drop <= 100:
        raise ValueError(f"--max-drop must be a percentage in (0, 100], got {max_drop}")
    if plan.usable_bytes is None:
        return None
    fits = {f.name: f for f in plan.formats if f.fits}
    why: list[str] = []
    tier = plan.device.tier
    if tier in TIER_ADVICE:
        why.append(TIER_ADVICE[tier])

    def fit_line(name: str) -> str:
        f = plan.candidate(name)
        spare = plan.usable_bytes - f.total_bytes
        tps = f"; decode bound {f.decode_tokens_per_s_bound:,.0f} tokens/s" if f.decode_tokens_per_s_bound else ""
        return f"{name}: {_b(f.total_bytes)} with KV cache and activations, {_b(spare)} to spare{tps}"

    if tier == "mcu":
        return _shrink_architecture(plan, why, can_train, mcu=True)
    if "fp16" in fits and max_drop < 0.1:
        why += [fit_line("fp16"), f"an accuracy budget of {max_drop}% leaves no room for quantization error "
                "(INT8 PTQ typically costs 0.1-0.5%, seed 001)"]
        return {"format": "fp16", "recipe": "none", "why": why}
    if "int8" in fits:
        why.append(fit_line("int8"))
        if "fp16" in fits:
            why.append("fp16 fits too, but int8 halves the bytes each decode step reads: up to 2x faster decoding")
        why.append("INT8 PTQ typically costs 0.1-0.5% accuracy (seed 001 cheat sheet)")
        compute = plan.candidate("int8").bound == "compute"
        if compute:
            why.append(f"at batch {plan.batch} decoding is compute-bound: W8A8 (SmoothQuant) uses the int8 units")
        return {"format": "int8", "recipe": "w8a8-smoothquant" if compute else "int8", "why": why}
    four = next((n for n in INT4 if n in fits), None)
    if four is not None:
        why += [fit_line(four), _short_line(plan, "int8", "int8 does not fit")]
        if can_train and max_drop < 1.0:
            why.append("training compute available and a tight accuracy budget: QAT recovers 0.5-1% over PTQ (seed 001)")
            return {"format": four, "recipe": "qat-int4", "why": why}
        if max_drop < 2.0:
            why.append("AWQ INT4 typically costs 0.5-2%, GPTQ 1-3%: AWQ for a budget under 2% (seed 001)")
            return {"format": four, "recipe": "w4-awq", "why": why}
        why.append("GPTQ INT4 typically costs 1-3% (seed 001)")
        return {"format": four, "recipe": "w4-gptq", "why": why}
    low = next((n for n in ("int3-g128", "int2-g64") if n in fits), None)
    if low is not None and not can_train:
        why += [fit_line(low), _short_line(plan, INT4[0], "no 4-bit format fits"),
                "below 4 bits post-training quantization loses several points; with training compute, "
                "distilling to a smaller model first is the better path (seed 001)"]
        return {"format": low, "recipe": f"w{low[3]}-gptq", "why": why}
    return _shrink_architecture(plan, why, can_train, mcu=False)


def _shrink_architecture(plan, why: list[str], can_train: bool, mcu: bool) -> dict:
    """Nothing fits post-training: distill (and prune) to a student that will."""
    target = "int8" if mcu else "int4-g128"
    f = plan.candidate(target)
    per_param = f.weight_bytes / plan.model.params
    fixed = f.total_bytes - f.weight_bytes  # KV cache and activations, if the student kept the shape
    room = plan.usable_bytes - fixed
    student = int(room / per_param) if room > 0 else 0
    need = plan.candidate("fp16").total_bytes / plan.usable_bytes
    why.append(f"{target} needs {_b(f.total_bytes)}, {_b(plan.usable_bytes)} usable; "
               f"fp16 would need {need:.1f}x compression")
    if student > 0:
        why.append(f"a student of at most ~{student / 1e6:,.0f}M parameters fits at {target} "
                   f"({per_param:.3f} B/param) beside the KV cache and activations")
    else:
        why.append("the KV cache and activations alone exceed the device: shorten --context or --batch")
    why.append("more than ~10x compression: distill to a smaller architecture first, then quantize (seed 001)")
    if not can_train:
        why.append("distillation needs training compute; without it no format here fits this device")
    recipe = "prune+distill+int8" if mcu else "distill+w4"
    return {"format": target, "recipe": recipe, "why": why}


def _short_line(plan, name: str, label: str) -> str:
    f = plan.candidate(name)
    if f.fits:
        return f"{name} would fit ({_b(f.total_bytes)}) but is not among the formats asked for"
    return f"{label}: {name} needs {_b(f.total_bytes)} > {_b(plan.usable_bytes)} usable"


def _b(n: float) -> str:
    return format_bytes(n)
