"""An .onnx file run in ONNX Runtime, behind the interface of shrink's other models.

`load_onnx(path)` checks the file before anything runs it and refuses a truncated or
corrupt one with a ValueError naming the file and what is wrong (the field and byte offset
where its protobuf framing breaks, the node the ONNX checker rejects, or a size/checksum
that differs from what the export recorded). It returns an `OnnxModel`, an nn.Module whose
forward feeds ONNX Runtime and returns what the exported model returned:

- a causal LM: an object with `.logits` (forward(input_ids, attention_mask=None));
- an encoder: an object with `.last_hidden_state` (forward(input_ids, attention_mask=None,
  token_type_ids=None));
- a classifier: the logits tensor (forward(x)).

What a file is comes from the sidecar shrink's export writes beside it (`<file>.json`:
kind, inputs, outputs, size and sha256 of the file, the source model) or, for an .onnx
from elsewhere, from its `shrink.kind` metadata or its output names. The tokenizer of a
text model is the one saved beside the file (`load_onnx_tokenizer`).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

KINDS = ("causal-lm", "encoder", "classifier")
SIDECAR_FORMAT = "shrink-onnx"


def sidecar_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p.with_name(p.name + ".json")


@dataclass(frozen=True)
class OnnxConfig:
    """The little of a Hugging Face config that shrink's evaluation reads (`architectures`)."""
    architectures: tuple[str, ...] = ()
    model_type: str | None = None
    kind: str = "causal-lm"


@dataclass
class OnnxOutput:
    logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)

    def __getitem__(self, i: int) -> torch.Tensor:
        return (self.logits if self.logits is not None else self.last_hidden_state, *self.extra.values())[i]


class OnnxModel(nn.Module):
    """An ONNX Runtime session as a model (see the module docstring). Holds no torch weights."""

    def __init__(self, path: Path, session, kind: str, meta: dict, exact: bool = False):
        super().__init__()
        self.exact = exact
        self.path = path
        self.session = session
        self.kind = kind
        self.meta = meta
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]
        archs = tuple(meta.get("architectures") or ())
        self.config = None if kind == "classifier" else OnnxConfig(archs, meta.get("model_type"), kind)
        self.eval()

    @property
    def stored_nbytes(self) -> int:
        """Bytes on disk: the .onnx file and its external data file, if any."""
        data = self.meta.get("external_data")
        return self.path.stat().st_size + ((self.path.parent / data).stat().st_size if data else 0)

    @property
    def stored_params(self) -> int | None:
        """The exported model's parameter count, as the export recorded it (None if unknown)."""
        n = self.meta.get("params")
        return n if isinstance(n, int) else None

    def extra_repr(self) -> str:
        return f"path={str(self.path)!r}, kind={self.kind}, inputs={self.input_names}, outputs={self.output_names}"

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, feeds)

    def forward(self, *args, **kwargs):
        if self.kind == "classifier":
            x = args[0] if args else kwargs.get("x", kwargs.get(self.input_names[0]))
            if x is None:
                raise TypeError(f"{self.path.name}: a classifier takes one input tensor")
            out = self.run({self.input_names[0]: _numpy(x, np.float32)})
            return torch.from_numpy(out[0])
        names = ("input_ids", "attention_mask", "token_type_ids")
        given = dict(zip(names, args))
        given.update({k: v for k, v in kwargs.items() if k in names and v is not None})
        ids = given.get("input_ids")
        if ids is None:
            raise TypeError(f"{self.path.name}: forward needs input_ids")
        ids = _numpy(ids, np.int64)
        if ids.ndim == 1:
            ids = ids[None]
        feeds = {}
        for name in self.input_names:
            v = given.get(name)
            if name == "input_ids":
                feeds[name] = ids
            elif v is not None:
                feeds[name] = _numpy(v, np.int64).reshape(ids.shape)
            elif name == "attention_mask":
                feeds[name] = np.ones_like(ids)
            elif name == "token_type_ids":
                feeds[name] = np.zeros_like(ids)
            else:
                raise TypeError(f"{self.path.name}: no value for the graph input {name!r}")
        outs = dict(zip(self.output_names, self.run(feeds)))
        first = torch.from_numpy(outs.pop(self.output_names[0]))
        rest = {k: torch.from_numpy(v) for k, v in outs.items()}
        if self.kind == "causal-lm":
            return OnnxOutput(logits=first, extra=rest)
        return OnnxOutput(last_hidden_state=first, extra=rest)


def _numpy(x, dtype) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(x), dtype=dtype)


# ----------------------------------------------------------------------------- checking a file

def read_sidecar(path: Path) -> dict | None:
    """The export's description of `path`, or None when there is none (an .onnx from elsewhere)."""
    side = sidecar_path(path)
    if not side.is_file():
        return None
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{side}: not valid JSON ({e}); delete it or export {path.name} again") from None
    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
        raise ValueError(f"{side}: not a shrink ONNX description (no \"format\": \"{SIDECAR_FORMAT}\")")
    if meta.get("kind") not in KINDS:
        raise ValueError(f"{side}: kind must be one of {', '.join(KINDS)}, got {meta.get('kind')!r}")
    return meta


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_onnx_file(path: str | os.PathLike) -> tuple[object, dict | None]:
    """(the parsed ModelProto without external data, the sidecar or None); ValueError naming
    the file and what is wrong for anything that is not a well-formed ONNX model."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    size = path.stat().st_size
    meta = read_sidecar(path)
    if meta is not None and isinstance(meta.get("onnx_bytes"), int) and meta["onnx_bytes"] != size:
        raise ValueError(f"{path}: the file is {size:,} bytes but its export wrote {meta['onnx_bytes']:,} "
                         f"({'truncated' if size < meta['onnx_bytes'] else 'grown'} since); export it again")
    external = (meta or {}).get("external_data")
    if external:
        if not isinstance(external, str) or Path(external).name != external or external in (".", ".."):
            raise ValueError(f"{sidecar_path(path)}: external_data {external!r} is not a file name beside the "
                             ".onnx (paths are refused); export it again")
        data_file = path.parent / external
        want = meta.get("external_data_bytes")
        if not data_file.is_file():
            raise ValueError(f"{path}: its weights file {data_file.name} is missing (it must lie beside the .onnx)")
        if isinstance(want, int) and data_file.stat().st_size != want:
            raise ValueError(f"{data_file}: the weights file is {data_file.stat().st_size:,} bytes but its export "
                             f"wrote {want:,}; export {path.name} again")
    if size == 0:
        raise ValueError(f"{path}: the file is empty (0 bytes), not an ONNX model")
    data = path.read_bytes()
    try:
        proto = onnx.load_model_from_string(data)
    except Exception as e:  # protobuf's DecodeError says little: find where the framing breaks
        where = framing_error(data)
        raise ValueError(f"{path}: not a valid ONNX file ({size:,} bytes): "
                         f"{where or f'the protobuf does not parse ({type(e).__name__})'}") from None
    if not proto.HasField("graph") or not proto.graph.node or not proto.graph.output:
        what = "no graph" if not proto.HasField("graph") else "the graph has no nodes or no outputs"
        raise ValueError(f"{path}: not a usable ONNX model ({size:,} bytes): {what}")
    _check_external_data(proto, path)
    try:
        # with its weights in a file beside it, the checker must know where the model lies
        outside = any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
        onnx.checker.check_model(str(path) if outside else proto)
    except Exception as e:
        raise ValueError(f"{path}: the ONNX checker rejects it: {str(e).strip().splitlines()[0][:300]}") from None
    if meta is not None and meta.get("onnx_sha256") and _sha256(path) != meta["onnx_sha256"]:
        raise ValueError(f"{path}: its contents differ from what the export wrote (sha256 mismatch with "
                         f"{sidecar_path(path).name}): the file is corrupt; export it again")
    _check_finite_initializers(proto, path)
    return proto, meta


def _all_tensors(proto):
    """Every TensorProto of the model: initializers and attribute values, subgraphs included."""
    try:
        from onnx.external_data_helper import _get_all_tensors
    except ImportError:   # an onnx without the helper: the initializers, where exporters put weights
        return list(proto.graph.initializer)
    return list(_get_all_tensors(proto))


def _check_external_data(proto, path: Path) -> None:
    """Every tensor stored outside the .onnx names a file inside the model's directory (a
    location that climbs out of it, absolute or through a link, is refused: a model file must
    not make shrink read other files) that exists and holds the bytes the tensor declares."""
    import onnx

    folder = path.parent.resolve()
    for t in _all_tensors(proto):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        where = f"{path}: tensor {t.name[:120]!r}"
        info = {e.key: e.value for e in t.external_data}
        location = info.get("location", "")
        rel = Path(location)
        if not location or rel.is_absolute() or ".." in rel.parts or "\\" in location or ":" in location:
            raise ValueError(f"{where}: external data location {location[:200]!r} is not a file name inside the "
                             "model's directory; shrink refuses locations outside it")
        target = (folder / rel).resolve()
        if folder not in target.parents:
            raise ValueError(f"{where}: external data {location[:200]!r} leads outside the model's directory "
                             "(through a link); shrink refuses it")
        if not target.is_file():
            raise ValueError(f"{where}: its external data file {location[:200]!r} is missing (it must lie beside "
                             "the .onnx)")
        try:
            offset = int(info.get("offset", "0"))
            length = int(info["length"]) if "length" in info else None
        except ValueError:
            raise ValueError(f"{where}: external data offset/length are not integers; the file is corrupt") from None
        size = target.stat().st_size
        if offset < 0 or offset > size or (length is not None and (length < 0 or offset + length > size)):
            raise ValueError(f"{where}: external data at offset {offset} (length {length}) runs past the end of "
                             f"{location[:200]} ({size:,} bytes); the weights file is truncated: export it again")


def _check_finite_initializers(proto, path: Path) -> None:
    """Float weights stored in the model hold no NaN or inf (one tensor in memory at a time)."""
    import onnx
    from onnx import numpy_helper

    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16)
    for t in proto.graph.initializer:
        if t.data_type not in floats:
            continue
        try:
            arr = numpy_helper.to_array(t, base_dir=str(path.parent))
        except Exception as e:  # noqa: BLE001 - onnx's own errors on a tensor whose bytes do not fit its dims
            raise ValueError(f"{path}: initializer {t.name[:120]!r} cannot be read ({type(e).__name__}: "
                             f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}); the file is "
                             "corrupt: export it again") from None
        if not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).sum())
            raise ValueError(f"{path}: initializer {t.name[:120]!r} of shape {list(arr.shape)} holds {bad} NaN/inf "
                             "value(s); the weights are corrupt or the model diverged: fix them and export again")


# wire format: field number -> (name, sub-message fields or None), for the messages worth naming;
# "#name" is the field holding an element's own name
_TENSOR = {1: ("dims", None), 2: ("data_type", None), 8: ("name", None), 9: ("raw_data", None),
           13: ("external_data", None), "#name": 8}
_NODE = {1: ("input", None), 2: ("output", None), 3: ("name", None), 4: ("op_type", None),
         5: ("attribute", None), 6: ("doc_string", None), 7: ("domain", None), 9: ("metadata_props", None),
         "#name": 3}
_VALUE = {1: ("name", None), "#name": 1}
_GRAPH = {1: ("node", _NODE), 5: ("initializer", _TENSOR), 11: ("input", _VALUE), 12: ("output", _VALUE),
          13: ("value_info", _VALUE)}
_MODEL = {1: ("ir_version", None), 2: ("producer_name", None), 3: ("producer_version", None),
          4: ("domain", None), 5: ("model_version", None), 6: ("doc_string", None), 7: ("graph", _GRAPH),
          8: ("opset_import", {}), 14: ("metadata_props", {}), 25: ("functions", {})}


def _varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= end or shift > 63:
            raise IndexError
        b = buf[pos]
        value |= (b & 0x7F) << shift
        pos += 1
        shift += 7
        if not b & 0x80:
            return value, pos


def _name_in(buf: bytes, start: int, end: int, number: int) -> str | None:
    """The string field `number` of the message in buf[start:end], if its framing allows reading it."""
    pos = start
    try:
        while pos < end:
            tag, pos = _varint(buf, pos, end)
            wire = tag & 7
            if wire == 0:
                _, pos = _varint(buf, pos, end)
            elif wire in (1, 5):
                pos += 8 if wire == 1 else 4
            elif wire == 2:
                length, pos = _varint(buf, pos, end)
                if tag >> 3 == number and pos + length <= end:
                    return buf[pos:pos + length].decode("utf-8", "replace")[:120]
                pos += length
            else:
                return None
    except IndexError:
        return None
    return None


def framing_error(buf: bytes, start: int = 0, end: int | None = None, fields: dict | None = None,
                  where: str = "model") -> str | None:
    """Where the protobuf framing of an ONNX ModelProto breaks: the innermost named field
    (e.g. graph.initializer[12] 'lm_head.weight') and its byte offset; None when every
    length and tag of the named messages is consistent."""
    end = len(buf) if end is None else end
    fields = _MODEL if fields is None else fields
    pos, counts = start, {}
    while pos < end:
        at = pos
        try:
            tag, pos = _varint(buf, pos, end)
        except IndexError:
            return f"{where}: a field tag at offset {at} runs past the end of the data (truncated?)"
        number, wire = tag >> 3, tag & 7
        if number == 0:
            return f"{where}: field number 0 at offset {at} (the bytes are corrupt)"
        name, sub = fields.get(number, (f"field {number}", None))
        i = counts.get(number, 0)
        counts[number] = i + 1
        label = f"{where}.{name}"
        try:
            if wire == 0:
                _, pos = _varint(buf, pos, end)
            elif wire in (1, 5):
                pos += 8 if wire == 1 else 4
                if pos > end:
                    raise IndexError
            elif wire == 2:
                length, body = _varint(buf, pos, end)
                if sub is not None:
                    label = f"{label}[{i}]" if name != "graph" else label
                    own = _name_in(buf, body, min(end, body + length), sub["#name"]) if "#name" in sub else None
                    label += f" {own!r}" if own else ""
                if body + length > end:
                    cut = (f"{label} at offset {at} declares {length:,} bytes but only {end - body:,} remain "
                           f"(the file is {len(buf):,} bytes: truncated or corrupt)")
                    inner = framing_error(buf, body, end, sub, label) if sub else None
                    return inner or cut
                pos = body + length
                if sub:
                    inner = framing_error(buf, body, pos, sub, label)
                    if inner:
                        return inner
            else:
                return f"{label} at offset {at}: invalid wire type {wire} (the bytes are corrupt)"
        except IndexError:
            return f"{label} at offset {at} runs past the end of the data (truncated?)"
    return None


# ----------------------------------------------------------------------------- loading

def _kind_of(proto, meta: dict | None) -> str:
    if meta is not None:
        return meta["kind"]
    props = {p.key: p.value for p in proto.metadata_props}
    if props.get("shrink.kind") in KINDS:
        return props["shrink.kind"]
    outs = [o.name for o in proto.graph.output]
    ins = {i.name for i in proto.graph.input} - {t.name for t in proto.graph.initializer}
    if "input_ids" in ins:
        return "encoder" if outs and outs[0] == "last_hidden_state" else "causal-lm"
    return "classifier"


def load_onnx(path: str | os.PathLike, threads: int | None = None, exact: bool = False) -> OnnxModel:
    """An ONNX model checked and opened in ONNX Runtime (CPU); see the module docstring.

    exact: keep ONNX Runtime from quantizing activations to int8 where it fuses a
    DequantizeLinear + MatMul into MatMulNBits (its default, accuracy level 4, does), so the
    session computes the file's function in float32; the default runs as deployed."""
    path = Path(path).expanduser()
    proto, meta = check_onnx_file(path)
    kind = _kind_of(proto, meta)
    props = {p.key: p.value for p in proto.metadata_props}
    info = dict(meta or {})
    if "architectures" not in info and props.get("shrink.architectures"):
        info["architectures"] = props["shrink.architectures"].split(",")
    if "external_data" not in info:   # a file from elsewhere: its weights file, if one
        places = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
        info["external_data"] = places.pop() if len(places) == 1 else None
    del proto
    return OnnxModel(path, open_session(path, threads, exact), kind, info, exact)


def open_session(path: Path, threads: int | None = None, exact: bool = False):
    """An ONNX Runtime CPU session on a file already checked (see load_onnx for `exact`)."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ImportError("running an .onnx model needs ONNX Runtime: pip install 'shrink[export]'") from e
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads or max(1, torch.get_num_threads())
    if exact:
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")   # fp32
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own exception types
        raise ValueError(f"{path}: ONNX Runtime cannot load it: {str(e).strip()[:400]}") from None


def load_onnx_tokenizer(path: str | os.PathLike):
    """The tokenizer saved beside an exported .onnx (AutoTokenizer on its directory)."""
    path = Path(path).expanduser()
    meta = read_sidecar(path) if path.is_file() else None
    if meta is not None and meta["kind"] == "classifier":
        raise ValueError(f"{path}: a classifier, with no tokenizer")
    folder = path.parent
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        raise FileNotFoundError(f"{path}: no tokenizer files beside it (tokenizer.json, tokenizer_config.json or "
                                "vocab.txt in the same directory)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def onnx_source_model(path: str | os.PathLike) -> str | None:
    """The model an exported .onnx was made from (a built-in name or a path that still
    exists), for scoring it against that model; None when unknown or gone."""
    try:
        meta = read_sidecar(Path(path))
    except ValueError:
        return None
    source = (meta or {}).get("source_model")
    if not isinstance(source, str) or not source:
        return None
    from shrink.models.io import BUILTIN_NAMES

    return source if source in BUILTIN_NAMES or Path(source).expanduser().exists() else None
