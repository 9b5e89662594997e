"""Will the compression job itself fit in this machine's memory? Checked before any
step runs, from the model and the recipe alone, with the arithmetic shown.

Peak = the original model + its working copy (compress never modifies its input)
     + calibration activations kept between blocks (the block inputs and outputs
       of every calibration batch, fp32)
     + Hessians held at once (fp32 in x in per target: one block's worth for
       gptq/awq/smoothquant, every target's for mixed_precision)
     + for steps that train (finetune, iterative_prune, lottery_ticket): gradients and
       AdamW's two moments, 3 x the weights."""
from __future__ import annotations

from torch import nn

from .records import model_nbytes
from .steps import MixedPrecision, needs_calibration


def job_memory(model: nn.Module, steps: list, batches: list | None) -> dict:
    """{"bytes": estimate, "derivation": text}."""
    weights = model_nbytes(model)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    widths = [m.in_features for m in linears]
    calib = batches and any(needs_calibration(s) for s in steps)
    act = hess = 0
    parts = [f"model {weights:,} B + working copy {weights:,} B"]
    if calib:
        hidden = getattr(getattr(model, "config", None), "hidden_size", None) or max(widths, default=0)
        tokens = sum(_tokens(b) for b in batches)
        act = 2 * tokens * hidden * 4
        parts.append(f"activations 2 x {tokens:,} tokens x {hidden} hidden x 4 B = {act:,} B")
        if any(isinstance(s, MixedPrecision) for s in steps):
            hess = sum(4 * w * w for w in widths)
            parts.append(f"Hessians of all {len(widths)} linear layers (mixed precision keeps them) = {hess:,} B")
        else:
            per_block = _largest_block_hessians(model)
            hess = per_block or (4 * max(widths, default=0) ** 2)
            parts.append(f"one block's Hessians {hess:,} B")
    train = 0
    if any(getattr(s, "kind", None) == "finetune" or getattr(s, "trains", False)
           or getattr(s, "finetune", None) is not None for s in steps):
        train = 3 * weights
        parts.append(f"training: gradients + AdamW's two moments 3 x {weights:,} B = {train:,} B")
    total = 2 * weights + act + hess + train
    return {"bytes": total, "derivation": " + ".join(parts) + f" = {total:,} B ({total / 2**30:.2f} GiB)"}


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None (no check)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def check_job_fits(estimate: dict, available: int | None) -> None:
    if available is not None and estimate["bytes"] > available:
        raise ValueError(f"this compression job needs about {estimate['bytes'] / 2**30:.2f} GiB "
                         f"({estimate['derivation']}) but {available / 2**30:.2f} GiB of memory is available: "
                         "use fewer calibration samples (--calib with less text), run on a larger machine, or on a GPU")


def _tokens(batch) -> int:
    if isinstance(batch, dict):
        x = batch.get("input_ids", next(iter(batch.values())))
    elif isinstance(batch, (tuple, list)):
        x = batch[0]
    else:
        x = batch
    shape = getattr(x, "shape", ())
    if len(shape) >= 2 and not x.is_floating_point():  # token ids [batch, seq]
        return int(shape[0] * shape[1])
    return int(shape[0]) if len(shape) else 1  # e.g. images [batch, features]: one row each


def _largest_block_hessians(model: nn.Module) -> int:
    from shrink.surgery import find_blocks

    try:
        _, blocks = find_blocks(model)
    except (AttributeError, ValueError, TypeError):
        return 0
    return max((sum(4 * m.in_features ** 2 for m in b.modules() if isinstance(m, nn.Linear)) for b in blocks),
               default=0)


def predict_from_config(model_dir, steps: list, samples: int = 64, seq_len: int = 128) -> dict:
    """Peak memory of the job on the model in `model_dir`, in memory and streamed, from its
    config.json alone (plan/jobmem.py): {"recipe", "in_memory_bytes", "streamed_bytes",
    "parts", "derivation": {"in_memory": text, "streamed": text}}."""
    import json
    from pathlib import Path

    from shrink.plan.arch import from_hf_config
    from shrink.plan.jobmem import JobShape, job_memory
    from shrink.quant import QuantSpec

    from .steps import GPTQ, step_to_dict

    cfg = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32")
    step = steps[0]
    spec = step.spec() if hasattr(step, "spec") else QuantSpec(bits=8, granularity="channel", axis=0)
    job = JobShape(spec=spec, calibrated=isinstance(step, GPTQ), samples=samples, seq_len=seq_len,
                   weight_bytes=2 if dtype in ("bfloat16", "float16") else 4,
                   one_pass=bool(getattr(step, "true_sequential", False)),
                   label=" + ".join(next(iter(step_to_dict(s))) for s in steps))
    d: dict = {}
    out = job_memory(from_hf_config(Path(model_dir)), job, d)
    out["derivation"] = {"in_memory": d["job_memory[in_memory]"], "streamed": d["job_memory[streamed]"]}
    return out
