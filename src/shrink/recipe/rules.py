"""Ordering rules for a recipe, from the seeds' golden rule of compression pipelines:
coarsest first (architecture changes) to finest (bit widths): structured pruning and
low-rank -> unstructured pruning -> distillation -> quantization; a fine-tune belongs
after pruning. Each step class names its stage in `kind`.

- A coarser step after a finer one (e.g. pruning after quantization) is refused with the
  reason unless forced: the quantization grid was calibrated for weights the later step
  changes, and the earlier rounding error is paid twice (the seeds measure prune ->
  fine-tune -> quantize 1-3% more accurate than the reverse).
- Two quantization steps that both target every layer are refused: a layer is quantized
  once, so the second would find nothing left (split them with include/exclude). A step
  that refines quantized layers (qat after gptq, rtn or awq) is the exception.
- Pruning with no fine-tune or distillation after it gets a suggestion.
"""
from __future__ import annotations

# stage order: lower runs earlier; "finetune" may follow any stage
STAGES = {"structured_prune": 0, "lowrank": 0, "prune": 1, "distill": 2, "quantize": 3}
RECOVERY = ("finetune", "distill")
PRUNING = ("structured_prune", "prune")


def kind_of(step) -> str:
    kind = getattr(step, "kind", None)
    if kind not in STAGES and kind != "finetune":
        raise TypeError(f"recipe step {step!r} names no known stage (kind={kind!r})")
    return kind


def check_order(steps: list, force: bool = False) -> list[str]:
    """Raise ValueError for an order the rules refuse (unless force); return suggestions
    and, when forced, the warnings that were overridden."""
    kinds = [kind_of(s) for s in steps]
    names = [_name(s) for s in steps]
    notes: list[str] = []
    for j in range(len(steps)):
        for i in range(j):
            ki, kj = kinds[i], kinds[j]
            if "finetune" in (ki, kj) or STAGES[kj] >= STAGES[ki]:
                continue
            msg = (f"recipe step {j + 1} ({names[j]}) comes after step {i + 1} ({names[i]}): {_why(ki, kj)} "
                   f"Put {names[j]} first (coarse before fine: structured pruning -> pruning -> distillation -> "
                   "quantization)")
            if not force:
                raise ValueError(msg + ", or force the order (force=True, --force).")
            notes.append("forced: " + msg)
            break
    quant = [i for i, k in enumerate(kinds) if k == "quantize"]
    for a, b in zip(quant, quant[1:]):
        if getattr(steps[b], "refines", False):   # qat trains the layers the step before it quantized
            continue
        if _everything(steps[a]) and _everything(steps[b]):
            raise ValueError(f"recipe step {b + 1} ({names[b]}) would find no float layers: step {a + 1} "
                             f"({names[a]}) quantizes every layer first and a layer is quantized once; give one of "
                             "them include: or exclude: patterns to split the layers between them")
    for i, k in enumerate(kinds):
        if k in PRUNING and not getattr(steps[i], "trains", False) and \
                not any(kinds[j] in RECOVERY for j in range(i + 1, len(kinds))):
            notes.append(f"suggestion: step {i + 1} ({names[i]}) prunes with no fine-tune or distillation after "
                         "it; add `- finetune: {steps: 200}` before quantizing to recover the accuracy pruning costs")
    return notes


def _name(step) -> str:
    from .steps import step_name

    try:
        return step_name(step)
    except TypeError:  # a step type this module does not list (the rules only need its kind)
        return type(step).__name__.lower()


def _why(earlier: str, later: str) -> str:
    if earlier == "quantize":
        return (f"{later.replace('_', ' ')} after quantization changes weights whose quantization grid was "
                "already calibrated, and pays the rounding error twice (quantize-before-prune).")
    return f"{later.replace('_', ' ')} is coarser than {earlier.replace('_', ' ')} and should come before it."


def _everything(step) -> bool:
    return getattr(step, "include", None) is None and getattr(step, "exclude", None) is None
