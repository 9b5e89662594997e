"""shrink never modifies its inputs: after compress, export, eval and inspect, every file of
the input model - a Hugging Face directory (save_pretrained) and a compressed DIR - has the
same bytes (sha256) and the same modification time, and no file was added or removed.

A DIR from compress is also where `shrink export DIR` records its exports (result.json's
"exports", and the redrawn report.html: API.md, "what compress leaves in DIR"); the model
itself, DIR/model/, is the input and stays as it was; result.json changes by that key only."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from shrink.cli import main
from tests_support import stdlib_sentences, tiny_llama


def state(root: Path) -> dict[str, tuple[str, int]]:
    """relative path -> (sha256, mtime in ns) for every file and directory under root."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.stat()
        digest = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        out[str(p.relative_to(root))] = (digest, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """(a tiny Llama saved with save_pretrained plus a tokenizer, a text file for --calib/--eval)."""
    from shrink.models.io import load_tokenizer

    root = tmp_path_factory.mktemp("inputs")
    d = root / "tiny-llama"
    tiny_llama(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2).save_pretrained(d)
    load_tokenizer("tiny-gpt").save_pretrained(d)
    text = root / "text.txt"
    text.write_text("\n".join(stdlib_sentences(48) * 5) + "\n")   # 8,192 calibration tokens and more
    old = 1_600_000_000_000_000_000   # an mtime in the past: a rewrite of the same bytes would show
    for p in [*d.iterdir(), text]:
        os.utime(p, ns=(old, old))
    return d, text


CASES = {
    "inspect": lambda src, text, out: ["inspect", str(src), "--no-data"],
    "eval": lambda src, text, out: ["eval", str(src), "--eval", str(text), "--json"],
    "compress": lambda src, text, out: ["compress", str(src), "--recipe", "int8", "--calib", str(text),
                                        "--eval", str(text), "-o", str(out / "c")],
    "export": lambda src, text, out: ["export", str(src), "--format", "gguf:Q8_0", "-o", str(out / "m.gguf")],
}


@pytest.mark.parametrize("command", list(CASES))
def test_a_model_directory_is_left_as_it_was(inputs, tmp_path, command, capsys):
    hf_dir, text = inputs
    before = state(hf_dir.parent)
    assert main(CASES[command](hf_dir, text, tmp_path)) == 0
    capsys.readouterr()
    assert state(hf_dir.parent) == before


@pytest.fixture(scope="module")
def compressed_dir(inputs, tmp_path_factory):
    hf_dir, text = inputs
    run = tmp_path_factory.mktemp("run") / "run"
    assert main(["compress", str(hf_dir), "--recipe", "w4-rtn", "--calib", str(text), "--eval", str(text),
                 "-o", str(run)]) == 0
    return run


@pytest.mark.parametrize("command", ["inspect", "eval", "export"])
def test_a_compressed_dir_is_left_as_it_was(compressed_dir, inputs, tmp_path, command, capsys):
    before = state(compressed_dir)
    doc = json.loads((compressed_dir / "result.json").read_text())
    assert main(CASES[command](compressed_dir, inputs[1], tmp_path)) == 0
    capsys.readouterr()
    after = state(compressed_dir)
    if command != "export":
        assert after == before
        return
    # export records itself in the run's result.json (and redraws the report); the model is untouched
    model = {k: v for k, v in before.items() if k.startswith("model")}
    assert model and {k: v for k, v in after.items() if k.startswith("model")} == model
    assert set(after) == set(before)
    now = json.loads((compressed_dir / "result.json").read_text())
    assert [e["path"] for e in now["exports"]] == [str(tmp_path / "m.gguf")]
    assert {k: v for k, v in now.items() if k != "exports"} == {k: v for k, v in doc.items() if k != "exports"}


def test_compressing_a_compressed_dir_leaves_it_as_it_was(tmp_path, capsys):
    """(A compressed LLM DIR keeps no tokenizer for compress's --calib/--eval text: a digits DIR.)"""
    run = tmp_path / "run"
    assert main(["compress", "digits-mlp", "--recipe", "int8", "-o", str(run)]) == 0
    before = state(run)
    assert main(["compress", str(run), "--recipe", "kmeans16", "-o", str(tmp_path / "again")]) == 0
    capsys.readouterr()
    assert state(run) == before and (tmp_path / "again" / "model").is_dir()
