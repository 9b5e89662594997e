"""Reading GGUF files (llama.cpp's container) into shrink: `shrink eval x.gguf`, `shrink.load("x.gguf")`.

- `check_gguf(path)` parses and validates the whole container (little-endian, versions 2
  and 3) before anything is trusted: every count, length, type id and offset is checked
  against the bytes that remain, so a truncated or corrupt file is refused with a
  ValueError naming the file, the field and its byte offset, never a crash deeper down.
- `load_gguf(path)` rebuilds a transformers model for the `llama` and `gpt2`
  architectures: hparams to a config, tensors dequantized to float32 (gguf's dequantizers
  cover F32/F16/BF16, Q*_0/Q*_1 and the k-quants), llama.cpp names mapped back to Hugging
  Face names, and the Q/K row order that llama.cpp's converter applies undone.
- `load_gguf_tokenizer(path)` rebuilds the tokenizer from `tokenizer.ggml.*`
  (`shrink.models.gguf_tokenizer`).
"""
from __future__ import annotations

import math
import mmap
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Mapping

import numpy as np
import torch

from shrink.models.checks import check_finite_tensor

SUPPORTED_ARCHITECTURES = ("llama", "gpt2")
_CORRUPT = "the file is corrupt; export or download it again"
_TRUNCATED = "the file is truncated or corrupt; export or download it again"
# GGUF value types: id -> (struct format, size); 8 is a string, 9 an array
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
            6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_STRING, _ARRAY = 8, 9
_VALUE_NAMES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "bool", "string", "array",
                "uint64", "int64", "float64")
_MAX_NESTING = 8


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]   # NumPy/PyTorch order (slowest dimension first): GGUF's ne reversed
    ggml_type: int
    type_name: str
    offset: int              # absolute byte offset of the data in the file
    nbytes: int
    info_offset: int         # where the tensor's description starts, for messages


@dataclass(frozen=True)
class GGUFInfo:
    path: Path
    version: int
    alignment: int
    data_offset: int
    file_size: int
    metadata: Mapping[str, object]
    key_offsets: Mapping[str, int]
    tensors: Mapping[str, GGUFTensor] = field(repr=False)

    def fail(self, key: str, what: str, todo: str = _CORRUPT) -> ValueError:
        at = f" at byte offset {self.key_offsets[key]}" if key in self.key_offsets else ""
        return ValueError(f"{self.path}: metadata {key!r}{at}: {what}; {todo}")


class _Parser:
    def __init__(self, path: Path, buf, size: int):
        self.path, self.buf, self.size, self.pos = path, buf, size, 0

    def fail(self, what_field: str, at: int, what: str, todo: str = _CORRUPT) -> ValueError:
        return ValueError(f"{self.path}: {what_field} at byte offset {at}: {what}; {todo}")

    def take(self, n: int, what_field: str) -> int:
        if n > self.size - self.pos:
            raise self.fail(what_field, self.pos, f"needs {n} bytes but only {self.size - self.pos} remain "
                                                  f"before the end of the file ({self.size} bytes)", _TRUNCATED)
        start, self.pos = self.pos, self.pos + n
        return start

    def scalar(self, vtype: int, what_field: str):
        fmt, size = _SCALARS[vtype]
        return struct.unpack_from(fmt, self.buf, self.take(size, what_field))[0]

    def string(self, what_field: str) -> str:
        at = self.pos
        n = self.scalar(10, f"{what_field} length")
        if n > self.size - self.pos:
            raise self.fail(what_field, at, f"string length {n} runs past the end of the file "
                                            f"({self.size - self.pos} bytes remain)", _TRUNCATED)
        start = self.take(n, what_field)
        try:
            return self.buf[start:start + n].decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(what_field, start + e.start, "not valid UTF-8") from None

    def value(self, vtype: int, what_field: str, at: int, depth: int = 0):
        """The value of type `vtype` at self.pos; `at`: where its type id was read, for messages."""
        if vtype in _SCALARS:
            return self.scalar(vtype, what_field)
        if vtype == _STRING:
            return self.string(what_field)
        if vtype != _ARRAY:
            raise self.fail(f"{what_field} type", at, f"unknown value type {vtype} (known: 0-12)")
        if depth >= _MAX_NESTING:
            raise self.fail(what_field, at, f"arrays nested more than {_MAX_NESTING} deep")
        at = self.pos
        etype = self.scalar(4, f"{what_field} element type")
        count = self.scalar(10, f"{what_field} element count")
        least = _SCALARS[etype][1] if etype in _SCALARS else {_STRING: 8, _ARRAY: 12}.get(etype)
        if least is None:
            raise self.fail(f"{what_field} element type", at, f"unknown value type {etype} (known: 0-12)")
        if count * least > self.size - self.pos:
            raise self.fail(f"{what_field} element count", at + 4, f"{count} {_VALUE_NAMES[etype]} elements need at least "
                                                                   f"{count * least} bytes, only {self.size - self.pos} remain",
                            _TRUNCATED)
        if etype in _SCALARS:
            start = self.take(count * least, what_field)
            arr = np.frombuffer(self.buf[start:start + count * least], dtype=_SCALARS[etype][0])
            return arr.astype(bool) if etype == 7 else arr
        return [self.value(etype, f"{what_field}[{i}]", self.pos, depth + 1) for i in range(count)]


def _ggml_types():
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    return {int(t): (t.name, *GGML_QUANT_SIZES[t]) for t in GGMLQuantizationType if t in GGML_QUANT_SIZES}


def check_gguf(path) -> GGUFInfo:
    """Parse and validate a GGUF file's header, metadata and tensor table; raise ValueError
    naming the file, the field and its byte offset on anything wrong."""
    path = Path(path)
    size = path.stat().st_size
    if size < 24:
        raise ValueError(f"{path}: header at byte offset 0: the file has {size} bytes, a GGUF header needs 24; "
                         f"{'it is not a GGUF file' if size < 4 or _head(path) != b'GGUF' else _TRUNCATED}")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        return _parse(path, buf, size)


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4)


def _parse(path: Path, buf, size: int) -> GGUFInfo:
    p = _Parser(path, buf, size)
    magic = buf[0:4]
    if magic != b"GGUF":
        raise p.fail("magic", 0, f"expected b'GGUF', found {magic!r}", "this is not a GGUF file")
    p.pos = 4
    version = p.scalar(4, "version")
    if version not in (2, 3):
        why = ("a big-endian GGUF, which shrink does not read" if struct.unpack("<I", struct.pack(">I", version))[0] in (2, 3)
               else f"unsupported version {version}")
        raise p.fail("version", 4, why, "shrink reads little-endian GGUF versions 2 and 3")
    n_tensors, n_kv = p.scalar(10, "tensor count"), p.scalar(10, "metadata count")
    if n_kv * 13 + n_tensors * 24 > size - p.pos:  # the smallest a KV pair and a tensor description can be
        raise p.fail("tensor and metadata counts", 8, f"{n_tensors} tensors and {n_kv} metadata entries cannot "
                                                      f"fit in the {size - p.pos} bytes after the header", _TRUNCATED)
    metadata, offsets = {}, {}
    for i in range(n_kv):
        at = p.pos
        key = p.string(f"metadata key {i}")
        if key in metadata:
            raise p.fail(f"metadata key {key!r}", at, "appears twice")
        vtype = p.scalar(4, f"metadata {key!r} type")
        offsets[key] = at
        metadata[key] = p.value(vtype, f"metadata {key!r}", p.pos - 4)
    alignment = metadata.get("general.alignment", 32)
    if not (_is_int(alignment) and alignment > 0 and alignment & (alignment - 1) == 0):
        raise p.fail("metadata 'general.alignment'", offsets.get("general.alignment", 0),
                     f"{alignment!r} is not a positive power of two")
    types, raw = _ggml_types(), []
    for i in range(n_tensors):
        at = p.pos
        name = p.string(f"tensor {i} name")
        label = f"tensor {name!r}"
        n_dims = p.scalar(4, f"{label} n_dims")
        if not 1 <= n_dims <= 4:
            raise p.fail(f"{label} n_dims", p.pos - 4, f"{n_dims} dimensions (GGUF allows 1 to 4)")
        dims = [p.scalar(10, f"{label} dimension {d}") for d in range(n_dims)]
        if min(dims) == 0:
            raise p.fail(f"{label} dimensions", p.pos - 8 * n_dims, f"{dims} has a zero dimension")
        gtype = p.scalar(4, f"{label} type")
        if gtype not in types:
            raise p.fail(f"{label} type", p.pos - 4, f"unknown ggml type {gtype}",
                         "the file is corrupt or from a newer llama.cpp than the installed gguf package knows")
        type_name, block, type_size = types[gtype]
        if dims[0] % block:
            raise p.fail(f"{label} dimensions", p.pos - 4 - 8 * n_dims,
                         f"row length {dims[0]} is not a multiple of {type_name}'s block of {block}")
        offset_at = p.pos
        offset = p.scalar(10, f"{label} offset")
        raw.append((name, tuple(reversed(dims)), gtype, type_name, offset, math.prod(dims) // block * type_size, at, offset_at))
    data_offset = -(-p.pos // alignment) * alignment
    tensors, spans = {}, []
    for name, shape, gtype, type_name, offset, nbytes, at, offset_at in raw:
        label = f"tensor {name!r} offset"
        if name in tensors:
            raise p.fail(f"tensor {name!r} name", at, "appears twice")
        if offset % alignment:
            raise p.fail(label, offset_at, f"{offset} is not a multiple of the alignment {alignment}")
        if data_offset + offset + nbytes > size:
            raise p.fail(label, offset_at, f"its {nbytes} bytes of data at file offset {data_offset + offset} run past "
                                           f"the end of the file ({size} bytes)", _TRUNCATED)
        tensors[name] = GGUFTensor(name, shape, gtype, type_name, data_offset + offset, nbytes, at)
        spans.append((offset, offset + nbytes, name, offset_at))
    spans.sort()
    for (_, end, prev, _), (start, _, name, offset_at) in zip(spans, spans[1:]):
        if start < end:
            raise p.fail(f"tensor {name!r} offset", offset_at, f"its data overlaps that of tensor {prev!r}")
    return GGUFInfo(path, version, alignment, data_offset, size, MappingProxyType(metadata),
                    MappingProxyType(offsets), MappingProxyType(tensors))


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


# ----------------------------------------------------------------------------- hparams

def _int(info: GGUFInfo, key: str, default: int | None = None) -> int:
    v = info.metadata.get(key, default)
    if v is None:
        raise info.fail(key, "missing", "the file does not describe its model; it cannot be loaded")
    if not _is_int(v) or not 0 < v < 2**40:
        raise info.fail(key, f"{v!r} is not a plausible positive integer" if not isinstance(v, (list, np.ndarray))
                        else "per-layer values are not supported", _CORRUPT)
    return int(v)


def _float(info: GGUFInfo, key: str, default: float) -> float:
    v = info.metadata.get(key, default)
    if not isinstance(v, (int, float, np.number)) or isinstance(v, bool) or not (math.isfinite(v) and v > 0):
        raise info.fail(key, f"{v!r} is not a positive finite number")
    return float(v)


def _architecture(info: GGUFInfo) -> str:
    arch = info.metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise info.fail("general.architecture", "missing or not a string", "this GGUF names no model architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise info.fail("general.architecture", f"architecture {arch!r} is not supported",
                        f"shrink reads GGUF models of architecture {' or '.join(SUPPORTED_ARCHITECTURES)}")
    return arch


def _blocks(info: GGUFInfo, key: str) -> int:
    n = _int(info, key)
    present = {int(m.group(1)) for name in info.tensors if (m := re.match(r"blk\.(\d+)\.", name))}
    if len(present) != n or present != set(range(n)):   # the length first: n comes from the file
        raise info.fail(key, f"declares {n} blocks, the tensors hold blocks {sorted(present)[:8]}"
                             f"{'...' if len(present) > 8 else ''}")
    return n


# One tensor the model needs: its GGUF name, Hugging Face name, GGUF shape and how to turn it into the HF tensor.
Slot = tuple[str, str, tuple[int, ...], Callable[[torch.Tensor], torch.Tensor]]


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _transposed(t: torch.Tensor) -> torch.Tensor:
    return t.t().contiguous()


def _unpermute(n_head: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """llama.cpp's converter reorders each head's Q/K rows from (half, pair) to (pair, half)
    (interleaved RoPE); this puts them back in Hugging Face's rotate-half order."""
    def undo(t: torch.Tensor) -> torch.Tensor:
        rows = t.shape[0]
        return t.reshape(n_head, rows // n_head // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape).contiguous()
    return undo


def _vocab(info: GGUFInfo, arch: str) -> tuple[int, int]:
    emb = info.tensors.get("token_embd.weight")
    if emb is None or len(emb.shape) != 2:
        raise ValueError(f"{info.path}: tensor 'token_embd.weight' is missing or not 2-D; {_CORRUPT}")
    vocab, hidden = emb.shape
    if f"{arch}.vocab_size" in info.metadata and _int(info, f"{arch}.vocab_size") != vocab:
        raise info.fail(f"{arch}.vocab_size", f"says {info.metadata[f'{arch}.vocab_size']}, token_embd has {vocab} rows")
    tokens = info.metadata.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list) and len(tokens) != vocab:
        raise info.fail("tokenizer.ggml.tokens", f"{len(tokens)} tokens, token_embd has {vocab} rows")
    return vocab, hidden


def _special_ids(info: GGUFInfo, vocab: int) -> dict:
    out = {}
    for name in ("bos", "eos"):
        v = info.metadata.get(f"tokenizer.ggml.{name}_token_id")
        out[f"{name}_token_id"] = int(v) if _is_int(v) and 0 <= v < vocab else None  # not GPT-2's 50256
    return out


def _llama(info: GGUFInfo):
    from transformers import LlamaConfig, LlamaForCausalLM

    a = "llama"
    vocab, hidden = _vocab(info, a)
    if _int(info, f"{a}.embedding_length") != hidden:
        raise info.fail(f"{a}.embedding_length", f"says {info.metadata[f'{a}.embedding_length']}, token_embd has {hidden} columns")
    n_layer, ff = _blocks(info, f"{a}.block_count"), _int(info, f"{a}.feed_forward_length")
    n_head = _int(info, f"{a}.attention.head_count")
    n_kv = _int(info, f"{a}.attention.head_count_kv", n_head)
    head_dim = _int(info, f"{a}.attention.key_length", hidden // n_head or 1)
    if _int(info, f"{a}.attention.value_length", head_dim) != head_dim or head_dim % 2 or n_head % n_kv:
        raise info.fail(f"{a}.attention.head_count_kv", f"{n_head} heads, {n_kv} KV heads of {head_dim} "
                        "(key and value widths must match, be even, and KV heads divide heads)")
    if _int(info, f"{a}.rope.dimension_count", head_dim) != head_dim:
        raise info.fail(f"{a}.rope.dimension_count", "partial rotary embeddings are not supported")
    scaling = info.metadata.get(f"{a}.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in info.tensors:
        raise info.fail(f"{a}.rope.scaling.type", f"RoPE scaling ({scaling}) is not supported",
                        "shrink reads Llama GGUFs with plain RoPE")
    tied = "output.weight" not in info.tensors
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ff, num_hidden_layers=n_layer,
        num_attention_heads=n_head, num_key_value_heads=n_kv, head_dim=head_dim,
        max_position_embeddings=_int(info, f"{a}.context_length", 2048),
        rms_norm_eps=_float(info, f"{a}.attention.layer_norm_rms_epsilon", 1e-5),
        rope_parameters={"rope_type": "default", "rope_theta": _float(info, f"{a}.rope.freq_base", 10000.0)},
        tie_word_embeddings=tied, architectures=["LlamaForCausalLM"], **_special_ids(info, vocab))
    slots: list[Slot] = [("token_embd.weight", "model.embed_tokens.weight", (vocab, hidden), _same),
                         ("output_norm.weight", "model.norm.weight", (hidden,), _same)]
    if not tied:
        slots.append(("output.weight", "lm_head.weight", (vocab, hidden), _same))
    q, kv = n_head * head_dim, n_kv * head_dim
    for i in range(n_layer):
        b, h = f"blk.{i}.", f"model.layers.{i}."
        slots += [(b + "attn_norm.weight", h + "input_layernorm.weight", (hidden,), _same),
                  (b + "attn_q.weight", h + "self_attn.q_proj.weight", (q, hidden), _unpermute(n_head)),
                  (b + "attn_k.weight", h + "self_attn.k_proj.weight", (kv, hidden), _unpermute(n_kv)),
                  (b + "attn_v.weight", h + "self_attn.v_proj.weight", (kv, hidden), _same),
                  (b + "attn_output.weight", h + "self_attn.o_proj.weight", (hidden, q), _same),
                  (b + "ffn_norm.weight", h + "post_attention_layernorm.weight", (hidden,), _same),
                  (b + "ffn_gate.weight", h + "mlp.gate_proj.weight", (ff, hidden), _same),
                  (b + "ffn_up.weight", h + "mlp.up_proj.weight", (ff, hidden), _same),
                  (b + "ffn_down.weight", h + "mlp.down_proj.weight", (hidden, ff), _same)]
    return LlamaForCausalLM, config, slots


def _gpt2(info: GGUFInfo):
    from transformers import GPT2Config, GPT2LMHeadModel

    a = "gpt2"
    vocab, hidden = _vocab(info, a)
    if _int(info, f"{a}.embedding_length") != hidden:
        raise info.fail(f"{a}.embedding_length", f"says {info.metadata[f'{a}.embedding_length']}, token_embd has {hidden} columns")
    n_layer, ff = _blocks(info, f"{a}.block_count"), _int(info, f"{a}.feed_forward_length", 4 * hidden)
    n_head, ctx = _int(info, f"{a}.attention.head_count"), _int(info, f"{a}.context_length")
    if hidden % n_head:
        raise info.fail(f"{a}.attention.head_count", f"{n_head} heads do not divide the width {hidden}")
    out = info.tensors.get("output.weight")
    emb = info.tensors["token_embd.weight"]
    # older converters wrote a copy of token_embd as output: tie it again rather than store it twice
    tied = out is None or (out.ggml_type == emb.ggml_type and out.shape == emb.shape
                           and _raw(info, out).tobytes() == _raw(info, emb).tobytes())
    config = GPT2Config(
        vocab_size=vocab, n_positions=ctx, n_embd=hidden, n_layer=n_layer, n_head=n_head, n_inner=ff,
        layer_norm_epsilon=_float(info, f"{a}.attention.layer_norm_epsilon", 1e-5), activation_function="gelu_new",
        tie_word_embeddings=tied, architectures=["GPT2LMHeadModel"], **_special_ids(info, vocab))
    slots: list[Slot] = [("token_embd.weight", "transformer.wte.weight", (vocab, hidden), _same),
                         ("position_embd.weight", "transformer.wpe.weight", (ctx, hidden), _same),
                         ("output_norm.weight", "transformer.ln_f.weight", (hidden,), _same),
                         ("output_norm.bias", "transformer.ln_f.bias", (hidden,), _same)]
    if out is not None:
        slots.append(("output.weight", "lm_head.weight", (vocab, hidden), _same) if not tied
                     else ("output.weight", "", (vocab, hidden), _same))
    for i in range(n_layer):
        b, h = f"blk.{i}.", f"transformer.h.{i}."
        # HF GPT-2 keeps Conv1D weights as [in, out]; llama.cpp's converter stored them transposed
        for g, hf, shape, bias in (("attn_qkv", "attn.c_attn", (3 * hidden, hidden), 3 * hidden),
                                   ("attn_output", "attn.c_proj", (hidden, hidden), hidden),
                                   ("ffn_up", "mlp.c_fc", (ff, hidden), ff),
                                   ("ffn_down", "mlp.c_proj", (hidden, ff), hidden)):
            slots += [(b + g + ".weight", h + hf + ".weight", shape, _transposed),
                      (b + g + ".bias", h + hf + ".bias", (bias,), _same)]
        for g, hf in (("attn_norm", "ln_1"), ("ffn_norm", "ln_2")):
            slots += [(b + g + ".weight", h + hf + ".weight", (hidden,), _same),
                      (b + g + ".bias", h + hf + ".bias", (hidden,), _same)]
    return GPT2LMHeadModel, config, slots


# ----------------------------------------------------------------------------- tensors

def _raw(info: GGUFInfo, t: GGUFTensor) -> np.ndarray:
    data = bytearray(t.nbytes)  # writable, so torch may share it
    with open(info.path, "rb") as f:
        f.seek(t.offset)
        got = f.readinto(data)
    if got != t.nbytes:  # the file shrank since it was checked
        raise ValueError(f"{info.path}: tensor {t.name!r} at byte offset {t.offset}: data cut short; {_TRUNCATED}")
    return np.frombuffer(data, dtype=np.uint8)


def _dequantize(info: GGUFInfo, t: GGUFTensor) -> torch.Tensor:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    qtype = GGMLQuantizationType(t.ggml_type)
    raw = _raw(info, t)
    if qtype == GGMLQuantizationType.F32:
        arr = raw.view("<f4")
    elif qtype == GGMLQuantizationType.F16:
        arr = raw.view("<f2").astype(np.float32)
    else:
        block, type_size = GGML_QUANT_SIZES[qtype]
        try:
            arr = dequantize(raw.reshape(*t.shape[:-1], t.shape[-1] // block * type_size), qtype)
        except NotImplementedError:
            raise ValueError(f"{info.path}: tensor {t.name!r} at byte offset {t.info_offset}: type {t.type_name} "
                             "cannot be dequantized by the installed gguf package; re-quantize the model to "
                             "another type with llama.cpp") from None
    out = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32).reshape(t.shape))
    check_finite_tensor(out, t.name, info.path)   # NaN/inf weights: refused, named
    return out


def load_gguf(path) -> torch.nn.Module:
    """A transformers causal LM (eval mode, float32 weights) from a llama or gpt2 GGUF file."""
    info = check_gguf(path)
    cls, config, slots = {"llama": _llama, "gpt2": _gpt2}[_architecture(info)](info)
    wanted = {s[0] for s in slots}
    for name, t in info.tensors.items():
        if name not in wanted:
            raise ValueError(f"{info.path}: tensor {name!r} at byte offset {t.info_offset}: not part of a "
                             f"{config.model_type} model as shrink reads it; {_CORRUPT}")
    for name, _, shape, _ in slots:
        t = info.tensors.get(name)
        if t is None:
            raise ValueError(f"{info.path}: tensor {name!r}: missing; the file is incomplete or not a "
                             f"{config.model_type} model")
        if t.shape != shape:
            raise ValueError(f"{info.path}: tensor {name!r} at byte offset {t.info_offset}: shape {list(t.shape)}, "
                             f"the file's hparams need {list(shape)}; {_CORRUPT}")
    state = {hf: fn(_dequantize(info, info.tensors[name])) for name, hf, _, fn in slots if hf}
    model, loaded = cls.from_pretrained(None, config=config, state_dict=state, output_loading_info=True)
    if loaded["missing_keys"] or loaded["unexpected_keys"]:
        raise ValueError(f"{info.path}: tensors do not fill the model: missing {sorted(loaded['missing_keys'])[:5]}, "
                         f"unexpected {sorted(loaded['unexpected_keys'])[:5]}")
    model.config.name_or_path = str(info.path)
    return model.float().eval()


def load_gguf_tokenizer(path):
    """A transformers PreTrainedTokenizerFast rebuilt from the file's `tokenizer.ggml.*` metadata
    (see `shrink.models.gguf_tokenizer`)."""
    from shrink.models.gguf_tokenizer import gguf_tokenizer

    return gguf_tokenizer(path)
