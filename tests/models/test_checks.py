"""models/checks.py and the loaders that call it: what a model's files are checked for before
anything is built from them, and that sound files still load exactly."""
from __future__ import annotations

import json
import shutil

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tests_support import tiny_gpt2, tiny_llama  # noqa: E402

from shrink.models.checks import check_finite_tensor, one_line, read_pickled_weights  # noqa: E402
from shrink.models.io import load  # noqa: E402


def _same(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_sharded_tied_half_and_pickled_models_still_load_exactly(tmp_path):
    llama = tiny_llama()
    llama.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    assert _same(load(tmp_path / "sharded"), llama)
    gpt2 = tiny_gpt2()   # tied lm_head: stored once
    gpt2.save_pretrained(tmp_path / "gpt2")
    assert _same(load(tmp_path / "gpt2"), gpt2)
    half = tiny_llama().half()
    half.save_pretrained(tmp_path / "half")
    assert load(tmp_path / "half").dtype == torch.float16
    (tmp_path / "pickled").mkdir()
    shutil.copy(tmp_path / "sharded" / "config.json", tmp_path / "pickled")
    torch.save(llama.state_dict(), tmp_path / "pickled" / "pytorch_model.bin")
    assert _same(load(tmp_path / "pickled"), llama)


def test_a_shard_index_that_points_outside_the_directory_is_refused(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "m", max_shard_size="20KB")
    index = tmp_path / "m" / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    first = next(iter(doc["weight_map"]))
    for bad in ("../elsewhere.safetensors", "/etc/passwd", "sub/x.safetensors"):
        doc["weight_map"][first] = bad
        index.write_text(json.dumps(doc))
        with pytest.raises(ValueError, match="paths are refused"):
            load(tmp_path / "m")


def test_a_config_declaring_a_giant_model_is_refused_before_allocating(tmp_path):
    import time

    import transformers
    from safetensors.torch import save_file

    tiny_llama().save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["num_hidden_layers"] = 2_000_000   # minutes to build even on the meta device
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    start = time.perf_counter()
    with pytest.raises(ValueError, match="num_hidden_layers is 2,000,000 but .* holds only 30 tensors"):
        load(tmp_path / "m")
    assert time.perf_counter() - start < 5
    # a file that holds only the embeddings of a config with 13M more weights: random-initialized, refused
    (tmp_path / "big").mkdir()
    transformers.LlamaConfig(vocab_size=64, hidden_size=512, intermediate_size=8192, num_hidden_layers=1,
                             num_attention_heads=8, num_key_value_heads=8).to_json_file(tmp_path / "big" / "config.json")
    save_file({"model.embed_tokens.weight": torch.zeros(64, 512), "model.norm.weight": torch.ones(512),
               "lm_head.weight": torch.zeros(64, 512)}, str(tmp_path / "big" / "model.safetensors"))
    with pytest.raises(ValueError, match="describes a model of .* parameters but .* holds"):
        load(tmp_path / "big")


def test_pickles_are_read_weights_only(tmp_path):
    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('code ran')",))

    torch.save({"w": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="needs arbitrary Python objects.*convert it to safetensors"):
        read_pickled_weights(tmp_path / "evil.pt")
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="expected a state dict"):
        read_pickled_weights(tmp_path / "list.pt")
    (tmp_path / "junk.pt").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        read_pickled_weights(tmp_path / "junk.pt")


def test_finite_check_names_the_first_bad_value_and_counts_all():
    t = torch.zeros(3, 5, dtype=torch.bfloat16)
    t[1, 2], t[2, 4] = float("inf"), float("nan")
    with pytest.raises(ValueError, match=r"f.bin: tensor 'w' of shape \[3, 5\] holds 2 NaN/inf .*index \[1, 2\]: inf"):
        check_finite_tensor(t, "w", "f.bin")
    check_finite_tensor(torch.zeros(4, dtype=torch.int8), "codes", "f.bin")   # integers cannot be NaN


def test_one_line_keeps_the_first_line():
    assert one_line("first\n  second\n") == "first"
    assert one_line("x" * 400).endswith("...") and len(one_line("x" * 400)) == 300


def test_a_compressed_dir_with_nan_scales_or_int_scales_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from shrink.models.compressed import load_compressed, save_compressed
    from shrink.recipe import compress

    out = save_compressed(compress(tiny_llama(), "int8").model, tmp_path / "c", base={"kind": "hf"})
    good = load_file(str(out / "model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.scales"
    state = dict(good, **{key: good[key].clone()})
    state[key][3] = float("nan")
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match=rf"model.safetensors: tensor '{key}' of shape .* holds 1 NaN/inf"):
        load_compressed(out)
    save_file(dict(good, **{key: good[key].to(torch.int16)}), str(out / "model.safetensors"))
    with pytest.raises(ValueError, match=rf"module model.layers.0.self_attn.q_proj \(QuantLinear\) expects {key} as "
                                         r"float16, but model.safetensors holds int16"):
        load_compressed(out)
