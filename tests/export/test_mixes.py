"""GGUF per-tensor types: hand-checked llama.cpp rules, and llama.cpp's own quantizer as the judge."""
from __future__ import annotations

import ctypes
import random

import numpy as np
import pytest

from shrink.export.kquants import KQUANTS
from shrink.export.mixes import FTYPES, block_size, tensor_types


def llama_tensors(n_layer=8, hidden=256, ff=512, vocab=512, heads=4, kv_heads=4, tied=False):
    """(name, PyTorch shape) of a Llama GGUF, in the order a converter writes them."""
    kv = hidden // heads * kv_heads
    out = [("token_embd.weight", (vocab, hidden)), ("output_norm.weight", (hidden,))]
    if not tied:
        out.append(("output.weight", (vocab, hidden)))
    for i in range(n_layer):
        p = f"blk.{i}."
        out += [(p + "attn_norm.weight", (hidden,)), (p + "attn_q.weight", (hidden, hidden)),
                (p + "attn_k.weight", (kv, hidden)), (p + "attn_v.weight", (kv, hidden)),
                (p + "attn_output.weight", (hidden, hidden)), (p + "ffn_norm.weight", (hidden,)),
                (p + "ffn_gate.weight", (ff, hidden)), (p + "ffn_up.weight", (ff, hidden)),
                (p + "ffn_down.weight", (hidden, ff))]
    return out


def gpt2_tensors(n_layer=12, hidden=256, ff=1024, vocab=512, ctx=128, tied=True):
    out = [("token_embd.weight", (vocab, hidden)), ("position_embd.weight", (ctx, hidden)),
           ("output_norm.weight", (hidden,)), ("output_norm.bias", (hidden,))]
    if not tied:
        out.append(("output.weight", (vocab, hidden)))
    for i in range(n_layer):
        p = f"blk.{i}."
        out += [(p + "attn_norm.weight", (hidden,)), (p + "attn_norm.bias", (hidden,)),
                (p + "attn_qkv.weight", (3 * hidden, hidden)), (p + "attn_qkv.bias", (3 * hidden,)),
                (p + "attn_output.weight", (hidden, hidden)), (p + "attn_output.bias", (hidden,)),
                (p + "ffn_norm.weight", (hidden,)), (p + "ffn_norm.bias", (hidden,)),
                (p + "ffn_up.weight", (ff, hidden)), (p + "ffn_up.bias", (ff,)),
                (p + "ffn_down.weight", (hidden, ff)), (p + "ffn_down.bias", (hidden,))]
    return out


def per_layer(types: dict[str, str], suffix: str) -> list[str]:
    return [t for name, t in sorted(((n, t) for n, t in types.items() if n.endswith(suffix)),
                                    key=lambda nt: int(nt[0].split(".")[1]))]


# ---------------------------------------------------------------- hand-checked rules


def test_q4_k_m_on_8_layers():
    types = tensor_types(llama_tensors(), "Q4_K_M", "llama")
    # use_more_bits(i, 8): i < 1, i >= 7, or (i - 1) % 3 == 2 -> layers 0, 3, 6, 7
    more = ["Q6_K" if i in (0, 3, 6, 7) else "Q4_K" for i in range(8)]
    assert per_layer(types, "attn_v.weight") == more
    assert per_layer(types, "ffn_down.weight") == more
    assert set(per_layer(types, "attn_q.weight") + per_layer(types, "ffn_up.weight")) == {"Q4_K"}
    assert types["output.weight"] == "Q6_K"
    assert types["token_embd.weight"] == "Q4_K"  # untied: no special rule
    assert {t for n, t in types.items() if "norm" in n} == {"F32"}


def test_q5_k_m_and_the_s_mixes():
    q5m = tensor_types(llama_tensors(), "Q5_K_M", "llama")
    assert per_layer(q5m, "attn_v.weight") == ["Q6_K" if i in (0, 3, 6, 7) else "Q5_K" for i in range(8)]
    q4s = tensor_types(llama_tensors(), "Q4_K", "llama")
    assert q4s == tensor_types(llama_tensors(), "Q4_K_S", "llama")
    assert per_layer(q4s, "attn_v.weight") == ["Q5_K"] * 4 + ["Q4_K"] * 4  # first four attn_v
    assert per_layer(q4s, "ffn_down.weight") == ["Q5_K"] + ["Q4_K"] * 7  # i < n_layer/8
    q5s = tensor_types(llama_tensors(), "Q5_K", "llama")
    assert {t for n, t in q5s.items() if n.startswith("blk.") and "norm" not in n} == {"Q5_K"}
    assert q5s["output.weight"] == "Q6_K"
    assert set(tensor_types(llama_tensors(), "Q6_K", "llama").values()) == {"Q6_K", "F32"}


def test_legacy_types_still_get_a_q6_k_output():
    for ftype in ("Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        types = tensor_types(llama_tensors(), ftype, "llama")
        assert types.pop("output.weight") == "Q6_K"
        assert {t for n, t in types.items() if "norm" not in n} == {ftype}
    q8 = tensor_types(llama_tensors(), "Q8_0", "llama")
    assert q8["output.weight"] == "Q8_0"


def test_float_types_touch_only_matrices():
    for ftype in ("F32", "F16", "BF16"):
        types = tensor_types(gpt2_tensors(), ftype, "gpt2")
        assert types["blk.0.attn_qkv.weight"] == types["token_embd.weight"] == ftype
        assert types["blk.0.attn_qkv.bias"] == types["position_embd.weight"] == "F32"


def test_fallback_for_rows_of_384():
    types = tensor_types(llama_tensors(hidden=384, ff=1024, heads=6, kv_heads=2), "Q4_K_M", "llama")
    assert types["blk.1.attn_q.weight"] == "Q5_0"  # Q4_K -> Q5_0
    assert types["blk.0.attn_v.weight"] == "Q8_0"  # Q6_K -> Q8_0
    assert types["blk.1.attn_v.weight"] == "Q5_0"
    assert types["blk.0.ffn_down.weight"] == "Q6_K"  # its rows are 1024 long: no fallback
    assert types["blk.1.ffn_down.weight"] == "Q4_K"
    assert types["output.weight"] == "Q8_0"  # the output rule itself picks Q8_0
    assert types["token_embd.weight"] == "Q5_0"
    q5 = tensor_types(llama_tensors(hidden=384, ff=1024, heads=6), "Q5_K_M", "llama")
    assert q5["blk.1.attn_q.weight"] == "Q5_1"  # Q5_K -> Q5_1


def test_fallback_that_does_not_divide_goes_to_f16():
    types = tensor_types(llama_tensors(n_layer=2, hidden=48, ff=80, heads=2, vocab=96), "Q4_K_M", "llama")
    assert {t for n, t in types.items() if "norm" not in n} == {"F16"}
    q8 = tensor_types(llama_tensors(n_layer=2, hidden=48, ff=80, heads=2, vocab=96), "Q8_0", "llama")
    assert q8["blk.0.attn_q.weight"] == q8["output.weight"] == "F16"


def test_tied_embeddings_take_the_output_rule():
    assert tensor_types(llama_tensors(tied=True), "Q4_K_M", "llama")["token_embd.weight"] == "Q6_K"
    assert tensor_types(llama_tensors(tied=True), "Q4_0", "llama")["token_embd.weight"] == "Q6_K"
    assert tensor_types(llama_tensors(tied=True), "Q8_0", "llama")["token_embd.weight"] == "Q8_0"


def test_gpt2_fused_qkv_follows_the_attn_v_rule():
    types = tensor_types(gpt2_tensors(), "Q4_K_M", "gpt2")
    # use_more_bits(i, 12): i < 1, i >= 10, or (i - 1) % 3 == 2 -> 0, 3, 6, 9, 10, 11
    more = ["Q6_K" if i in (0, 3, 6, 9, 10, 11) else "Q4_K" for i in range(12)]
    assert per_layer(types, "attn_qkv.weight") == more  # not llama.cpp's unreachable Q5_K rule
    assert per_layer(types, "ffn_down.weight") == more
    assert types["position_embd.weight"] == "F32"
    assert types["token_embd.weight"] == "Q6_K"  # GPT-2 ties its embeddings


def test_layer_order_not_input_order():
    tensors = llama_tensors(n_layer=12)
    shuffled = tensors[:]
    random.Random(3).shuffle(shuffled)
    assert tensor_types(shuffled, "Q4_K_M", "llama") == tensor_types(tensors, "Q4_K_M", "llama")
    assert list(tensor_types(shuffled, "Q4_K_M", "llama")) == [n for n, _ in shuffled]


def test_70b_llama_lifts_attn_v():
    gqa = tensor_types(llama_tensors(n_layer=80, kv_heads=1), "Q4_K_M", "llama")
    mha = tensor_types(llama_tensors(n_layer=80), "Q4_K_M", "llama")
    # use_more_bits(20, 80) is false, so only the 70B rule can lift layer 20
    assert gqa["blk.20.attn_v.weight"] == "Q5_K" and mha["blk.20.attn_v.weight"] == "Q4_K"
    assert gqa["blk.0.attn_v.weight"] == "Q6_K"


def test_block_size():
    assert [block_size(t) for t in ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q5_1", "Q4_K", "Q6_K")] == \
        [1, 1, 1, 32, 32, 32, 256, 256]
    with pytest.raises(ValueError, match="Q4_K"):
        block_size("Q3_K")


def test_bad_requests():
    with pytest.raises(ValueError, match="supported: F32, F16.*Q4_K_M"):
        tensor_types(llama_tensors(), "Q3_K_M", "llama")
    with pytest.raises(ValueError, match="llama, gpt2"):
        tensor_types(llama_tensors(), "Q4_K_M", "falcon")
    with pytest.raises(ValueError, match="twice"):
        tensor_types(llama_tensors() + [("output.weight", (512, 256))], "Q4_0", "llama")
    with pytest.raises(ValueError, match="positive"):
        tensor_types([("blk.0.attn_q.weight", (0, 256))], "Q4_0", "llama")
    with pytest.raises(ValueError, match="pairs"):
        tensor_types(["output.weight"], "Q4_0", "llama")


# ---------------------------------------------------------------- llama.cpp itself


LLAMA_FTYPE = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q4_K": "MOSTLY_Q4_K_S",
               "Q5_K": "MOSTLY_Q5_K_S"}


def write_gguf(path, arch, tensors, n_layer, hidden, ff, heads, kv_heads) -> dict[str, np.ndarray]:
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    if arch == "llama":
        w.add_layer_norm_rms_eps(1e-5)
        w.add_rope_dimension_count(hidden // heads)
    else:
        w.add_layer_norm_eps(1e-5)
    w.add_vocab_size(dict(tensors)["token_embd.weight"][0])
    w.add_file_type(0)
    data = {}
    for name, shape in tensors:
        data[name] = (rng.standard_normal(shape) * 0.02).astype(np.float32)
        w.add_tensor(name, data[name])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return data


def llama_cpp_types(src, dst, ftype: str) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    llama_cpp = pytest.importorskip("llama_cpp")
    import gguf

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_" + LLAMA_FTYPE.get(ftype, "MOSTLY_" + ftype))
    params.nthread = 1
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0
    reader = gguf.GGUFReader(str(dst))
    return ({t.name: t.tensor_type.name for t in reader.tensors},
            {t.name: np.array(t.data) for t in reader.tensors})


ALL = ("Q4_0", "Q8_0", "Q4_K_M", "Q5_K_M", "Q4_K", "Q6_K", "F16")
MODELS = {
    "llama-256": ("llama", dict(n_layer=8, hidden=256, ff=512, heads=4, kv_heads=4), ALL),
    "llama-384-gqa": ("llama", dict(n_layer=8, hidden=384, ff=1024, heads=6, kv_heads=2), ALL),
    "gpt2-256": ("gpt2", dict(n_layer=12, hidden=256, ff=1024, heads=4, kv_heads=4), ALL),
    # rows of 48 and 80: the 32-block fallback does not divide either, so llama.cpp writes F16
    "llama-48": ("llama", dict(n_layer=2, hidden=48, ff=80, heads=2, kv_heads=2), ("Q4_K_M", "Q8_0")),
    # 80 layers with GQA is llama.cpp's "70B": attn_v Q4_K -> Q5_K, seen here through its fallback
    "llama-80-layer-gqa": ("llama", dict(n_layer=80, hidden=64, ff=64, heads=4, kv_heads=1), ("Q4_K", "Q4_K_M")),
}


@pytest.mark.parametrize("model", list(MODELS))
def test_types_and_bytes_match_llama_quantize(model, tmp_path):
    pytest.importorskip("llama_cpp")
    arch, cfg, ftypes = MODELS[model]
    tensors = (llama_tensors(n_layer=cfg["n_layer"], hidden=cfg["hidden"], ff=cfg["ff"], heads=cfg["heads"],
                             kv_heads=cfg["kv_heads"])
               if arch == "llama" else gpt2_tensors(n_layer=cfg["n_layer"], hidden=cfg["hidden"], ff=cfg["ff"]))
    data = write_gguf(tmp_path / "f32.gguf", arch, tensors, **cfg)
    checked_bytes = 0
    for ftype in ftypes:
        theirs, blobs = llama_cpp_types(tmp_path / "f32.gguf", tmp_path / f"{ftype}.gguf", ftype)
        ours = tensor_types(tensors, ftype, arch)
        assert set(theirs) == set(ours)
        assert {n: (theirs[n], ours[n]) for n in ours if theirs[n] != ours[n]} == {}, ftype
        # and the k-quant tensors llama-quantize wrote are our packers' bytes
        for name, type_name in theirs.items():
            if type_name in KQUANTS and ftype in ("Q4_K_M", "Q5_K_M"):
                w = data[name]
                assert np.array_equal(KQUANTS[type_name](w).ravel(), blobs[name].ravel()), (ftype, name)
                checked_bytes += 1
    assert checked_bytes > 10 or cfg["hidden"] % 256


def test_ftypes_listed():
    assert {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K",
            "Q4_K_M", "Q5_K_M"} <= set(FTYPES)
