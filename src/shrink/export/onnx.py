"""ONNX export (`export_onnx`) and its proof in ONNX Runtime (`verify_onnx`).

The model is exported with torch.onnx's dynamo exporter (torch.export, opset 21 by
default) with dynamic batch and sequence axes, from `plain_copy` (float32, compressed
layers holding their effective weights); then `onnx_quant.carry` rewrites each quantized
Linear to multiply by shrink's own codes (DequantizeLinear for 5-8 bits, MatMulNBits for
2-4 bits), so ONNX Runtime computes what shrink's dequantized model computes.

Kinds: a causal LM (inputs input_ids, attention_mask; output logits; exported without a
KV cache), an encoder (input_ids, attention_mask[, token_type_ids]; last_hidden_state),
a classifier (x; logits). Beside PATH the export writes the tokenizer (save_pretrained)
and PATH.json, the sidecar `shrink.models.onnx_model` reads (kind, inputs, outputs, the
carried layers, the file's size and sha256, the source model).

Usage (what `shrink export --format onnx` does):

    info = export_onnx(model, "out/model.onnx", tokenizer=tok, source="tiny-gpt")
    report = verify_onnx("out/model.onnx", model, tok)   # raises VerificationError on disagreement
"""
from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from shrink.export.dense import carried_layers, is_compressed, plain_copy
from shrink.export.verify import VerificationError, compare_logits, heldout_ids
from shrink.fsutil import replace_files
from shrink.models.io import is_causal_lm

QUANT_MODES = ("auto", "none", "int8", "int4")
MIN_OPSET = 18
DEFAULT_OPSET = 21        # blocked DequantizeLinear (int8 per group) needs 21
EXTERNAL_DATA_BYTES = 1_900_000_000   # protobuf's 2 GB limit, with room for the graph
# ONNX Runtime against shrink's model holding the weights the file stores (its dequantized
# float32 copy): the same function, so only float32 summation order differs. Measured
# (onnxruntime 1.32, CPU): relative RMS error 1.8e-7 to 2.0e-7 on tiny-gpt's logits (fp32,
# int8 QDQ, int4 RTN/GPTQ/AWQ as MatMulNBits), 0.9e-6 to 1.2e-6 on MiniLM's hidden states,
# top-1 agreement 1.0 everywhere: 1e-4 leaves a wide margin yet sits ten times below the
# int4 rounding a wrongly packed code would add (1e-3 and more).
TOLERANCES = {
    "causal-lm": {"max_rel_rmse": 1e-4, "min_top1_agreement": 0.99},
    "encoder": {"max_rel_rmse": 1e-4, "min_cosine": 0.9999},
    "classifier": {"max_rel_rmse": 1e-4, "min_agreement": 0.99},
}


# ----------------------------------------------------------------------------- what can be exported

def model_kind(model: nn.Module) -> str:
    """"causal-lm", "encoder" or "classifier"; a ValueError for what this exporter cannot carry
    (checked before any work)."""
    from shrink.models.onnx_model import OnnxModel

    if not isinstance(model, nn.Module):
        raise TypeError(f"export_onnx: expected an nn.Module, got {type(model).__name__}")
    if isinstance(model, OnnxModel):
        raise ValueError(f"{model.path}: the model is already an ONNX file; copy it instead of exporting it again")
    name = type(model).__name__
    config = getattr(model, "config", None)
    if config is not None:
        if getattr(config, "is_encoder_decoder", False):
            raise ValueError(f"{name}: encoder-decoder models are not supported by the ONNX export "
                             "(causal LMs and encoders only)")
        params = inspect.signature(model.forward).parameters
        if "input_ids" not in params:
            raise ValueError(f"{name}: the ONNX export takes text models (input_ids); this model takes "
                             f"{', '.join(list(params)[:3])}")
        if is_causal_lm(model):
            if getattr(model, "get_output_embeddings", lambda: None)() is None:
                raise ValueError(f"{name}: a causal LM without an output head")
            return "causal-lm"
        if getattr(model, "base_model", None) is model:
            return "encoder"
        raise ValueError(f"{name}: the ONNX export handles causal LMs (...ForCausalLM) and base encoders "
                         f"(BertModel-like, returning last_hidden_state), not a task head like {name}")
    if _classifier_features(model) is None:
        raise ValueError(f"{name}: cannot tell this model's input; the ONNX export takes transformers text "
                         "models and nn.Sequential classifiers starting with a Linear or an Unflatten (digits)")
    return "classifier"


def _classifier_features(model: nn.Module) -> int | None:
    first = model[0] if isinstance(model, nn.Sequential) and len(model) else None
    from shrink.modules import InputScaled, QuantLinear, W8A8Linear

    if isinstance(first, InputScaled):
        first = first.inner
    if isinstance(first, (nn.Linear, QuantLinear, W8A8Linear)):
        return int(first.in_features)
    if isinstance(first, nn.Unflatten) and first.dim == 1:
        return int(np.prod(first.unflattened_size))
    return None


def _require(*names: str) -> None:
    import importlib.util

    missing = [n for n in names if importlib.util.find_spec(n) is None]
    if missing:
        raise ImportError(f"the ONNX export needs {', '.join(missing)}: pip install 'shrink[export]'")


def _check_args(path: Path, quant: str, opset: int) -> None:
    if path.suffix.lower() != ".onnx":
        raise ValueError(f"{path}: an ONNX export is written to a file ending in .onnx")
    if path.is_dir():
        raise ValueError(f"{path}: is a directory; give the .onnx file to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(path.parent, os.W_OK):
        raise ValueError(f"{path.parent}: not writable; choose another place for the .onnx file")
    if quant not in QUANT_MODES:
        raise ValueError(f"export_onnx: quant must be one of {', '.join(QUANT_MODES)}, got {quant!r}")
    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f"export_onnx: opset must be an integer >= {MIN_OPSET}, got {opset!r}")


def quantize_for_export(model: nn.Module, quant: str) -> tuple[nn.Module, dict | None]:
    """`model` as it will be exported: quant "int8"/"int4" on a float model first rounds its
    Linears with shrink's RTN (int8: symmetric per channel; int4: asymmetric, groups of 32 —
    MiniLM keeps 0.973 embedding cosine so, 0.954 with groups of 128); returns (model, the
    step applied or None). Deterministic, so verify_onnx re-applies it to the same float model."""
    if quant not in ("int8", "int4"):
        return model, None
    if is_compressed(model):
        raise ValueError(f"quant={quant!r}: the model is already compressed; export it with quant='auto' to "
                         "carry its own codes")
    from shrink.recipe import RTN, compress

    if quant == "int8":
        steps = [RTN(bits=8, group_size=None, symmetric=True)]
    else:
        steps = [RTN(bits=4, group_size=32)]
    result = compress(model, steps, measure_speed=False)
    step = steps[0]
    return result.model, {"rtn": {"bits": step.bits, "group_size": step.group_size, "symmetric": step.symmetric}}


# ----------------------------------------------------------------------------- torch -> ONNX

class _TextGraph(nn.Module):
    """The exported signature: named integer inputs in, one tensor out."""

    def __init__(self, model: nn.Module, kind: str):
        super().__init__()
        self.m, self.kind = model, kind

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        kw = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kw["token_type_ids"] = token_type_ids
        if self.kind == "causal-lm":
            return self.m(**kw, use_cache=False, return_dict=True).logits
        return self.m(**kw, return_dict=True).last_hidden_state


@contextlib.contextmanager
def _quiet_exporter():
    """torch.onnx logs and warns freely (missing torchvision ops, deprecations); a library stays quiet."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _torch_to_onnx(plain: nn.Module, kind: str, opset: int, features: int | None):
    """(ModelProto, input names, output names) of `plain` with dynamic batch (and sequence) axes."""
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    if kind == "classifier":
        graph, names, outputs = plain, ["x"], ["logits"]
        args = (torch.rand(2, features),)
        shapes = ({0: batch},)
    else:
        params = inspect.signature(plain.forward).parameters
        types = kind == "encoder" and "token_type_ids" in params
        names = ["input_ids", "attention_mask"] + (["token_type_ids"] if types else [])
        outputs = ["logits" if kind == "causal-lm" else "last_hidden_state"]
        graph = _TextGraph(plain, kind)
        vocab = int(getattr(plain.config, "vocab_size", 2) or 2)
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(1, max(2, vocab), (2, 16), generator=gen)
        args = (ids, torch.ones_like(ids)) + ((torch.zeros_like(ids),) if len(names) == 3 else ())
        shapes = {n: {0: batch, 1: seq} for n in names}
    graph.eval()
    with _quiet_exporter(), torch.no_grad():
        try:
            program = torch.onnx.export(graph, args, None, dynamo=True, opset_version=opset, input_names=names,
                                        output_names=outputs, dynamic_shapes=shapes, verbose=False,
                                        optimize=True)
        except Exception as e:
            raise ValueError(f"{type(plain).__name__}: torch.onnx could not export the model: "
                             f"{str(e).strip().splitlines()[0][:400]}") from e
    return program.model_proto, names, outputs


# ----------------------------------------------------------------------------- export

def export_onnx(model: nn.Module, path: str | os.PathLike, *, tokenizer=None, quant: str = "auto",
                opset: int = DEFAULT_OPSET, source: str | None = None) -> dict:
    """Write `model` to `path` (.onnx) for ONNX Runtime; return what was written.

    quant: "auto" carries the integer codes of the layers shrink quantized (float for the
    rest), "none" exports everything in float (the effective weights), "int8"/"int4" first
    quantize a float model's Linears with shrink's RTN (see `quantize_for_export`).
    tokenizer: saved beside the file (save_pretrained into its directory).
    source: the model's name or path, recorded so `shrink eval` scores the file against it.

    Returns {"path", "kind", "inputs", "outputs", "opset", "bytes", "quantized": {layer:
    {"op", "bits", ...}}, "float_layers": {compressed layer exported in float: why},
    "unused_layers": [quantized layers the exported outputs do not use, e.g. BERT's pooler],
    "quantized_by_export", "sidecar", "tokenizer_files", "external_data", "seconds"}.
    The model is not modified."""
    t0 = time.perf_counter()
    path = Path(path).expanduser()
    _check_args(path, quant, opset)
    _require("onnx", "onnxscript")
    kind = model_kind(model)
    model, applied = quantize_for_export(model, quant)
    grids, why_not = carried_layers(model)
    if quant == "none":
        why_not = {**{n: "quant='none': exported in float" for n in grids}, **why_not}
        grids = {}
    plain = plain_copy(model).cpu()
    modules = dict(plain.named_modules())
    weights = {name: modules[name].weight.detach().to(torch.float32).numpy() for name in grids}
    features = _classifier_features(plain) if kind == "classifier" else None
    proto, inputs, outputs = _torch_to_onnx(plain, kind, opset, features)
    from shrink.export.onnx_quant import carry

    carried, not_found, unused = carry(proto, weights, grids, opset)
    why_not.update(not_found)
    config = getattr(plain, "config", None)
    archs = list(getattr(config, "architectures", None) or [])
    from onnx import helper

    helper.set_model_props(proto, {"shrink.kind": kind, "shrink.architectures": ",".join(archs)})
    proto.producer_name = "shrink"
    from shrink.models.onnx_model import SIDECAR_FORMAT, _sha256, sidecar_path

    # Every file is written in a hidden staging directory beside PATH, then the group is put in
    # place (tokenizer files, external data, the .onnx, its sidecar last): a failure anywhere
    # (a full disk) leaves the previous export as it was, and no mix of old and new loads.
    stage = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        staged = stage / path.name
        external = _write_model(proto, staged)
        tok_dir = stage / "tokenizer"
        tok_files = _write_tokenizer(tokenizer, tok_dir) if tokenizer is not None else []
        meta = {
            "format": SIDECAR_FORMAT, "version": 1, "kind": kind, "inputs": inputs, "outputs": outputs,
            "dynamic_axes": {n: ["batch"] if kind == "classifier" else ["batch", "sequence"] for n in inputs},
            "opset": opset, "params": sum(p.numel() for p in plain.parameters()), "architectures": archs,
            "model_type": getattr(config, "model_type", None),
            "source_model": source, "onnx_bytes": staged.stat().st_size, "onnx_sha256": _sha256(staged),
            "external_data": external,
            "external_data_bytes": (stage / external).stat().st_size if external else None,
            "quantized": carried, "float_layers": why_not, "unused_layers": unused,
            "quantized_by_export": applied, "tokenizer_files": tok_files,
        }
        side = stage / sidecar_path(path).name
        side.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        replace_files([(tok_dir / n, path.parent / n) for n in tok_files]
                      + ([(stage / external, path.parent / external)] if external else [])
                      + [(staged, path), (side, sidecar_path(path))])
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return {"path": str(path), "kind": kind, "inputs": inputs, "outputs": outputs, "opset": opset,
            "bytes": meta["onnx_bytes"] + (Path(path.parent / external).stat().st_size if external else 0),
            "quantized": carried, "float_layers": why_not, "unused_layers": unused, "quantized_by_export": applied,
            "sidecar": str(sidecar_path(path)), "tokenizer_files": tok_files, "external_data": external,
            "seconds": time.perf_counter() - t0}


def _write_model(proto, path: Path) -> str | None:
    """Write the model to `path` (in the staging directory); weights go to PATH.data beside it past
    protobuf's 2 GB (returns that name)."""
    weight_bytes = sum(len(t.raw_data) for t in proto.graph.initializer)
    if weight_bytes < EXTERNAL_DATA_BYTES:
        path.write_bytes(proto.SerializeToString())
        return None
    import onnx

    data_name = path.name + ".data"
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024)
    return data_name


def _write_tokenizer(tokenizer, folder: Path) -> list[str]:
    """Save the tokenizer into `folder` (in the staging directory); the files' names."""
    folder.mkdir()
    tokenizer.save_pretrained(str(folder))
    return sorted(p.name for p in folder.iterdir() if p.is_file())


# ----------------------------------------------------------------------------- verification

def _latency_ms(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@torch.no_grad()
def _text_batches(kind: str, tokenizer, n_tokens: int) -> list[dict[str, torch.Tensor]]:
    """Held-out inputs: batch 1, and a padded batch of 2 of another length (two shapes)."""
    if kind == "causal-lm":
        ids = heldout_ids(tokenizer, n_tokens)
        half = len(ids) // 2
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        rows = [ids[:half], ids[half:half + max(4, half - 17)]]
        width = max(len(r) for r in rows)
        two = torch.full((2, width), pad, dtype=torch.int64)
        mask = torch.zeros((2, width), dtype=torch.int64)
        for i, r in enumerate(rows):
            two[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        one = torch.tensor([ids])
        return [{"input_ids": one, "attention_mask": torch.ones_like(one)},
                {"input_ids": two, "attention_mask": mask}]
    from shrink.data.corpus import sentences_from, stdlib_corpus

    sentences = sentences_from(stdlib_corpus(max_train_chars=1, max_heldout_chars=200_000).heldout_texts, n=16)
    if len(sentences) < 2:
        raise ValueError("the held-out text gives fewer than 2 sentences to verify the encoder with")
    enc = lambda s: dict(tokenizer(s, padding=True, truncation=True, max_length=128, return_tensors="pt"))  # noqa: E731
    return [enc(sentences[:1]), enc(sentences)]


def _feeds(batch: dict, names: list[str]) -> dict:
    return {n: batch[n] for n in names if n in batch}


@torch.no_grad()
def _run_text(kind: str, model, batches: list[dict], names: list[str]) -> list[torch.Tensor]:
    """The logits / last hidden state of each batch, float32."""
    extra = {"use_cache": False} if kind == "causal-lm" and not hasattr(model, "session") else {}
    outs = [model(**_feeds(b, names), **extra) for b in batches]
    return [(o.logits if kind == "causal-lm" else o.last_hidden_state).float() for o in outs]


def _agree_text(kind: str, got: list, ref: list, batches: list[dict]) -> dict:
    """Agreement over the positions the attention masks keep (padding is not compared)."""
    g_all, r_all, cos, max_abs = [], [], [], 0.0
    for g, r, batch in zip(got, ref, batches):
        mask = batch["attention_mask"].bool()
        if kind == "encoder":
            m = mask.unsqueeze(-1).float()
            eg, er = (g * m).sum(1) / m.sum(1), (r * m).sum(1) / m.sum(1)
            cos += torch.nn.functional.cosine_similarity(eg, er, dim=-1).tolist()
        g_all.append(g[mask].numpy())
        r_all.append(r[mask].numpy())
        max_abs = max(max_abs, float((g[mask] - r[mask]).abs().max()))
    a = compare_logits(np.concatenate(g_all), np.concatenate(r_all))
    shapes = [list(b["input_ids"].shape) for b in batches]
    if kind == "causal-lm":
        return {**a.as_dict(), "batches": shapes}
    return {"mean_cosine": float(np.mean(cos)), "min_cosine": float(np.min(cos)), "rel_rmse": a.rel_rmse,
            "max_abs": max_abs, "sentences": len(cos), "batches": shapes}


@torch.no_grad()
def _run_classifier(model, x: torch.Tensor) -> torch.Tensor:
    """Logits of the whole batch and of its first example alone (two batch sizes)."""
    return torch.cat([model(x).float(), model(x[:1]).float()])


def _agree_classifier(got: torch.Tensor, ref: torch.Tensor, x: torch.Tensor) -> dict:
    a = compare_logits(got.numpy(), ref.numpy())
    return {"rel_rmse": a.rel_rmse, "max_abs": a.max_abs, "agreement": a.top1, "examples": int(x.shape[0]),
            "batches": [list(x.shape), [1, *x.shape[1:]]]}


def _passes(kind: str, r: dict) -> bool:
    tol = TOLERANCES[kind]
    if r["rel_rmse"] > tol["max_rel_rmse"]:
        return False
    if kind == "causal-lm":
        return r["top1_agreement"] >= tol["min_top1_agreement"]
    if kind == "encoder":
        return r["min_cosine"] >= tol["min_cosine"]
    return r["agreement"] >= tol["min_agreement"]


def verify_onnx(path: str | os.PathLike, model: nn.Module, tokenizer=None, *, inputs: torch.Tensor | None = None,
                n_tokens: int = 256, runs: int = 5, strict: bool = True) -> dict:
    """Run the exported file in ONNX Runtime and compare it with shrink's model.

    model: the model given to export_onnx (quantized again the same way when the export did so).
    tokenizer: for text models; inputs: a classifier's examples (default: the digits test split).

    Compared against (a) shrink's model holding the weights the file stores (its dequantized
    float32 copy), in a session that computes in float32: beyond TOLERANCES this raises
    VerificationError (strict); (b) the same under ONNX Runtime's default options, which
    quantize activations to int8 where they fuse a DequantizeLinear into MatMulNBits
    (recorded); (c) shrink's model as it runs, with its quantized kernels (recorded).
    Latency: ONNX Runtime's batch-1 forward under default options, median of `runs`."""
    from shrink.models.onnx_model import OnnxModel, load_onnx, open_session, read_sidecar

    path = Path(path).expanduser()
    meta = read_sidecar(path) or {}
    exact = load_onnx(path, exact=True)
    kind = exact.kind
    qdq = any(v.get("op") == "DequantizeLinear" for v in (meta.get("quantized") or {}).values())
    deployed = OnnxModel(path, open_session(path), kind, exact.meta) if qdq else exact
    applied = meta.get("quantized_by_export")
    if applied:
        model, _ = quantize_for_export(model, "int8" if applied["rtn"]["bits"] == 8 else "int4")
    float32 = all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    stored = model if float32 and not is_compressed(model) else plain_copy(model).cpu()
    was_training = model.training
    model.eval()
    try:
        report = _verify(path, kind, exact, deployed, stored, model, qdq, tokenizer, inputs, n_tokens, runs)
    finally:
        model.train(was_training)
    if strict and not report["passed"]:
        raise VerificationError(
            f"{path}: ONNX Runtime disagrees with shrink's model holding the same weights: "
            f"{_describe(kind, report['vs_stored_weights'])} (allowed: {TOLERANCES[kind]}). The file is kept for "
            "inspection; this is a bug in the export, please report it")
    return report


def _verify(path, kind, exact, deployed, stored, model, qdq, tokenizer, inputs, n_tokens, runs) -> dict:
    if kind == "classifier":
        if inputs is None:
            from shrink.models.digits import digits_data

            inputs = digits_data().x_test
        run = lambda m: _run_classifier(m, inputs)  # noqa: E731
        agree = lambda got, ref: _agree_classifier(got, ref, inputs)  # noqa: E731
        feeds = {exact.input_names[0]: inputs[:1].numpy()}
    else:
        if tokenizer is None:
            raise ValueError(f"{path}: verifying a text model needs its tokenizer")
        batches = _text_batches(kind, tokenizer, n_tokens)
        names = exact.input_names
        run = lambda m: _run_text(kind, m, batches, names)  # noqa: E731
        agree = lambda got, ref: _agree_text(kind, got, ref, batches)  # noqa: E731
        feeds = {k: v.numpy() for k, v in _feeds(batches[0], names).items()}
    outs = {"exact": run(exact), "stored": run(stored)}
    outs["deployed"] = run(deployed) if deployed is not exact else outs["exact"]
    vs_stored = agree(outs["exact"], outs["stored"])
    report = {
        "runtime": f"onnxruntime {__import__('onnxruntime').__version__} (CPUExecutionProvider)",
        "kind": kind, "vs_stored_weights": vs_stored,
        "vs_stored_weights_default_options": agree(outs["deployed"], outs["stored"]) if qdq else vs_stored,
        "vs_shrink_model": agree(outs["deployed"], run(model)) if is_compressed(model) else vs_stored,
        "tolerance": TOLERANCES[kind],
        "latency": {"onnxruntime_batch1_ms": _latency_ms(lambda: deployed.run(feeds), runs),
                    "batch1_shape": list(next(iter(feeds.values())).shape), "runs": runs,
                    "threads": deployed.session.get_session_options().intra_op_num_threads},
    }
    report["passed"] = _passes(kind, vs_stored)
    return report


def _describe(kind: str, r: dict) -> str:
    if kind == "causal-lm":
        return (f"logits relative RMS error {r['rel_rmse']:.3g}, top-1 agreement {r['top1_agreement']:.3f} "
                f"over {r['tokens']} tokens")
    if kind == "encoder":
        return f"embedding cosine min {r['min_cosine']:.6f}, hidden-state relative RMS error {r['rel_rmse']:.3g}"
    return f"logits relative RMS error {r['rel_rmse']:.3g}, prediction agreement {r['agreement']:.3f}"
