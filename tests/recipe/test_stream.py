"""Streamed quantization (one block at a time from safetensors shards) equals the in-memory
run tensor for tensor, loads with shrink.load, and refuses what it cannot stream."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import shrink
from shrink.models.compressed import save_compressed
from shrink.models.shards import ShardReader, load_weights
from shrink.recipe.run import compress
from shrink.recipe.stream import stream_compress
from tests_support import tiny_gpt2, tiny_llama


def _tensors(directory) -> dict:
    reader = ShardReader(directory)
    return {n: reader.get(n) for n in reader.names()}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    tiny_llama(hidden_size=64, intermediate_size=128).save_pretrained(d, max_shard_size="40KB")
    assert len(list(d.glob("model-*-of-*.safetensors"))) > 2   # really sharded
    return d


def _batches(vocab=64):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, vocab, (4, 16), generator=g)} for _ in range(2)]


def _in_memory(model_dir, recipe, out, batches=None):
    model = shrink.load(str(model_dir))
    res = compress(model, recipe, calibration=batches, measure_speed=False)
    save_compressed(res.model, out, base={"kind": "hf"})
    return res


@pytest.mark.parametrize("recipe", ["w4-rtn", "int8", "w4-gptq"])
def test_streamed_equals_in_memory_bit_for_bit(llama_dir, tmp_path, recipe):
    batches = _batches() if recipe == "w4-gptq" else None
    ref = _in_memory(llama_dir, recipe, tmp_path / "mem", batches)
    doc = stream_compress(llama_dir, recipe, tmp_path / "streamed", calibration=batches, max_shard_bytes=20_000)
    got = _tensors(tmp_path / "streamed")
    want = load_file(str(tmp_path / "mem" / "model.safetensors"))
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name
    assert len(list((tmp_path / "streamed").glob("model-*-of-*.safetensors"))) > 1
    manifest = json.loads((tmp_path / "streamed" / "manifest.json").read_text())
    assert manifest["modules"] == json.loads((tmp_path / "mem" / "manifest.json").read_text())["modules"]
    assert doc["baseline"] == {k: ref.metrics["baseline"][k] for k in ("size_bytes", "params")}
    assert doc["compressed"]["size_bytes"] == ref.metrics["compressed"]["size_bytes"]
    assert [l["name"] for l in doc["steps"][0]["layers"]] == [l.name for l in ref.steps[0].layers]
    assert [l["error"] for l in doc["steps"][0]["layers"]] == [l.error for l in ref.steps[0].layers]
    # and it loads, and runs as the in-memory result does
    a, b = shrink.load(str(tmp_path / "streamed")), shrink.load(str(tmp_path / "mem"))
    x = torch.randint(0, 64, (1, 8))
    assert torch.equal(a(x).logits, b(x).logits)


def test_gpt2_tied_head_streams(tmp_path):
    d = tmp_path / "gpt2"
    tiny_gpt2().save_pretrained(d, max_shard_size="30KB")
    _in_memory(d, "w4-rtn", tmp_path / "mem")
    stream_compress(d, "w4-rtn", tmp_path / "s", max_shard_bytes=10_000)
    got, want = _tensors(tmp_path / "s"), load_file(str(tmp_path / "mem" / "model.safetensors"))
    assert sorted(got) == sorted(want) and all(torch.equal(got[n], want[n]) for n in want)
    m = shrink.load(str(tmp_path / "s"))
    assert m.lm_head.weight is m.transformer.wte.weight   # the tie survives the sharded load


def test_refusals_name_the_reason(llama_dir, tmp_path):
    with pytest.raises(ValueError, match="not streamable"):
        stream_compress(llama_dir, "w4-awq", tmp_path / "o")
    with pytest.raises(ValueError, match="calibration"):
        stream_compress(llama_dir, "w4-gptq", tmp_path / "o")
    from tests_support import tiny_bert

    tiny_bert().save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="model_type 'bert' cannot be streamed"):
        stream_compress(tmp_path / "bert", "w4-rtn", tmp_path / "o")
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))


def test_sharded_load_reports_missing(llama_dir, tmp_path):
    stream_compress(llama_dir, "int8", tmp_path / "s", max_shard_bytes=20_000)
    model = shrink.load(str(tmp_path / "s"))
    index = json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model.state_dict())
    (tmp_path / "s" / index["weight_map"]["lm_head.weight"]).unlink()
    with pytest.raises((ValueError, FileNotFoundError), match="missing"):
        load_weights(model, tmp_path / "s")


def test_job_streams_when_forced_and_records_memory(llama_dir, tmp_path, monkeypatch):
    from shrink.recipe.job import run_job

    monkeypatch.setenv("SHRINK_STREAM", "1")
    doc = run_job(str(llama_dir), "w4-rtn", tmp_path / "s")
    monkeypatch.setenv("SHRINK_STREAM", "0")
    ref = run_job(str(llama_dir), "w4-rtn", tmp_path / "m")
    assert doc["streamed"] is True and "streamed" not in ref
    got, want = _tensors(tmp_path / "s" / "model"), load_file(str(tmp_path / "m" / "model" / "model.safetensors"))
    assert sorted(got) == sorted(want) and all(torch.equal(got[n], want[n]) for n in want)
    mem = doc["memory"]
    assert mem["predicted_streamed_bytes"] > 0 and mem["measured_peak_rss_bytes"] > 0
    assert "largest block" in mem["derivation"]["streamed"]
    assert doc["baseline"]["size_bytes"] == ref["baseline"]["size_bytes"]
    assert doc["compressed"]["size_bytes"] == ref["compressed"]["size_bytes"]
    assert "quality_note" in doc   # no tokenizer: said, not measured
    assert json.loads((tmp_path / "s" / "result.json").read_text())["streamed"] is True
    manifest = json.loads((tmp_path / "s" / "model" / "manifest.json").read_text())
    same = json.loads((tmp_path / "m" / "model" / "manifest.json").read_text())
    for key in ("recipe", "recipe_sha256", "seed", "versions"):   # the same provenance as an in-memory run
        assert manifest[key] == same[key] == doc[key] == ref[key], key


def test_plan_predicts_job_memory(llama_dir):
    from shrink.plan.planner import build_plan

    plan = build_plan(str(llama_dir)).to_json()
    job = plan["job_memory"]
    assert 0 < job["streamed_bytes"] and job["in_memory_bytes"] > 2 * job["parts"]["weights"]
    assert job["streamed_bytes"] - job["parts"]["runtime"] < job["in_memory_bytes"] - job["parts"]["runtime"]
    assert "job_memory[streamed]" in plan["derivations"] and "Hessians" in plan["derivations"]["job_memory[streamed]"]
