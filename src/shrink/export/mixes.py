"""Which GGUF type each tensor gets for a requested file type, as llama.cpp's quantizer decides.

This mirrors `llama_model_quantize` (src/llama-quant.cpp) run on an F32 GGUF of a Llama
or GPT-2 model with default parameters (no importance matrix, no overrides, not `pure`),
so a file shrink writes carries the same per-tensor types `llama-quantize` would give.

The decision, tensor by tensor:

1. Which tensors are quantized at all (`tensor_allows_quantization`): only tensors of two
   or more dimensions in ggml's sense (trailing size-1 dims do not count), whose name ends
   in "weight", that are not norms ("_norm.weight"), MoE routers ("ffn_gate_inp.weight"),
   positional or token-type embeddings. The rest keep their source type, which for shrink
   is F32 (so 1-D norms and biases stay F32).
2. For F32, F16 and BF16 every quantizable tensor simply takes that type.
3. For the quantized file types the base type is the file type's own (Q4_K for Q4_K_S/M,
   Q5_K for Q5_K_S/M), then the mix rules (`llama_tensor_get_type_impl`) adjust it:
   - output.weight (and token_embd.weight when the model has no output.weight, i.e. tied
     embeddings): Q8_0 if its row length is not a multiple of the base type's block,
     else Q6_K unless the base is Q8_0. This holds for Q4_0..Q5_1 too.
   - attn_v / attn_qkv / attn_kv_b (counted together in file order, i of n):
     Q4_K_M and Q5_K_M give Q6_K where use_more_bits(i, n); Q4_K_S gives Q5_K to the
     first four; a 70B Llama (80 layers with grouped-query attention) then lifts Q4_K to
     Q5_K. GPT-2's fused attn_qkv goes through this attn_v rule: llama.cpp's separate
     attn_qkv rule (Q5_K for Q4_K_M, Q6_K for Q5_K_M) sits after it in an else-if chain
     and is never reached.
   - ffn_down (i-th of n_layer, in file order): Q4_K_M and Q5_K_M give Q6_K where
     use_more_bits(i, n_layer); Q4_K_S gives Q5_K where i < n_layer/8.
   use_more_bits(i, n) = i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2 (C integer division).
4. Fallback (`tensor_type_fallback`): if the row length (ne[0], PyTorch's last dim) is not
   a multiple of the chosen type's block, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, a
   32-block type stays; if that still does not divide, F16.

"File order" is llama.cpp's tensor map order: by block index (tensors outside blk.N
first), then by name. n_layer is taken as the highest blk.N index + 1.

"Q4_K" and "Q5_K" as requested types mean llama.cpp's Q4_K_S and Q5_K_S mixes (the
_S mixes are what llama.cpp writes when asked for a plain k-quant file type).

Read from llama.cpp commit 0c1e57098bba43ac29e6e3b677cdceebdd22334f (the one vendored
by llama-cpp-python 0.3.36).
"""
from __future__ import annotations

import re

FTYPES: tuple[str, ...] = (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
    "Q4_K", "Q4_K_S", "Q4_K_M", "Q5_K", "Q5_K_S", "Q5_K_M", "Q6_K",
)
ARCHES: tuple[str, ...] = ("llama", "gpt2")

_BLOCK = {"F32": 1, "F16": 1, "BF16": 1, "Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32,
          "Q8_0": 32, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256}
_FLOAT = ("F32", "F16", "BF16")
_MIX = {"Q4_K": "Q4_K_S", "Q5_K": "Q5_K_S"}  # plain k-quant names mean the _S mixes
_BASE = {"Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K", "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K"}
_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
_SOURCE_TYPE = "F32"
_LAYER = re.compile(r"blk\.([+-]?\d+)")


def block_size(type_name: str) -> int:
    """Weights per block: 1 for F32/F16/BF16, 32 for Q4_0..Q8_0, 256 for the k-quants."""
    try:
        return _BLOCK[type_name]
    except KeyError:
        raise ValueError(f"unknown GGUF type {type_name!r}; known: {', '.join(_BLOCK)}") from None


def _layer(name: str) -> int:
    """The N of blk.N., -1 when absent (as the loader's sscanf("blk.%d.") leaves it)."""
    m = _LAYER.match(name)
    return int(m.group(1)) if m else -1


def _n_dims(shape: tuple[int, ...]) -> int:
    """ggml_n_dims of a PyTorch-ordered shape: trailing size-1 ggml dims (leading here) don't count."""
    for i, size in enumerate(shape):
        if size != 1:
            return len(shape) - i
    return 1


def _category(name: str) -> str:
    """llama.cpp's tensor_get_category: first match wins, by substring."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "attn_v"), ("attn_kv_b.weight", "attn_v"),
                     ("attn_v.weight", "attn_v"), ("attn_k.weight", "attn_k"),
                     ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
                     ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")):
        if key in name:
            return cat
    return "other"


_NEVER = ("_norm.weight", "ffn_gate_inp.weight", "altup", "laurel", "per_layer_model_proj",
          "ssm_conv1d", "attn_rel_b.weight", ".position_embd", ".rel_pos", ".patch_embd")


def _quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """llama.cpp's tensor_allows_quantization for the names Llama/GPT-2 files carry."""
    if _n_dims(shape) < 2 or not name.endswith("weight"):
        return False
    if name in ("position_embd.weight", "token_types.weight"):
        return False
    return not any(part in name for part in _NEVER)


def _use_more_bits(i: int, n: int) -> bool:
    eighth = n // 8
    if i < eighth or i >= 7 * n // 8:
        return True
    diff = i - eighth
    return abs(diff) % 3 * (1 if diff >= 0 else -1) == 2  # C's % keeps the dividend's sign


def _fallback(new_type: str, ncols: int) -> str:
    if ncols % _BLOCK[new_type] == 0:
        return new_type
    out = _FALLBACK.get(new_type, new_type)  # a 32-block type has nothing smaller to go to
    return out if ncols % _BLOCK[out] == 0 else "F16"


def _validate(tensors, ftype: str, arch: str) -> list[tuple[str, tuple[int, ...]]]:
    if ftype not in FTYPES:
        raise ValueError(f"unknown GGUF file type {ftype!r}; supported: {', '.join(FTYPES)}")
    if arch not in ARCHES:
        raise ValueError(f"unknown architecture {arch!r}; supported: {', '.join(ARCHES)}")
    out, seen = [], set()
    for item in tensors:
        try:
            name, shape = item
            shape = tuple(int(s) for s in shape)
        except (TypeError, ValueError):
            raise ValueError(f"expected (name, shape) pairs, got {item!r}") from None
        if not isinstance(name, str) or not name:
            raise ValueError(f"tensor name must be a non-empty string, got {name!r}")
        if name in seen:
            raise ValueError(f"tensor {name!r} is listed twice; GGUF names must be unique")
        if not shape or any(s <= 0 for s in shape):
            raise ValueError(f"tensor {name!r} has shape {shape}; every dimension must be positive")
        seen.add(name)
        out.append((name, shape))
    return out


def _is_70b(tensors: list[tuple[str, tuple[int, ...]]], arch: str, n_layer: int) -> bool:
    """llama.cpp's LLM_TYPE_70B for Llama: 80 layers and fewer KV heads than query heads."""
    if arch != "llama" or n_layer != 80:
        return False
    shapes = dict(tensors)
    q, k = shapes.get("blk.0.attn_q.weight"), shapes.get("blk.0.attn_k.weight")
    return q is not None and k is not None and q[0] != k[0]


def tensor_types(tensors: list[tuple[str, tuple[int, ...]]], ftype: str, arch: str) -> dict[str, str]:
    """GGUF type name per tensor for `ftype`, as llama.cpp's quantizer chooses it.

    tensors: GGUF names with PyTorch-ordered shapes ([rows, cols]; cols is ggml's ne[0]).
    ftype: one of FTYPES. arch: "llama" or "gpt2".
    """
    tensors = _validate(tensors, ftype, arch)
    order = sorted(tensors, key=lambda t: (_layer(t[0]), t[0].encode()))
    names = [n for n, _ in order]
    n_attn_v = sum(_category(n) == "attn_v" for n in names)
    tied = "output.weight" not in names
    n_layer = max((_layer(n) for n in names), default=-1) + 1
    big = _is_70b(tensors, arch, n_layer)

    mix = _MIX.get(ftype, ftype)
    base = _BASE.get(mix, mix)
    i_attn_v = i_ffn_down = 0
    result: dict[str, str] = {}
    for name, shape in order:
        if not _quantizable(name, shape):
            result[name] = _SOURCE_TYPE
            continue
        if base in _FLOAT:
            result[name] = base
            continue
        ncols = shape[-1]
        cat = _category(name)
        new = base
        if cat == "output" or (tied and cat == "token_embd"):
            if ncols % _BLOCK[base] != 0:
                new = "Q8_0"
            elif base != "Q8_0":
                new = "Q6_K"
        elif cat == "attn_v":
            if mix in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i_attn_v, n_attn_v):
                new = "Q6_K"
            elif mix == "Q4_K_S" and i_attn_v < 4:
                new = "Q5_K"
            if big and new == "Q4_K":
                new = "Q5_K"
            i_attn_v += 1
        elif cat == "ffn_down":
            if mix in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i_ffn_down, n_layer):
                new = "Q6_K"
            elif mix == "Q4_K_S" and i_ffn_down < n_layer // 8:
                new = "Q5_K"
            i_ffn_down += 1
        result[name] = _fallback(new, ncols)
    return {name: result[name] for name, _ in tensors}
