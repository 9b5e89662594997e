"""Every writer, made to fail mid-write (a full disk: OSError ENOSPC, or the library's own
I/O error), leaves the previous output at its target byte for byte (or nothing, if there
was none) and no temporary file or directory behind; nothing half-written loads.

Writers: GGUF, ONNX (small, and with external data, failing while writing and while
putting the files in place), the Hugging Face directory, shrink's packed directory
(save_compressed), the HTML report, JSON records, search's DIR/model + result.json, and
the fsutil primitives under them (replace_dir's fallback, replace_files' rollback)."""
from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import shrink
import shrink.fsutil as fsutil
from shrink.fsutil import replace_dir, replace_files, write_json_atomic
from tests_support import tiny_llama


def disk_full(*_a, **_k):
    raise OSError(errno.ENOSPC, "No space left on device")


def tree(root: Path) -> dict[str, str]:
    """Every file and directory under root (hidden ones included): path -> sha256 ('dir' for a directory)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def no_temp(root: Path) -> bool:
    return not [p for p in root.rglob("*") if p.name.startswith(".")]


@pytest.fixture(scope="module")
def gpt():
    from shrink.models.io import load_tokenizer

    return shrink.load("tiny-gpt"), load_tokenizer("tiny-gpt")


# ----------------------------------------------------------------------------- GGUF

def test_gguf_failing_mid_write_keeps_the_previous_file(gpt, tmp_path, monkeypatch):
    import gguf

    from shrink.export.gguf import write_gguf

    model, tok = gpt
    path = tmp_path / "m.gguf"
    write_gguf(model, tok, path, "F16")
    before = tree(tmp_path)
    real = gguf.GGUFWriter.write_tensors_to_file

    def half_then_full(self, *a, **k):
        self.fout[0].write(b"\0" * 4096)   # some bytes reach the temporary file first
        disk_full()

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", half_then_full)
    with pytest.raises(OSError) as e:
        write_gguf(model, tok, path, "Q8_0")
    assert e.value.errno == errno.ENOSPC
    assert tree(tmp_path) == before
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", real)
    (tmp_path / "none").mkdir()
    with pytest.raises(OSError):
        monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", half_then_full)
        write_gguf(model, tok, tmp_path / "none" / "n.gguf", "F16")
    assert list((tmp_path / "none").iterdir()) == []   # no previous file: nothing at all


# ----------------------------------------------------------------------------- ONNX

class _Mlp(nn.Sequential):
    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        super().__init__(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _onnx_outputs(path: Path, x: torch.Tensor):
    m = shrink.load(str(path))
    with torch.no_grad():
        return m(x)


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external-data"])
@pytest.mark.parametrize("where", ["writing", "placing"])
def test_onnx_failing_keeps_the_previous_export_whole(tmp_path, monkeypatch, external, where):
    import shrink.export.onnx as onnx_export

    if external:
        monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 1)
    path = tmp_path / "m.onnx"
    onnx_export.export_onnx(_Mlp(0).eval(), path)
    before = tree(tmp_path)
    x = torch.randn(3, 64)
    y_old = _onnx_outputs(path, x)
    if where == "writing":
        real = onnx_export._write_model

        def partial(proto, p):
            real(proto, p)   # the staged files exist, then the disk fills
            disk_full()

        monkeypatch.setattr(onnx_export, "_write_model", partial)
    else:
        real_replace = os.replace
        seen = []

        def replace_fails_on_the_sidecar(src, dst):   # the last file of the group; not the rollback's rename
            seen.append(Path(dst).name)
            if Path(dst).name == "m.onnx.json" and not str(src).endswith(".old.tmp"):
                disk_full()
            return real_replace(src, dst)

        monkeypatch.setattr(fsutil.os, "replace", replace_fails_on_the_sidecar)
    with pytest.raises(OSError):
        onnx_export.export_onnx(_Mlp(1).eval(), path)
    assert tree(tmp_path) == before
    assert torch.equal(_onnx_outputs(path, x), y_old)


# ----------------------------------------------------------------------------- directories

def test_hf_dir_failing_mid_write_keeps_the_previous_dir(tmp_path, monkeypatch):
    import transformers.modeling_utils as mu

    from shrink.export.hf import write_hf_dir

    out = tmp_path / "hf"
    write_hf_dir(tiny_llama(), None, out)
    before = tree(tmp_path)

    def half(state, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        disk_full()

    monkeypatch.setattr(mu, "safe_save_file", half)
    with pytest.raises(OSError):
        write_hf_dir(tiny_llama(), None, out)
    assert tree(tmp_path) == before


def test_packed_dir_failing_mid_write_keeps_the_previous_dir(tmp_path, monkeypatch):
    import safetensors
    import safetensors.torch as st

    from shrink.models.compressed import save_compressed

    model = shrink.compress(tiny_llama(), "int8", measure_speed=False).model
    out = save_compressed(model, tmp_path / "m", base={"kind": "hf"})
    before = tree(tmp_path)
    with torch.no_grad():
        ids = torch.arange(8)[None]
        y = shrink.load(str(out))(input_ids=ids).logits

    def rust_disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(st, "save_file", rust_disk_full)
    with pytest.raises(safetensors.SafetensorError):
        save_compressed(model, out, base={"kind": "hf"})
    assert tree(tmp_path) == before
    with torch.no_grad():
        assert torch.equal(shrink.load(str(out))(input_ids=ids).logits, y)


def test_replace_dir_fallback_puts_the_old_dir_back_when_the_second_rename_fails(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "f").write_text("old")
    new = tmp_path / ".out.new"
    new.mkdir()
    (new / "f").write_text("new")
    monkeypatch.setattr(fsutil, "_exchange", lambda a, b: False)   # a system without renameat2
    real = Path.rename

    def rename(self, target):
        if self == new:
            disk_full()
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError):
        replace_dir(new, out)
    assert (out / "f").read_text() == "old" and not (tmp_path / ".out.old").exists()


def test_replace_dir_swaps_in_one_step(tmp_path, monkeypatch):
    out = tmp_path / "out"
    for content in ("old", "new"):
        t = tmp_path / f".out.{content}"
        t.mkdir()
        (t / "f").write_text(content)
        replace_dir(t, out)
    assert (out / "f").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert fsutil._exchange(tmp_path / "out", tmp_path / "out") in (True, False)   # callable on this system


def test_replace_files_rolls_back_the_whole_group(tmp_path, monkeypatch):
    for name, text in (("a", "old a"), ("b", "old b")):
        (tmp_path / name).write_text(text)
    before = tree(tmp_path)
    staged = []
    for name in ("a", "b", "c"):
        (tmp_path / f".{name}.new").write_text(f"new {name}")
        staged.append((tmp_path / f".{name}.new", tmp_path / name))
    real = os.replace

    def fail_on_c(src, dst):
        if Path(dst).name == "c" and Path(src).name == ".c.new":
            disk_full()
        return real(src, dst)

    monkeypatch.setattr(fsutil.os, "replace", fail_on_c)
    with pytest.raises(OSError):
        replace_files(staged)
    for p in tmp_path.glob(".*.new"):
        p.unlink()   # the caller removes its own staging files
    assert tree(tmp_path) == before


# ----------------------------------------------------------------------------- report and JSON

def test_report_and_json_records_failing_at_flush_keep_the_previous_file(tmp_path, monkeypatch):
    from shrink.report import write_report

    rc = __import__("shrink.cli", fromlist=["main"]).main(
        ["compress", "digits-mlp", "--recipe", "int8", "-o", str(tmp_path / "run")])
    assert rc == 0
    run = tmp_path / "run"
    before = tree(tmp_path)
    monkeypatch.setattr(fsutil.os, "fsync", disk_full)
    with pytest.raises(OSError) as e:
        write_report(run)
    assert e.value.filename == str(run / "report.html")   # the error names the target, not a temp name
    with pytest.raises(OSError):
        write_json_atomic(run / "result.json", {"half": "written"})
    assert tree(tmp_path) == before


def test_search_publishing_fails_as_a_whole(tmp_path, monkeypatch):
    from shrink.recipe import search_job

    out = tmp_path / "run"
    (out / "model").mkdir(parents=True)
    (out / "model" / "model.safetensors").write_bytes(b"old model")
    write_json_atomic(out / "result.json", {"chosen": {"name": "old"}})
    trial = out / "trials" / "new"
    (trial / "model").mkdir(parents=True)
    (trial / "model" / "model.safetensors").write_bytes(b"new model")
    before = tree(out)
    monkeypatch.setattr(search_job, "replace_dir", disk_full)
    with pytest.raises(OSError):
        search_job._publish(out, {"chosen": {"name": "new"}}, trial / "model")
    assert tree(out) == before
    monkeypatch.undo()
    search_job._publish(out, {"chosen": {"name": "new"}}, trial / "model")
    assert (out / "model" / "model.safetensors").read_bytes() == b"new model"
    assert json.loads((out / "result.json").read_text())["chosen"]["name"] == "new" and no_temp(out)
    search_job._publish(out, {"chosen": None}, None)   # a later search that met nothing: no stale model
    assert not (out / "model").exists() and json.loads((out / "result.json").read_text())["chosen"] is None
