"""GGUF, llama.cpp's file: a causal LM of the Llama or GPT-2 architecture, with the
hyper-parameters, tensor names and tokenizer llama.cpp reads.

What goes where (as llama.cpp's own converter lays it out):
- Llama: token_embd, blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm,
  ffn_gate, ffn_up, ffn_down}, output_norm, output. The rows of attn_q and attn_k are
  reordered: transformers rotates the two halves of each head, llama.cpp rotates
  adjacent pairs, so each head's rows [first half | second half] are interleaved.
- GPT-2: transformers' Conv1D weights are stored [in, out] and are transposed; c_attn
  becomes the fused attn_qkv; a tied lm_head is written again as output.

Each tensor's type comes from `mixes.tensor_types` (llama.cpp's per-tensor rules for
the requested file type). A Linear that shrink already quantized to a uniform integer
grid whose groups are whole 32-blocks is *carried*: its codes go into the smallest
GGUF block type that holds them (symmetric <=4 bits: Q4_0, asymmetric <=4: Q4_1,
<=5: Q5_0/Q5_1, symmetric <=8: Q8_0) with its own scales, without rounding again.
Everything else is quantized from the effective float weight: F16/BF16 and the
Q*_0/Q*_1 types by the `gguf` package's quantizers, the k-quants by `kquants`.
`gguf:auto` carries what can be carried and keeps everything else in F32.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from shrink.export.dense import Grid, carried_layers, plain_copy
from shrink.export.gguf_vocab import add_tokenizer
from shrink.fsutil import file_mode, fsync_file, named_write_error

ARCHS = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}
TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K",
         "Q4_K_S", "Q5_K_S", "Q4_K_M", "Q5_K_M", "auto")
_FILE_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q8_0": "MOSTLY_Q8_0",
               "Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1", "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1",
               "Q4_K": "MOSTLY_Q4_K_S", "Q5_K": "MOSTLY_Q5_K_S", "Q6_K": "MOSTLY_Q6_K",
               "Q4_K_S": "MOSTLY_Q4_K_S", "Q5_K_S": "MOSTLY_Q5_K_S", "Q4_K_M": "MOSTLY_Q4_K_M", "Q5_K_M": "MOSTLY_Q5_K_M"}
_LLAMA_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                "post_attention_layernorm": "ffn_norm"}
_GPT2_NAMES = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
               "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}


@dataclass
class Tensor:
    name: str                     # GGUF name
    data: np.ndarray              # float32, PyTorch order [rows, cols] (cols = llama.cpp's ne[0])
    module: str | None = None     # the shrink module it came from (a Linear), for carrying
    rows: np.ndarray | None = None  # row order applied to the module's weight (Q/K permutation)
    key: str | None = None        # the state-dict key it came from
    transposed: bool = False      # stored transposed (GPT-2's Conv1D)

    def to_state(self, stored_float: np.ndarray) -> np.ndarray:
        """The stored weight back in the state dict's layout."""
        out = stored_float
        if self.rows is not None:
            out = out[np.argsort(self.rows)]
        return np.ascontiguousarray(out.T) if self.transposed else out


@dataclass
class Written:
    path: Path
    arch: str
    type: str
    tensors: list[dict] = field(default_factory=list)
    nbytes: int = 0
    state: dict = field(default_factory=dict)   # state-dict key -> the weight as stored (dequantized)


def arch_of(model: nn.Module) -> str:
    """'llama' or 'gpt2'; anything else is refused before any work."""
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    if model_type in ARCHS and type(model).__name__ == ARCHS[model_type]:
        return model_type
    what = f"{type(model).__name__} (model_type {model_type!r})" if cfg is not None else type(model).__name__
    raise ValueError(f"GGUF export: {what} cannot be written for llama.cpp; shrink writes causal LMs of the "
                     f"Llama (LlamaForCausalLM) and GPT-2 (GPT2LMHeadModel) architectures. Export this model "
                     f"with --format onnx or --format safetensors instead")


def _rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(cfg, "rope_theta", 10000.0))


def qk_rows(n_rows: int, n_head: int) -> np.ndarray:
    """The row order llama.cpp wants for a Llama q/k projection with `n_head` heads: within
    each head, row i of the first half and row i of the second half become neighbours."""
    half = n_rows // n_head // 2
    return np.arange(n_rows).reshape(n_head, 2, half).swapaxes(1, 2).reshape(-1)


def _llama_tensors(model: nn.Module, state: dict) -> list[Tensor]:
    cfg = model.config
    n_head, n_kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    out = [Tensor("token_embd.weight", state["model.embed_tokens.weight"], key="model.embed_tokens.weight")]
    for i in range(cfg.num_hidden_layers):
        prefix = f"model.layers.{i}."
        for hf, gg in _LLAMA_NAMES.items():
            w = state[f"{prefix}{hf}.weight"]
            t = Tensor(f"blk.{i}.{gg}.weight", w, module=None if w.ndim == 1 else f"{prefix}{hf}",
                       key=f"{prefix}{hf}.weight")
            if gg in ("attn_q", "attn_k"):
                t.rows = qk_rows(w.shape[0], n_head if gg == "attn_q" else n_kv)
                t.data = w[t.rows]
            out.append(t)
        for hf in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"):
            if f"{prefix}{hf}.bias" in state:
                raise ValueError(f"GGUF export: {prefix}{hf} has a bias, which llama.cpp's Llama graph does not "
                                 "apply; this checkpoint is not a plain Llama")
    out.append(Tensor("output_norm.weight", state["model.norm.weight"], key="model.norm.weight"))
    head = state.get("lm_head.weight")
    if head is not None and not getattr(cfg, "tie_word_embeddings", False):
        out.append(Tensor("output.weight", head, module="lm_head", key="lm_head.weight"))
    return out


def _gpt2_tensors(model: nn.Module, state: dict) -> list[Tensor]:
    cfg = model.config
    out = [Tensor("token_embd.weight", state["transformer.wte.weight"], key="transformer.wte.weight"),
           Tensor("position_embd.weight", state["transformer.wpe.weight"], key="transformer.wpe.weight")]
    for i in range(cfg.n_layer):
        prefix = f"transformer.h.{i}."
        for hf, gg in _GPT2_NAMES.items():
            for kind in ("weight", "bias"):
                key = f"{prefix}{hf}.{kind}"
                w, flip = state[key], kind == "weight" and state[key].ndim == 2
                if flip:
                    w = np.ascontiguousarray(w.T)  # Conv1D keeps [in, out]
                out.append(Tensor(f"blk.{i}.{gg}.{kind}", w, key=key, transposed=flip))
    for kind in ("weight", "bias"):
        out.append(Tensor(f"output_norm.{kind}", state[f"transformer.ln_f.{kind}"], key=f"transformer.ln_f.{kind}"))
    # transformers ties GPT-2's lm_head to wte; llama.cpp wants output written out
    out.append(Tensor("output.weight", state.get("lm_head.weight", state["transformer.wte.weight"]),
                      key="lm_head.weight"))
    return out


def _add_hparams(w, model: nn.Module, arch: str) -> None:
    cfg = model.config
    if arch == "llama":
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        w.add_context_length(int(cfg.max_position_embeddings))
        w.add_embedding_length(int(cfg.hidden_size))
        w.add_block_count(int(cfg.num_hidden_layers))
        w.add_feed_forward_length(int(cfg.intermediate_size))
        w.add_rope_dimension_count(int(head_dim))
        w.add_head_count(int(cfg.num_attention_heads))
        w.add_head_count_kv(int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads))
        w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
        w.add_rope_freq_base(_rope_theta(cfg))
        w.add_vocab_size(int(cfg.vocab_size))
    else:
        w.add_context_length(int(cfg.n_positions))
        w.add_embedding_length(int(cfg.n_embd))
        w.add_block_count(int(cfg.n_layer))
        w.add_feed_forward_length(int(cfg.n_inner or 4 * cfg.n_embd))
        w.add_head_count(int(cfg.n_head))
        w.add_layer_norm_eps(float(cfg.layer_norm_epsilon))


# ----------------------------------------------------------------------------- carrying codes

def carrier(grid: Grid) -> str | None:
    """The smallest GGUF block type holding `grid` exactly (codes, and scales as fp16), or None."""
    if grid.group_size % 32:
        return None
    if grid.symmetric:
        return "Q4_0" if grid.bits <= 4 else "Q5_0" if grid.bits <= 5 else "Q8_0" if grid.bits <= 8 else None
    return "Q4_1" if grid.bits <= 4 else "Q5_1" if grid.bits <= 5 else None


def pack_carried(grid: Grid, type_name: str, rows: np.ndarray | None = None) -> np.ndarray:
    """Blocks of `type_name` holding `grid`'s codes as they are: [out, in/32 * block bytes] uint8."""
    codes = grid.codes.numpy().astype(np.int32)
    reps = grid.group_size // 32
    d = np.repeat(grid.scale.to(torch.float32).numpy(), reps, axis=1).astype(np.float16)
    zp = None if grid.zero_point is None else np.repeat(grid.zero_point.to(torch.float32).numpy(), reps, axis=1)
    if rows is not None:
        codes, d = codes[rows], d[rows]
        zp = None if zp is None else zp[rows]
    n_out, n_in = codes.shape
    q = codes.reshape(n_out, n_in // 32, 32)
    d = d[..., None].view(np.uint8)  # [out, blocks, 2]
    if type_name == "Q8_0":
        return np.concatenate([d, q.astype(np.int8).view(np.uint8)], axis=-1).reshape(n_out, -1)
    if type_name in ("Q4_0", "Q5_0"):
        q = q + (8 if type_name == "Q4_0" else 16)
        head = [d]
    else:  # Q4_1 / Q5_1: w = d * q + m with m = -zero_point * scale
        m = (-zp * d.view(np.float16)[..., 0].astype(np.float32)).astype(np.float16)
        head = [d, m[..., None].view(np.uint8)]
    q = q.astype(np.uint8)
    nibbles = (q[..., :16] & 0xF) | ((q[..., 16:] & 0xF) << 4)
    if type_name in ("Q5_0", "Q5_1"):
        high = ((q >> 4) & 1).astype(np.uint32)
        qh = (high << np.arange(32, dtype=np.uint32)).sum(axis=-1, dtype=np.uint32)
        head.append(qh.astype("<u4")[..., None].view(np.uint8))
    return np.concatenate([*head, nibbles], axis=-1).reshape(n_out, -1)


# ----------------------------------------------------------------------------- encoding

def encode(data: np.ndarray, type_name: str) -> np.ndarray:
    """Quantize a float32 [rows, cols] (or 1-D) array to `type_name`'s stored layout."""
    import gguf

    if type_name == "F32":
        return np.ascontiguousarray(data, dtype=np.float32)
    if type_name == "F16":
        return data.astype(np.float16)
    if type_name.endswith("_K"):
        from shrink.export.kquants import KQUANTS

        return KQUANTS[type_name](np.ascontiguousarray(data, dtype=np.float32))
    return gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), gguf.GGMLQuantizationType[type_name])


def decode(stored: np.ndarray, type_name: str) -> np.ndarray:
    import gguf

    if type_name in ("F32", "F16"):
        return stored.astype(np.float32)
    return gguf.quants.dequantize(stored, gguf.GGMLQuantizationType[type_name]).astype(np.float32)


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    den = float(np.sqrt(np.mean(np.square(b, dtype=np.float64))))
    num = float(np.sqrt(np.mean(np.square(a.astype(np.float64) - b))))
    return num / den if den > 0 else num


def gguf_tensors(model: nn.Module) -> tuple[str, list[Tensor], dict[str, Grid], dict[str, str]]:
    arch = arch_of(model)
    plain = plain_copy(model)
    state = {k: v.detach().to(torch.float32).numpy() for k, v in plain.state_dict().items()}
    tensors = _llama_tensors(plain, state) if arch == "llama" else _gpt2_tensors(plain, state)
    grids, why_not = carried_layers(model)
    return arch, tensors, grids, why_not


def write_gguf(model: nn.Module, tokenizer, path: str | Path, type_name: str, *, name: str = "shrink model",
               carry: bool = True, progress=None) -> Written:
    """Write `model` to `path` (atomically) as GGUF of `type_name`; returns what was written,
    per tensor: type, whether the codes were carried, and the relative RMS error of the stored
    weight against the weight shrink's model applies."""
    import gguf

    if type_name not in TYPES:
        raise ValueError(f"GGUF export: unknown type {type_name!r}; choose one of {', '.join(TYPES)}")
    arch, tensors, grids, why_not = gguf_tensors(model)
    shapes = [(t.name, tuple(t.data.shape)) for t in tensors]
    if type_name == "auto":
        chosen = {n: "F32" for n, _ in shapes}
    else:
        from shrink.export.mixes import tensor_types

        chosen = tensor_types(shapes, type_name, arch)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    written = Written(path, arch, type_name)
    try:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_name(name)
        _add_hparams(w, model, arch)
        add_tokenizer(w, tokenizer, int(tensors[0].data.shape[0]))
        quantized = False
        for i, t in enumerate(tensors):
            ttype = chosen[t.name]
            grid = grids.get(t.module) if (carry and t.module) else None
            kind = carrier(grid) if grid is not None else None
            if kind is not None:
                stored, ttype, carried = pack_carried(grid, kind, t.rows), kind, True
            else:
                stored, carried = encode(t.data, ttype), False
            back = decode(stored, ttype).reshape(t.data.shape)
            if t.key is not None:
                written.state[t.key] = t.to_state(back)
            rec = {"name": t.name, "type": ttype, "shape": list(t.data.shape), "carried": carried,
                   "rel_err": _rel_err(back, t.data), "bytes": int(stored.nbytes)}
            if t.module and not carried and t.module in why_not:
                rec["not_carried"] = why_not[t.module]
            written.tensors.append(rec)
            quantized |= ttype not in ("F32", "F16", "BF16")
            raw = None if ttype in ("F32", "F16") else gguf.GGMLQuantizationType[ttype]
            w.add_tensor(t.name, stored, raw_dtype=raw)
            if progress:
                progress(i + 1, len(tensors))
        if type_name != "auto":
            w.add_file_type(int(gguf.LlamaFileType[_FILE_TYPES[type_name]]))
        if quantized:
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.chmod(tmp, file_mode())
        fsync_file(tmp)   # the data on the disk before the rename publishes it
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        named = named_write_error(e, path)   # numpy's short write on a full disk carries no errno
        if named is not e:
            raise named from e
        raise
    written.nbytes = path.stat().st_size
    return written

