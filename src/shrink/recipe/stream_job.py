"""`shrink compress` on a model too big for memory: when run_job streams instead of loading.

run_job asks `stream_choice` first. It streams (recipe/stream.py) when the model is a
directory of safetensors weights of a streamable architecture, the recipe is streamable,
and the in-memory job would not fit in the memory available (recipe/memory.py's prediction
from the config, plan/jobmem.py); SHRINK_STREAM=1 forces streaming (tests, or a machine
where MemAvailable misleads), SHRINK_STREAM=0 never streams.

result.json of a streamed run has the usual recipe, steps, baseline and compressed sizes,
plus "streamed": true and "memory" (the predicted peaks and the measured peak resident
set). Quality needs the whole model in memory, the original and then the compressed one:
it is measured only when that fits; otherwise "quality" is absent and "quality_note"
says why (run `shrink eval DIR` on a larger machine)."""
from __future__ import annotations

import os
import resource
import time
from pathlib import Path
from types import SimpleNamespace

from shrink.fsutil import write_json_atomic

from .measure import four_ratios
from .memory import available_memory, predict_from_config
from .stream import unstreamable_model, unstreamable_recipe
from .steps import GPTQ

ENV = "SHRINK_STREAM"


def stream_choice(model_ref, steps: list) -> dict | None:
    """The memory prediction when this job is to be streamed, else None (run in memory)."""
    mode = os.environ.get(ENV, "auto").strip().lower()
    if mode in ("0", "never", "no", "off"):
        return None
    forced = mode in ("1", "always", "yes", "on")
    if unstreamable_model(model_ref) or unstreamable_recipe(steps):
        if forced:
            raise ValueError(f"{ENV}={mode}: " + (unstreamable_model(model_ref) or unstreamable_recipe(steps)))
        return None
    prediction = predict_from_config(Path(str(model_ref)).expanduser(), steps)
    available = available_memory()
    prediction["available_bytes"] = available
    if forced:
        prediction["why"] = f"{ENV}={mode}"
        return prediction
    if available is not None and prediction["in_memory_bytes"] > available:
        prediction["why"] = (f"the in-memory job needs about {prediction['in_memory_bytes'] / 2**30:.2f} GiB, "
                             f"{available / 2**30:.2f} GiB is available")
        return prediction
    return None


def calibration_for(model_ref, calib: str | None, seed: int, n_samples: int = 64, seq_len: int = 128) -> list:
    """The calibration batches job.prepare builds for a causal LM, without loading the model."""
    from shrink.data.calibration import calibration_batches
    from shrink.data.corpus import stdlib_corpus
    from shrink.models.io import load_tokenizer

    try:
        tok = load_tokenizer(model_ref)
    except (FileNotFoundError, ValueError, OSError):
        raise ValueError(f"{model_ref}: this model has no tokenizer for text calibration data; "
                         "use rtn or kmeans steps") from None
    source = calib if calib is not None else stdlib_corpus(max_train_chars=2_000_000,
                                                           max_heldout_chars=400_000).train_texts
    ids = calibration_batches(source, tok, n_samples=n_samples, seq_len=seq_len, seed=seed)
    return [{"input_ids": ids[i:i + 8]} for i in range(0, ids.shape[0], 8)]


def run_streamed_job(model_ref, steps: list, out_dir, prediction: dict, *, calib=None, eval_source=None,
                     seed: int = 0, device=None, progress=None, force: bool = False) -> dict:
    import torch

    from .figures import plan_section
    from .job import _jsonable
    from .resume import recipe_hash, versions
    from .steps import step_to_dict
    from .stream import stream_compress

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    batches = calibration_for(model_ref, calib, seed) if isinstance(steps[0], GPTQ) else None
    out = Path(out_dir)
    provenance = {"seed": seed, "recipe_sha256": recipe_hash(steps), "versions": versions()}
    res = stream_compress(model_ref, steps, out / "model", calibration=batches, progress=progress, force=force,
                          extra={"recipe": [step_to_dict(s) for s in steps], "source_model": str(model_ref),
                                 **provenance})
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    doc = {"model": str(model_ref), **res, "ratios": four_ratios(res["baseline"], res["compressed"]),
           "figures": {}, **provenance, "device": device, "calib": calib, "eval_source": eval_source,
           "streamed": True,
           "memory": {"predicted_streamed_bytes": prediction["streamed_bytes"],
                      "predicted_in_memory_bytes": prediction["in_memory_bytes"],
                      "available_bytes": prediction.get("available_bytes"), "why_streamed": prediction.get("why"),
                      "measured_peak_rss_bytes": peak, "derivation": prediction["derivation"]}}
    _quality(doc, model_ref, out / "model", prediction, eval_source, seed)
    doc["seconds"] = time.perf_counter() - t0
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(model_ref), local_files_only=True)
    doc["plan"], doc["roofline"] = plan_section(SimpleNamespace(config=config), doc["baseline"]["params"], device,
                                                {"baseline": doc["baseline"], "compressed": doc["compressed"]})
    write_json_atomic(out / "result.json", _jsonable(doc))
    return _jsonable(doc)


def _quality(doc: dict, model_ref, compressed_dir: Path, prediction: dict, eval_source, seed: int) -> None:
    """Baseline and compressed quality where the whole model fits (one at a time), else a note."""
    need = prediction["parts"]["runtime"] + prediction["parts"]["weights"]
    available = available_memory()
    if available is not None and need > available:
        doc["quality_note"] = (f"quality not measured: it needs the whole model in memory (about "
                               f"{need / 2**30:.2f} GiB, {available / 2**30:.2f} GiB available); run "
                               f"`shrink eval {compressed_dir.parent}` where it fits")
        return
    from shrink.models.io import load

    from .job import prepare

    prepared = prepare(str(model_ref), seed=seed, eval_source=eval_source)
    metric = prepared.metric   # a causal LM's perplexity: held-out text and tokenizer, not the model
    if metric is None:
        doc["quality_note"] = "quality not measured: the model has no tokenizer for held-out text"
        return
    doc["baseline"]["quality"] = metric(prepared.model)
    del prepared   # one whole model at a time
    doc["compressed"]["quality"] = metric(load(str(compressed_dir)))
    doc["ratios"] = four_ratios(doc["baseline"], doc["compressed"])
