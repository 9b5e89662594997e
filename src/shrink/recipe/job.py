"""`shrink compress MODEL --recipe R -o DIR` as a library call: load the model, build its
calibration data and quality metric, run the recipe, write DIR/model/ and DIR/result.json.

Quality metric by model kind: perplexity on held-out standard-library modules for
causal LMs, embedding fidelity to the original on held-out sentences for encoders,
accuracy on the held-out split for the digits classifiers.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from torch import nn

from shrink.fsutil import fsync_file, temp_path_for
from shrink.models.io import is_causal_lm

from .figures import plan_section
from .measure import measure
from .memory import available_memory, check_job_fits, job_memory
from .rules import check_order
from .run import CompressResult, compress
from .steps import needs_calibration, parse_recipe

Progress = Callable[[str, int, int], None]


PROXY_SAMPLES, PROXY_TOKENS, PROXY_SENTENCES = 16, 4096, 32


class Prepared(NamedTuple):
    model: nn.Module
    batches: list | None          # calibration batches (model inputs)
    metric: Callable | None       # quality metric on held-out data
    base: dict                    # how save_compressed describes the base model
    train: list | None = None     # labeled training batches where the model has labels (digits)


def prepare(model_ref: str, calib: str | None = None, n_samples: int = 64, seq_len: int = 128,
            seed: int = 0, proxy: bool = False, eval_source: str | None = None,
            ) -> Prepared:
    """(model, calibration batches, metric, base description for saving, labeled training
    batches or None).

    eval_source: held-out text to score on instead of the standard-library modules (a .txt
    or .jsonl file): perplexity for a causal LM, embedding fidelity on its lines for an encoder.

    proxy: the cheap version search screens candidates with: a quarter of the
    calibration samples and a quarter of the held-out tokens (sentences for encoders)."""
    if proxy:
        n_samples = min(n_samples, PROXY_SAMPLES)
    if eval_source is not None and not Path(str(eval_source)).is_file() and str(eval_source) != "stdlib:heldout":
        raise FileNotFoundError(f"--eval {eval_source}: no such file; give held-out text as a .txt file or a "
                                ".jsonl file with a \"text\" field per line")
    from shrink.data.calibration import calibration_batches, calibration_texts, sentence_batches
    from shrink.data.corpus import sentences_from, stdlib_corpus
    from shrink.eval.quality import accuracy_metric, embedding_metric, perplexity_metric
    from shrink.models.io import BUILTIN_NAMES, load, load_tokenizer

    model = load(model_ref)
    name = str(model_ref)
    if type(model).__name__ == "OnnxModel":
        raise ValueError(f"{model_ref}: an ONNX file runs in ONNX Runtime and its graph cannot be recompressed; "
                         f"compress the model it was exported from ({source_of(model_ref)!s}) or a Hugging Face "
                         "directory, then export that")
    if name in ("digits-mlp", "digits-cnn"):
        from shrink.models.digits import digits_data

        if eval_source is not None:
            raise ValueError(f"--eval {eval_source}: {name} is scored on its own held-out digits split; "
                             "--eval takes text, for language models and encoders")
        split = digits_data()
        # calibration: the first n_samples * 4 training images (never the test split), batches of 64
        x = split.x_train[: max(64, 4 * n_samples)]
        batches = [x[i:i + 64] for i in range(0, x.shape[0], 64)]
        # training steps (qat, distill, early_exit, finetune with loss ce) learn from the whole
        # labeled training split
        from shrink.data.labeled import labeled_batches

        train = labeled_batches(split.x_train, split.y_train)
        return Prepared(model, batches, accuracy_metric(split.x_test, split.y_test), {"kind": "builtin", "name": name},
                        train)
    base = {"kind": "hf"} if getattr(model, "config", None) is not None else {"kind": "builtin", "name": name}
    try:
        try:
            tok = load_tokenizer(model_ref)
        except (FileNotFoundError, ValueError, OSError):
            if source_of(model_ref) == str(model_ref):
                raise
            tok = load_tokenizer(source_of(model_ref))   # a compressed DIR reads text as its source model does
    except (FileNotFoundError, ValueError, OSError):
        if eval_source is not None:
            raise ValueError(f"--eval {eval_source}: {model_ref} has no tokenizer to read the text with") from None
        return Prepared(model, None, None, base)
    corpus = stdlib_corpus(max_train_chars=2_000_000, max_heldout_chars=400_000)
    source = calib if calib is not None else corpus.train_texts
    held_out = corpus.heldout_texts if eval_source is None else calibration_texts(eval_source)
    if is_causal_lm(model):
        ids = calibration_batches(source, tok, n_samples=n_samples, seq_len=seq_len, seed=seed)
        batches = [{"input_ids": ids[i:i + 8]} for i in range(0, ids.shape[0], 8)]
        metric = perplexity_metric(tok, held_out, seq_len=seq_len,
                                   max_tokens=PROXY_TOKENS if proxy else 16384)
    else:
        # An encoder is calibrated on sentences framed as it reads them: 8 per sample asked for.
        texts = calibration_texts(source)
        sentences = sentences_from(texts, n=8 * n_samples) if calib is None else _lines(texts, 8 * n_samples)
        batches = sentence_batches(tok, sentences, max_length=seq_len)
        n_eval = PROXY_SENTENCES if proxy else 64
        eval_sentences = (sentences_from(held_out, n=n_eval) if eval_source is None
                          else _lines(held_out, 4 * n_eval))
        metric = embedding_metric(model, tok, eval_sentences)
    return Prepared(model, batches, metric, base)


def _lines(texts: list[str], n: int) -> list[str]:
    """A user's calibration text for an encoder: its non-empty lines, up to n."""
    out = [line.strip() for t in texts for line in t.splitlines() if line.strip()]
    if not out:
        raise ValueError("the calibration text has no non-empty lines to use as sentences")
    return out[:n]


def run_job(model_ref: str, recipe, out_dir: str | Path, *, calib: str | None = None,
            eval_source: str | None = None, seed: int = 0,
            device: str | None = None, force: bool = False, progress: Progress | None = None,
            resume: bool = False, note: Callable[[str], None] | None = None) -> dict:
    """device: a name from the plan's device table; the result's plan then says whether each
    format fits there and draws the roofline of that device.

    The run checkpoints into DIR/.resume (recipe/resume.py), removed once DIR is written;
    resume=True continues the interrupted run found there (the same bytes as an uninterrupted
    run), refusing the state of a different run."""
    from shrink.plan.devices import get_device

    steps = parse_recipe(recipe)  # fail on a bad recipe before loading anything
    check_order(steps, force=force)
    if device is not None:
        get_device(device)  # an unknown device fails now, not after the run
    from .stream_job import run_streamed_job, stream_choice

    streamed = stream_choice(model_ref, steps)   # too big for memory (or SHRINK_STREAM=1): block by block
    if streamed is not None:
        if resume and note is not None:
            note("shrink compress: a streamed job does not checkpoint; --resume starts it over")
        return run_streamed_job(model_ref, steps, out_dir, streamed, calib=calib, eval_source=eval_source,
                                seed=seed, device=device, progress=progress, force=force)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    existed = Path(out_dir).exists()
    try:
        prepared = prepare(model_ref, calib=calib, seed=seed, eval_source=eval_source)
        return run_prepared(prepared, model_ref, steps, out_dir, seed=seed, device=device, progress=progress, t0=t0,
                            force=force, extra={"calib": calib, "eval_source": eval_source},
                            checkpoint="resume" if resume else "fresh", note=note)
    except BaseException:
        if not existed and Path(out_dir).is_dir() and not any(Path(out_dir).iterdir()):
            Path(out_dir).rmdir()   # a failed run leaves no empty DIR behind (DIR/.resume stays when it has one)
        raise


def run_prepared(prepared, model_ref: str, steps: list, out_dir: str | Path | None, *, seed: int = 0,
                 device: str | None = None, progress: Progress | None = None, t0: float | None = None,
                 measure_speed: bool = True, baseline: dict | None = None, force: bool = False,
                 extra: dict | None = None, checkpoint: str | None = None,
                 note: Callable[[str], None] | None = None) -> dict:
    """run_job on a model already prepared (search reuses one preparation for many recipes);
    out_dir None: measure only, save nothing. checkpoint "fresh" or "resume": checkpoint into
    out_dir/.resume (and continue the run there); None: no checkpoints. note(message): where the
    checkpoints' notes go (resuming from where, an old state discarded); None: nowhere."""
    from shrink.models.compressed import save_compressed

    from .resume import Checkpointer, recipe_hash, run_key, versions

    t0 = time.perf_counter() if t0 is None else t0
    model, batches, metric, base, train = prepared
    torch.manual_seed(seed)
    if batches is None and any(needs_calibration(s) for s in steps):
        raise ValueError(f"{model_ref}: this model has no text calibration data; use rtn or kmeans steps")
    memory = job_memory(model, steps, batches)
    check_job_fits(memory, available_memory())  # before any step runs
    ck = None
    if checkpoint is not None and out_dir is not None:
        key = run_key(model_ref, model, steps, seed, batches=batches, train=train,
                      calib=(extra or {}).get("calib"), eval_source=(extra or {}).get("eval_source"))
        ck = Checkpointer(out_dir, key, base=base, resume=checkpoint == "resume", warn=note)
    try:
        res: CompressResult = compress(model, steps, calibration=batches, evaluate=metric, progress=progress,
                                       measure_speed=measure_speed, baseline=baseline, force=force,
                                       train_data=train, seed=seed, checkpoint=ck)
    except BaseException:
        if ck is not None:
            ck.abandon()   # a failure before any checkpoint leaves no state behind
        raise
    provenance = {"seed": seed, "recipe_sha256": recipe_hash(steps), "versions": versions()}
    doc = {"model": str(model_ref), **res.to_json(), "seconds": time.perf_counter() - t0, **provenance,
           "device": device, "job_memory": memory, **(extra or {})}
    doc["plan"], doc["roofline"] = plan_section(model, doc["baseline"]["params"], device,
                                                {"baseline": doc["baseline"], "compressed": doc["compressed"]})
    if out_dir is not None:
        out = Path(out_dir)
        # result.json is finished under a temporary name first, then the model directory goes
        # in place (one atomic exchange), then result.json: a failure (a full disk) leaves the
        # previous pair as it was, never a new model beside an old result.json
        with temp_path_for(out / "result.json") as tmp:
            tmp.write_bytes((json.dumps(_jsonable(doc), indent=2) + "\n").encode())
            fsync_file(tmp)
            save_compressed(res.model, out / "model", base=base,
                            extra={"recipe": doc["recipe"], "source_model": str(model_ref), **provenance})
            os.replace(tmp, out / "result.json")
        if ck is not None:
            ck.finish()
    return _jsonable(doc)


def source_of(model_ref: str) -> str:
    """The model a compressed directory was made from (its manifest's source_model), else model_ref."""
    from shrink.models.compressed import is_compressed_dir

    p = Path(str(model_ref)).expanduser()
    if p.suffix.lower() == ".onnx" and p.is_file():   # an ONNX export names its source in its sidecar
        from shrink.models.onnx_model import onnx_source_model

        return onnx_source_model(p) or str(model_ref)
    for candidate in (p, p / "model"):
        if is_compressed_dir(candidate):
            from shrink.models.checks import read_json_object

            manifest = read_json_object(candidate / "manifest.json", "shrink-compressed manifest")
            source = manifest.get("source_model")
            if not source or not isinstance(source, str):
                raise ValueError(f"{candidate}/manifest.json names no source_model: cannot rebuild its data and metric")
            return str(source)
    return str(model_ref)


def evaluate_job(model_ref: str, seed: int = 0, eval_source: str | None = None) -> dict:
    """Measure a model (a built-in name, a model directory, or a DIR from compress) as compress
    does: size, parameters, quality on the held-out data of its kind, batch-1 and batched latency,
    and the energy estimate. A compressed model is scored against the model it was made from."""
    from shrink.eval.latency import latency_probe
    from shrink.models.io import load

    torch.manual_seed(seed)
    source = source_of(model_ref)
    reference, batches, metric, _, _ = prepare(source, seed=seed, eval_source=eval_source)
    model = reference if source == str(model_ref) else load(model_ref)
    probe = latency_probe(batches[0]) if batches else None
    return {"model": str(model_ref), "source_model": source, "eval_source": eval_source,
            **measure(model, metric, probe)}


def _jsonable(obj):
    import math

    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj
