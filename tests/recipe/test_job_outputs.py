"""What `shrink compress` leaves in DIR when it fails: the previous pair of DIR/model and
DIR/result.json as they were, and no empty DIR it created itself."""
from __future__ import annotations

import errno
import hashlib
from pathlib import Path

import pytest

from shrink.cli import main
from shrink.recipe import job


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_failed_save_leaves_the_previous_model_and_result(tmp_path, monkeypatch):
    out = tmp_path / "d"
    job.run_job("digits-mlp", "int8", out)
    before = _tree(out)
    import shrink.models.compressed as compressed

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(compressed, "save_compressed", full_disk)
    with pytest.raises(OSError):
        job.run_job("digits-mlp", "w4-rtn", out)
    after = {k: v for k, v in _tree(out).items() if not k.startswith(".resume/")}   # a resumable state may stay
    assert after == before                           # no new result.json beside the old model
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.name != ".resume"]


def test_a_failed_run_leaves_no_empty_directory(tmp_path, capsys):
    onnx = tmp_path / "m.onnx"
    assert main(["export", "digits-mlp", "--format", "onnx", "-o", str(onnx), "--no-verify"]) == 0
    capsys.readouterr()
    out = tmp_path / "never"
    assert main(["compress", str(onnx), "--recipe", "int8", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot be recompressed" in err[0] and "digits-mlp" in err[0]
    assert not out.exists()
