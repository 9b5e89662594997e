"""safetensors exports: transformers loads the Hugging Face directory without shrink and
agrees; shrink.load reads the packed directory bit for bit; bad requests are refused early."""
from __future__ import annotations

import json

import pytest
import torch

import shrink
from shrink.export.hf import verify_hf_dir, write_hf_dir
from shrink.export.run import export, parse_format
from shrink.export.verify import VerificationError, heldout_ids
from shrink.models.io import load_tokenizer


@pytest.fixture(scope="module")
def quantized_dir(tmp_path_factory):
    """A compressed DIR as `shrink compress` leaves it (int4 groups of 32, asymmetric)."""
    from shrink.models.compressed import save_compressed

    res = shrink.compress(shrink.load("tiny-gpt"), [{"rtn": {"bits": 4, "group_size": 32}}], measure_speed=False)
    d = tmp_path_factory.mktemp("run") / "model"
    save_compressed(res.model, d, base={"kind": "hf"}, extra={"recipe": [{"rtn": {}}], "source_model": "tiny-gpt"})
    return d, res.model


def test_transformers_loads_the_fake_quantized_directory_without_shrink(quantized_dir, tmp_path):
    d, model = quantized_dir
    rec = export(str(d), "safetensors", tmp_path / "hf", n_tokens=64)
    v = rec["verification"]
    assert v["passed"] and v["shrink_imported"] is False
    assert v["vs_stored_weights"]["rel_rmse"] < 1e-5
    assert v["vs_shrink_model"]["top1_agreement"] >= 0.95    # shrink's int4 kernel runs in bf16
    assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "hf" / "tokenizer.json").is_file()
    saved = json.loads((tmp_path / "hf" / "export.json").read_text())
    assert saved["verified"] is True
    # the weights written are shrink's dequantized weights, exactly
    from safetensors.torch import load_file

    w = load_file(tmp_path / "hf" / "model.safetensors")["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(w, model.model.layers[0].mlp.up_proj.dequantized_weight().float())


def test_packed_directory_reloads_bit_exactly(quantized_dir, tmp_path):
    d, _ = quantized_dir
    rec = export(str(d), "safetensors:packed", tmp_path / "packed")
    assert rec["verification"]["bit_exact"] and rec["bytes"] < 0.75 * 7.6e6
    manifest = json.loads((tmp_path / "packed" / "manifest.json").read_text())
    assert manifest["source_model"] == "tiny-gpt" and manifest["recipe"] == [{"rtn": {}}]
    assert any(m["type"] == "QuantLinear" and m["spec"]["bits"] == 4 for m in manifest["modules"].values())


def test_a_wrong_directory_fails_verification(tmp_path):
    model = shrink.load("tiny-gpt")
    tok = load_tokenizer("tiny-gpt")
    write_hf_dir(model, tok, tmp_path / "hf")
    other = shrink.load("tiny-gpt")
    with torch.no_grad():
        other.model.layers[0].mlp.down_proj.weight.mul_(2.0)
    with pytest.raises(VerificationError, match="differ"):
        verify_hf_dir(tmp_path / "hf", other, [heldout_ids(tok, 32)], causal=True)


def test_bad_requests_are_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="unknown export format"):
        parse_format("tflite")
    with pytest.raises(ValueError, match="not a transformers model"):
        export("digits-mlp", "safetensors", tmp_path / "d")
    assert not (tmp_path / "d").exists()
    with pytest.raises(FileNotFoundError):
        export(str(tmp_path / "missing"), "gguf:Q8_0", tmp_path / "m.gguf")
