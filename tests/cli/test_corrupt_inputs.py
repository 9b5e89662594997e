"""Corrupt inputs through the CLI: each case of the table exits with status 2, prints exactly
one line on stderr naming the file (or thing) at fault and no traceback, and leaves every
input file byte-identical (sha256 before and after). Tiny models: a Llama written by
save_pretrained with a trained 300-token tokenizer, its GGUF written by shrink's exporter."""
from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from shrink.cli import main  # noqa: E402

TEXTS = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.",
         "import os\nprint(os.path.join('a', 'b'))\n"]


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A tiny Llama directory (config, safetensors, tokenizer) and its GGUF."""
    from tests_support import tiny_llama

    from shrink.export.gguf import write_gguf
    from shrink.models.tiny_gpt import train_tokenizer

    root = tmp_path_factory.mktemp("good")
    tok = train_tokenizer(TEXTS * 4, vocab_size=300)
    model = tiny_llama(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1)
    model.save_pretrained(root / "llama")
    tok.save_pretrained(root / "llama")
    write_gguf(model, tok, root / "llama.gguf", "F32")
    return root


def _llama(good, tmp) -> Path:
    d = tmp / "llama"
    shutil.copytree(good / "llama", d)
    return d


def _edit_weights(d: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(d / "model.safetensors"))
    edit(state)
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})


# ----------------------------------------------------------------------------- the cases: (argv, what the line names)

def missing_file(good, tmp):
    return ["inspect", str(tmp / "no-such-model"), "--no-data"], "no-such-model"


def truncated_safetensors(good, tmp):
    d = _llama(good, tmp)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) * 2 // 3])
    return ["inspect", str(d), "--no-data"], "model.safetensors"


def bad_safetensors_header_length(good, tmp):
    d = _llama(good, tmp)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", 1 << 62) + data[8:])
    return ["inspect", str(d), "--no-data"], "model.safetensors"


def bad_gguf_magic(good, tmp):
    path = tmp / "bad.gguf"
    path.write_bytes(b"GGUX" + (good / "llama.gguf").read_bytes()[4:])
    return ["eval", str(path)], "bad.gguf"


def gguf_length_past_the_end(good, tmp):
    from shrink.models.gguf_read import check_gguf

    info = check_gguf(good / "llama.gguf")
    data = (good / "llama.gguf").read_bytes()
    at = 24   # the first metadata key's string length
    path = tmp / "long.gguf"
    path.write_bytes(data[:at] + struct.pack("<Q", len(data) * 4) + data[at + 8:])
    assert info.data_offset > at
    return ["eval", str(path)], "long.gguf"


def truncated_gguf(good, tmp):
    path = tmp / "cut.gguf"
    data = (good / "llama.gguf").read_bytes()
    path.write_bytes(data[: len(data) - 100])
    return ["eval", str(path)], "cut.gguf"


def int_tensor_for_a_weight(good, tmp):
    d = _llama(good, tmp)
    name = "model.layers.0.mlp.up_proj.weight"
    _edit_weights(d, lambda s: s.__setitem__(name, torch.zeros(s[name].shape, dtype=torch.int32)))
    return ["inspect", str(d), "--no-data"], "up_proj.weight"


def nan_weights(good, tmp):
    d = _llama(good, tmp)
    name = "model.layers.0.self_attn.q_proj.weight"
    _edit_weights(d, lambda s: s[name].__setitem__((1, 2), float("nan")))
    return ["eval", str(d)], "q_proj.weight"


def inf_weights_in_compress(good, tmp):
    d = _llama(good, tmp)
    name = "model.norm.weight"
    _edit_weights(d, lambda s: s[name].__setitem__(0, float("inf")))
    return ["compress", str(d), "--recipe", "int8", "-o", str(tmp / "out")], "model.norm.weight"


def shapes_that_do_not_match_the_config(good, tmp):
    d = _llama(good, tmp)
    config = json.loads((d / "config.json").read_text())
    config["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(config))
    return ["inspect", str(d), "--no-data"], "config.json"


def unsupported_architecture(good, tmp):
    d = _llama(good, tmp)
    config = json.loads((d / "config.json").read_text())
    config.update(model_type="mamba9", architectures=["Mamba9ForCausalLM"])
    (d / "config.json").write_text(json.dumps(config))
    return ["inspect", str(d), "--no-data"], "unsupported architecture"


def config_not_json(good, tmp):
    d = _llama(good, tmp)
    (d / "config.json").write_text('{"model_type": "llama",')
    return ["inspect", str(d), "--no-data"], "config.json"


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def pickle_that_needs_objects(good, tmp):
    d = _llama(good, tmp)
    (d / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": _Evil()}, d / "pytorch_model.bin")
    return ["inspect", str(d), "--no-data"], "convert it to safetensors"


def nan_weights_in_export(good, tmp):
    d = _llama(good, tmp)
    name = "model.embed_tokens.weight"
    _edit_weights(d, lambda s: s[name].__setitem__((5, 1), float("-inf")))
    return ["export", str(d), "--format", "gguf:F32", "-o", str(tmp / "out")], "embed_tokens.weight"


def empty_calibration_file(good, tmp):
    (tmp / "empty.txt").write_bytes(b"")
    return (["compress", str(_llama(good, tmp)), "--recipe", "w4-gptq", "--calib", str(tmp / "empty.txt"),
             "-o", str(tmp / "out")], "empty.txt")


def bad_recipe_yaml(good, tmp):
    (tmp / "recipe.yaml").write_text("- gptq: {bits: 4\n")
    return ["compress", str(_llama(good, tmp)), "--recipe", str(tmp / "recipe.yaml"), "-o", str(tmp / "out")], \
        "recipe.yaml"


def recipe_with_a_python_object(good, tmp):
    (tmp / "recipe.yaml").write_text("- !!python/object/apply:os.system ['echo never']\n")
    return ["compress", str(_llama(good, tmp)), "--recipe", str(tmp / "recipe.yaml"), "-o", str(tmp / "out")], \
        "recipe.yaml"


def _compressed(good, tmp) -> Path:
    from shrink.models.compressed import save_compressed
    from shrink.models.io import load
    from shrink.recipe import compress

    return save_compressed(compress(load(good / "llama"), "int8").model, tmp / "c", base={"kind": "hf"},
                           extra={"source_model": str(good / "llama")})


def compressed_manifest_not_json(good, tmp):
    out = _compressed(good, tmp)
    (out / "manifest.json").write_text("[1, 2")
    return ["eval", str(out)], "manifest.json"


def compressed_manifest_a_list(good, tmp):
    out = _compressed(good, tmp)
    (out / "manifest.json").write_text("[1, 2]")
    return ["inspect", str(out), "--no-data"], "manifest.json"


def corrupt_compressed_manifest(good, tmp):
    from shrink.models.compressed import save_compressed
    from shrink.models.io import load
    from shrink.recipe import compress

    out = save_compressed(compress(load(good / "llama"), "int8").model, tmp / "c", base={"kind": "hf"},
                          extra={"source_model": str(good / "llama")})
    assert main(["inspect", str(out), "--no-data", "--json"]) == 0   # loads before the edit
    manifest = json.loads((out / "manifest.json").read_text())
    next(iter(manifest["modules"].values()))["out_features"] = "many"
    (out / "manifest.json").write_text(json.dumps(manifest))
    return ["inspect", str(out), "--no-data"], "manifest.json: module model.layers.0.self_attn.q_proj: 'out_features'"


CASES = [missing_file, truncated_safetensors, bad_safetensors_header_length, bad_gguf_magic,
         gguf_length_past_the_end, truncated_gguf, int_tensor_for_a_weight, nan_weights, inf_weights_in_compress,
         nan_weights_in_export, shapes_that_do_not_match_the_config, unsupported_architecture, config_not_json,
         pickle_that_needs_objects, empty_calibration_file, bad_recipe_yaml, recipe_with_a_python_object,
         corrupt_compressed_manifest, compressed_manifest_not_json, compressed_manifest_a_list]


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_corrupt_input_exits_2_with_one_line_and_is_untouched(good, tmp_path, capsys, case):
    inputs = tmp_path / "in"
    inputs.mkdir()
    argv, names = case(good, inputs)
    before = _hashes(inputs)
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2, (rc, err)
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith(f"shrink {argv[0]}: error: ")
    assert names in lines[0], lines[0]
    assert "this must never run" not in out + err
    assert _hashes(inputs) == before   # nothing read was modified
    assert not (inputs / "out").exists()   # and nothing half-written
