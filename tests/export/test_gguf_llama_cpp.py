"""llama.cpp loads what shrink writes and computes what shrink's model computes."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")

import shrink  # noqa: E402
from shrink.export.gguf import write_gguf  # noqa: E402
from shrink.export.run import export  # noqa: E402
from shrink.export.verify import VerificationError, heldout_ids, verify_gguf  # noqa: E402
from shrink.models.io import load_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny-gpt")


@pytest.fixture(scope="module")
def ids(tok):
    return heldout_ids(tok, 192)


def test_f32_matches_exactly_including_greedy_tokens(tmp_path):
    rec = export("tiny-gpt", "gguf:F32", tmp_path / "f32.gguf", n_tokens=192)
    v = rec["verification"]
    assert v["passed"] and rec["verified"]
    assert v["vs_shrink_model"]["rel_rmse"] < 1e-3
    assert v["vs_shrink_model"]["top1_agreement"] == 1.0
    assert v["greedy"]["runtime"] == v["greedy"]["shrink_model"]      # every generated token
    assert v["greedy"]["generated"] == 32
    saved = json.loads((tmp_path / "f32.gguf.export.json").read_text())
    assert saved["verification"]["vs_shrink_model"]["greedy_match"] == 32
    assert rec["tensor_types"] == ["F32"]


@pytest.mark.parametrize("type_name,min_top1", [("Q8_0", 0.97), ("Q4_0", 0.80), ("Q4_K_M", 0.85)])
def test_quantized_types_agree_with_the_stored_weights(tmp_path, type_name, min_top1):
    """llama.cpp against shrink's model holding the file's weights: only llama.cpp's 8-bit
    activations differ. Against the float model: the format's own rounding, bounded loosely."""
    rec = export("tiny-gpt", f"gguf:{type_name}", tmp_path / "q.gguf", n_tokens=192)
    v = rec["verification"]
    assert v["passed"]
    assert v["vs_stored_weights"]["top1_agreement"] >= 0.95
    assert v["vs_stored_weights"]["rel_rmse"] < 0.05
    assert v["vs_shrink_model"]["top1_agreement"] >= min_top1
    assert rec["bytes"] < (tmp_path / "q.gguf").stat().st_size + 1
    types = {t["name"]: t["type"] for t in rec["tensors"]}
    assert types["blk.0.attn_norm.weight"] == "F32"
    if type_name == "Q4_K_M":   # tiny-gpt's rows of 128 do not divide into 256-blocks: llama.cpp's fallbacks
        assert set(rec["tensor_types"]) - {"F32"} <= {"Q5_0", "Q5_1", "Q8_0", "Q6_K", "Q4_K"}


def test_carried_gptq_style_codes_run_in_llama_cpp(tmp_path, tok, ids):
    """A model shrink quantized to symmetric 4-bit groups of 32: its codes go into Q4_0 as
    they are; llama.cpp then agrees with shrink's quantized model itself."""
    model = shrink.load("tiny-gpt")
    res = shrink.compress(model, [{"rtn": {"bits": 4, "group_size": 32, "symmetric": True}}], measure_speed=False)
    written = write_gguf(res.model, tok, tmp_path / "c.gguf", "Q8_0")
    carried = [t for t in written.tensors if t["carried"]]
    assert len(carried) == 4 * 7 and {t["type"] for t in carried} == {"Q4_0"}
    assert max(t["rel_err"] for t in carried) < 1e-6       # no second rounding
    v = verify_gguf(written.path, res.model, written.state, {t["type"] for t in written.tensors}, ids)
    assert v["passed"]
    assert v["vs_shrink_model"]["top1_agreement"] >= 0.95


def test_gpt2_architecture(tmp_path, tok, ids):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=64, n_layer=2, n_head=4,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = GPT2LMHeadModel(cfg).eval()
    d = tmp_path / "gpt2"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    rec = export(str(d), "gguf:F32", tmp_path / "g.gguf", n_tokens=128)
    assert rec["arch"] == "gpt2" and rec["verification"]["passed"]
    assert rec["verification"]["vs_shrink_model"]["rel_rmse"] < 1e-3
    names = {t["name"] for t in rec["tensors"]}
    assert {"blk.0.attn_qkv.weight", "blk.0.attn_qkv.bias", "position_embd.weight", "output.weight"} <= names


def test_a_wrong_file_fails_verification(tmp_path, tok, ids):
    """The check can fail: verify a file against a model whose weights it does not hold."""
    model = shrink.load("tiny-gpt")
    written = write_gguf(model, tok, tmp_path / "f.gguf", "F32")
    state = dict(written.state)
    w = state["model.layers.0.mlp.down_proj.weight"]
    state["model.layers.0.mlp.down_proj.weight"] = w * 3.0
    with pytest.raises(VerificationError, match="disagrees"):
        verify_gguf(written.path, model, state, {"F32"}, ids)


def test_cli_export_record(tmp_path, capsys):
    from shrink.cli import main

    out = tmp_path / "m.gguf"
    assert main(["export", "tiny-gpt", "--format", "gguf:Q8_0", "-o", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["verified"] and doc["path"] == str(out)
    assert main(["export", "minilm", "--format", "gguf:Q8_0", "-o", str(tmp_path / "b.gguf")]) == 2
    assert "GPT-2" in capsys.readouterr().err
    assert not (tmp_path / "b.gguf").exists()
    assert main(["export", "tiny-gpt", "--format", "gguf:Q9_9", "-o", str(tmp_path / "c.gguf")]) == 2


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory, tok):
    """A Llama from a config whose rows divide into 256-blocks, so the k-quants are used as
    such (tiny-gpt's 128-wide rows fall back); grouped-query attention (4 heads, 2 KV heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=0.08, tie_word_embeddings=False,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    d = tmp_path_factory.mktemp("wide") / "llama"
    LlamaForCausalLM(cfg).eval().save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.mark.parametrize("type_name,expect", [("Q4_K_M", {"Q4_K", "Q6_K"}), ("Q5_K_M", {"Q5_K", "Q6_K"}),
                                               ("Q6_K", {"Q6_K"})])
def test_k_quants_run_in_llama_cpp(wide_llama, tmp_path, type_name, expect):
    rec = export(str(wide_llama), f"gguf:{type_name}", tmp_path / "k.gguf", n_tokens=128)
    assert expect <= set(rec["tensor_types"])
    v = rec["verification"]
    assert v["passed"], v
    assert v["vs_stored_weights"]["rel_rmse"] < 0.06     # random weights: llama.cpp's 8-bit activations show
    assert v["vs_stored_weights"]["top1_agreement"] >= 0.88
