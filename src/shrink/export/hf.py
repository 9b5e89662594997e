"""safetensors exports.

- `safetensors`: a Hugging Face directory (config.json + model.safetensors + tokenizer)
  that transformers loads on its own. A compressed model is written as its effective
  float32 weights (fake-quantized: the dequantized values), so the file is as large as
  the original and computes what shrink's model computes. A model whose shapes its config
  cannot say (heads or MLP neurons removed per layer) also gets a generated modeling file
  and an auto_map (hf_resized.py): transformers loads it with trust_remote_code=True.
- `safetensors:packed`: shrink's own compressed directory (packed codes, scales and a
  manifest with each layer's spec, the recipe and the metrics) that `shrink.load`
  rebuilds bit-exactly.

Verification: the HF directory is loaded by transformers in a separate Python process
that never imports shrink, and its outputs on held-out inputs are compared with shrink's;
the packed directory is loaded with `shrink.load` and every tensor compared bit for bit.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from shrink.export.dense import plain_copy
from shrink.export.hf_resized import add_remote_code, has_remote_code, resized_description
from shrink.export.verify import VerificationError, compare_logits
from shrink.fsutil import replace_dir

# max relative RMS error of the outputs; transformers runs the same float32 weights, so only
# the order of floating-point operations differs
HF_TOLERANCE = 1e-4

_RUNNER = r"""
import json, sys, time
import numpy as np, torch, transformers
args = json.loads(sys.argv[1])
cls = getattr(transformers, args["auto"])
model = cls.from_pretrained(args["dir"], local_files_only=True, trust_remote_code=args["remote_code"]).eval()
ids = torch.tensor(args["ids"])
with torch.no_grad():
    t0 = time.perf_counter()
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    elapsed = time.perf_counter() - t0
y = out.logits if hasattr(out, "logits") else out.last_hidden_state
np.save(args["out"], y.float().numpy())
with open(args["info"], "w") as f:
    json.dump({"seconds": elapsed, "class": type(model).__name__,
               "shrink_imported": any(m == "shrink" or m.startswith("shrink.") for m in sys.modules)}, f)
"""


def check_hf_exportable(model: nn.Module) -> None:
    if getattr(model, "config", None) is None or not hasattr(model, "save_pretrained"):
        raise ValueError(f"safetensors export: {type(model).__name__} is not a transformers model, so there is no "
                         "Hugging Face directory to write; use --format safetensors:packed (shrink's own format) "
                         "or --format onnx")


def write_hf_dir(model: nn.Module, tokenizer, out: str | Path) -> Path:
    """config + model.safetensors (+ tokenizer) written atomically (a temporary sibling renamed);
    plus shrink_resized.py and the config entries that load it when the model's shapes differ
    from its config's (see hf_resized.py)."""
    check_hf_exportable(model)
    plain = plain_copy(model)
    resized = resized_description(plain)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        if resized is not None:
            add_remote_code(plain, tmp, resized)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def verify_hf_dir(out: Path, model: nn.Module, ids: list[list[int]], causal: bool) -> dict:
    """Load `out` with transformers in a fresh process (no shrink) and compare its outputs with
    shrink's model (and with the float weights written, which must agree to rounding). A directory
    with an auto_map is loaded with trust_remote_code=True, its code copied to a temporary
    modules cache (HF_MODULES_CACHE) that goes with the process."""
    remote = has_remote_code(out)
    with tempfile.TemporaryDirectory() as td:
        npy = Path(td) / "y.npy"
        args = {"dir": str(out), "ids": ids, "out": str(npy), "auto": "AutoModelForCausalLM" if causal else "AutoModel",
                "info": str(Path(td) / "info.json"), "remote_code": remote}
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        if remote:
            env["HF_MODULES_CACHE"] = str(Path(td) / "modules")
        proc = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(args)], capture_output=True, text=True,
                              env=env, timeout=600)
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1:] or ["(no message)"]
            raise VerificationError(f"{out}: transformers could not load or run the exported directory: {tail[0]}")
        info = json.loads((Path(td) / "info.json").read_text())
        got = np.load(npy)
    batch = torch.tensor(ids)
    with torch.no_grad():
        plain = plain_copy(model)
        y_plain = _outputs(plain, batch)
        y_model = _outputs(model, batch)
    flat = lambda a: a.reshape(-1, a.shape[-1])  # noqa: E731
    vs_written = compare_logits(flat(got), flat(y_plain))
    vs_model = compare_logits(flat(got), flat(y_model))
    report = {"runtime": f"transformers (separate process, class {info['class']})",
              "shrink_imported": info["shrink_imported"], "remote_code": remote, "tokens": int(batch.numel()),
              "vs_stored_weights": vs_written.as_dict(), "vs_shrink_model": vs_model.as_dict(),
              "tolerance": {"max_rel_rmse": HF_TOLERANCE},
              "latency": {"forward_ms": 1000 * info["seconds"], "batch": int(batch.shape[0]),
                          "tokens": int(batch.shape[1])}}
    report["passed"] = vs_written.rel_rmse <= HF_TOLERANCE and not info["shrink_imported"]
    if not report["passed"]:
        raise VerificationError(f"{out}: transformers' outputs differ from shrink's: relative RMS error "
                                f"{vs_written.rel_rmse:.3g} (allowed {HF_TOLERANCE:g}); the directory is kept for "
                                "inspection; this is a bug in the export, please report it")
    return report


def _outputs(model: nn.Module, batch: torch.Tensor) -> np.ndarray:
    out = model(input_ids=batch, attention_mask=torch.ones_like(batch))
    y = out.logits if hasattr(out, "logits") else out.last_hidden_state
    return y.float().numpy()


def write_packed(model: nn.Module, out: str | Path, *, base: dict, extra: dict) -> Path:
    from shrink.models.compressed import save_compressed

    return save_compressed(model, out, base=base, extra=extra)


def verify_packed(out: Path, model: nn.Module) -> dict:
    """`shrink.load(out)` must give back every tensor bit for bit."""
    from shrink.models.io import load

    t0 = time.perf_counter()
    back = load(out)
    load_s = time.perf_counter() - t0
    mine, theirs = model.state_dict(), back.state_dict()
    differ = sorted(k for k in mine if k not in theirs or mine[k].dtype != theirs[k].dtype
                    or mine[k].shape != theirs[k].shape or not torch.equal(mine[k], theirs[k]))
    extra = sorted(set(theirs) - set(mine))
    report = {"runtime": "shrink.load", "tensors": len(mine), "bit_exact": not differ and not extra,
              "load_s": load_s}
    report["passed"] = report["bit_exact"]
    if not report["passed"]:
        raise VerificationError(f"{out}: shrink.load does not give back the same tensors: "
                                f"{', '.join((differ + extra)[:5])} differ; this is a bug, please report it")
    return report
