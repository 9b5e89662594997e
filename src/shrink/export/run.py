"""`export(model_ref, format, out)`: write a model in a deployment format and prove it
in that format's runtime; the record (what was written, per-tensor types for GGUF, the
agreement measured in the runtime) goes to a JSON beside the artifact:
``PATH.export.json`` for a file, ``PATH/export.json`` for a directory.

Formats: ``gguf:TYPE`` (llama.cpp), ``onnx`` / ``onnx:int8`` / ``onnx:int4`` (ONNX Runtime),
``safetensors`` (a Hugging Face directory for transformers) and ``safetensors:packed``
(shrink's own compressed directory).
"""
from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from pathlib import Path

from shrink.export.gguf import TYPES as GGUF_TYPES
from shrink.fsutil import write_json_atomic

FORMATS = ("safetensors", "safetensors:packed", "onnx", "onnx:int8", "onnx:int4",
           *(f"gguf:{t}" for t in GGUF_TYPES))
_RUNTIMES = {"gguf": ("llama_cpp", "llama.cpp's Python binding (pip install 'shrink[export]'; it builds "
                                   "llama.cpp from source, ~10 minutes)"),
             "onnx": ("onnxruntime", "ONNX Runtime (pip install 'shrink[export]')"),
             "safetensors": ("transformers", "transformers (pip install 'shrink[models]')")}


def parse_format(fmt: str) -> tuple[str, str | None]:
    """('gguf', 'Q4_K_M'), ('onnx', None | 'int8' | 'int4'), ('safetensors', None | 'packed')."""
    kind, _, sub = str(fmt).partition(":")
    if kind == "gguf":
        sub = sub.upper() if sub.lower() != "auto" else "auto"
    name = f"{kind}:{sub}" if sub else kind
    if name not in FORMATS:
        raise ValueError(f"--format {fmt}: unknown export format; choose safetensors, safetensors:packed, onnx, "
                         f"onnx:int8, onnx:int4 or gguf:TYPE with TYPE one of {', '.join(GGUF_TYPES)}")
    return kind, sub or None


def check_runtime(kind: str) -> None:
    module, what = _RUNTIMES[kind]
    if importlib.util.find_spec(module) is None:
        raise ValueError(f"verifying a {kind} export needs {what}; install it, or pass --no-verify to write the "
                         "file without proof that it loads")


def tokenizer_for(model_ref: str):
    """The tokenizer of `model_ref`, or of the model a compressed DIR was made from; None for a
    model without one (the digits classifiers)."""
    from shrink.models.io import load_tokenizer
    from shrink.recipe.job import source_of

    for ref in dict.fromkeys((str(model_ref), source_of(model_ref))):
        try:
            return load_tokenizer(ref)
        except (FileNotFoundError, ValueError, OSError):
            continue
    return None


def record_path(out: Path) -> Path:
    return out / "export.json" if out.is_dir() else out.with_name(out.name + ".export.json")


def export(model_ref: str, fmt: str, out: str | Path, *, verify: bool = True,
           progress: Callable[[int, int], None] | None = None, n_tokens: int = 256) -> dict:
    """Write `model_ref` (a built-in name, a model path or a DIR from compress) as `fmt` to `out`,
    verify it in its runtime unless verify=False, and return the record (also written as JSON
    beside the artifact). Raises ValueError for bad input before any work, and
    `VerificationError` when the runtime disagrees beyond the format's expected error."""
    from shrink.export.verify import heldout_ids
    from shrink.models.io import is_causal_lm, load
    from shrink.recipe.job import _jsonable, source_of

    kind, sub = parse_format(fmt)
    if verify:
        check_runtime(kind)
    out = Path(out).expanduser()
    t0 = time.perf_counter()
    model = load(model_ref)
    tokenizer = tokenizer_for(model_ref)
    record: dict = {"format": f"{kind}:{sub}" if sub else kind, "source": str(model_ref),
                    "source_model": source_of(model_ref), "path": str(out)}
    model = _full_depth(model, kind, record)
    causal = is_causal_lm(model)
    if kind == "gguf":
        from shrink.export.gguf import arch_of, write_gguf

        arch_of(model)
        if tokenizer is None:
            raise ValueError(f"{model_ref}: GGUF export needs the model's tokenizer, and none was found")
        written = write_gguf(model, tokenizer, out, sub, name=Path(str(model_ref)).name, progress=progress)
        types = {t["type"] for t in written.tensors}
        record.update(arch=written.arch, bytes=written.nbytes, tensors=written.tensors,
                      carried=sum(t["carried"] for t in written.tensors),
                      tensor_types=sorted(types))
        if verify:
            from shrink.export.verify import verify_gguf

            record["verification"] = verify_gguf(out, model, written.state, types, heldout_ids(tokenizer, n_tokens))
    elif kind == "onnx":
        if importlib.util.find_spec("shrink.export.onnx") is None:
            raise ValueError("ONNX export is not part of this build of shrink yet; use gguf:TYPE or safetensors")
        from shrink.export.onnx import export_onnx, verify_onnx

        record.update(export_onnx(model, out, tokenizer=tokenizer, quant=sub or "auto", source=record["source_model"]))
        if verify:
            record["verification"] = verify_onnx(out, model, tokenizer)
    elif sub == "packed":
        from shrink.export.hf import verify_packed, write_packed

        base = {"kind": "hf"} if getattr(model, "config", None) is not None else \
            {"kind": "builtin", "name": source_of(model_ref)}
        write_packed(model, out, base=base, extra=_packed_extra(model_ref))
        record["bytes"] = _dir_bytes(out)
        if verify:
            record["verification"] = verify_packed(out, model)
    else:
        from shrink.export.hf import check_hf_exportable, verify_hf_dir, write_hf_dir

        check_hf_exportable(model)
        write_hf_dir(model, tokenizer, out)
        record["bytes"] = _dir_bytes(out)
        if verify:
            if tokenizer is None:
                raise ValueError(f"{model_ref}: verifying the Hugging Face export needs the model's tokenizer")
            ids = [heldout_ids(tokenizer, min(n_tokens, 128))]
            record["verification"] = verify_hf_dir(out, model, ids, causal)
    record["verified"] = bool(record.get("verification", {}).get("passed", False))
    record["seconds"] = time.perf_counter() - t0
    write_json_atomic(record_path(out), _jsonable(record))
    return record


def _full_depth(model, kind: str, record: dict):
    """An early-exit model in a static format (ONNX, GGUF) is its base alone, and the record
    says so; shrink's own packed directory keeps the exits."""
    from shrink.modules import EarlyExitModel

    if not isinstance(model, EarlyExitModel) or kind not in ("onnx", "gguf"):
        return model
    record["early_exit"] = {**model.describe(), "exported": (
        "the full-depth path only (the base model and its final head): a static graph cannot express a "
        "data-dependent exit, so the exit heads are not in the file and every input runs all layers")}
    return model.base


def _packed_extra(model_ref: str) -> dict:
    """The recipe and source of a compressed DIR, carried into the packed copy's manifest."""
    from shrink.models.checks import read_json_object
    from shrink.models.compressed import is_compressed_dir

    p = Path(str(model_ref)).expanduser()
    for candidate in (p, p / "model"):
        if is_compressed_dir(candidate):
            manifest = read_json_object(candidate / "manifest.json", "compressed-model manifest")
            return {k: v for k, v in manifest.items() if k not in ("format", "version", "base", "modules")}
    return {"source_model": str(model_ref)}


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())

