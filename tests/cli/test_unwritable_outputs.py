"""A full disk, a read-only or unwritable output, a file or directory in the way: exit 2 and
one line saying what could not be written, why, what to do, and that nothing was
half-written (and it was not: the earlier output is unchanged). A budget no candidate
meets: search still writes DIR/result.json and the report, then exits 2 naming the closest."""
from __future__ import annotations

import errno
import hashlib
import json
from pathlib import Path

import pytest

import shrink.fsutil as fsutil
from shrink.cli import main


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def one_line(err: str) -> str:
    """The error line (progress bars, drawn with \\r, may come before it): exactly one, no traceback."""
    lines = [l for l in err.replace("\r", "\n").splitlines() if "error:" in l]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_export_onto_a_full_disk_exits_2_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    import shrink.export.onnx as onnx_export

    def full(proto, path):
        Path(path).write_bytes(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(onnx_export, "_write_model", full)
    out = tmp_path / "out" / "m.onnx"
    assert main(["export", "digits-mlp", "--format", "onnx", "-o", str(out), "--no-verify"]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("shrink export: error: cannot write ") and f"{out}:" in line
    assert "no space left on the device" in line and "free some space" in line and "nothing was half-written" in line
    assert list((tmp_path / "out").iterdir()) == []


def test_compress_onto_a_full_disk_exits_2_and_keeps_the_earlier_run(tmp_path, monkeypatch, capsys):
    import safetensors
    import safetensors.torch as st

    run = tmp_path / "run"
    assert main(["compress", "digits-mlp", "--recipe", "int8", "-o", str(run)]) == 0
    capsys.readouterr()
    before = tree(tmp_path)

    def rust_full(tensors, filename, metadata=None):   # safetensors reports the errno in its message
        Path(filename).write_bytes(b"\0" * 100)
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(st, "save_file", rust_full)
    assert main(["compress", "digits-mlp", "--recipe", "kmeans16", "-o", str(run)]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"shrink compress: error: cannot write the output {run}: no space left on the device")
    assert "nothing was half-written" in line
    # the earlier run is intact; only the failed run's resume state (DIR/.resume, for --resume) is new
    assert {k: v for k, v in tree(tmp_path).items() if not k.startswith("run/.resume")} == before


@pytest.mark.parametrize("code,says", [
    (errno.EROFS, "the file system is read-only"),
    (errno.EACCES, "permission denied; give an output path (-o) you can write to"),
    (errno.EDQUOT, "the disk quota is exceeded"),
])
def test_report_to_an_unwritable_place_exits_2(tmp_path, monkeypatch, capsys, code, says):
    run = tmp_path / "run"
    assert main(["compress", "digits-mlp", "--recipe", "int8", "-o", str(run)]) == 0
    capsys.readouterr()
    before = tree(tmp_path)
    real = fsutil.os.replace

    def refuse(src, dst):
        if str(dst).endswith("page.html"):
            raise (PermissionError if code == errno.EACCES else OSError)(code, "refused", str(src), None, str(dst))
        return real(src, dst)

    monkeypatch.setattr(fsutil.os, "replace", refuse)
    assert main(["report", str(run), "-o", str(tmp_path / "page.html")]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"shrink report: error: cannot write {tmp_path / 'page.html'}: {says}")
    assert tree(tmp_path) == before


def test_a_file_or_directory_in_the_way_exits_2(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["compress", "digits-mlp", "--recipe", "int8", "-o", str(run)]) == 0
    capsys.readouterr()
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir" / "report.html").mkdir(parents=True)   # -o adir writes adir/report.html
    before = tree(tmp_path)
    for target, says in ((tmp_path / "afile" / "page.html", "it is a file, and a directory is needed there"),
                         (tmp_path / "afile" / "sub" / "page.html", "a part of that path is a file"),
                         (tmp_path / "adir", "is a directory where a file was to be written")):
        assert main(["report", str(run), "-o", str(target)]) == 2
        line = one_line(capsys.readouterr().err)
        assert says in line and "nothing was half-written" in line, line
    assert tree(tmp_path) == before


def test_an_internal_oserror_is_not_dressed_up_as_the_users(monkeypatch):
    import shrink.cli.report as report_cli

    def broken(args):
        raise OSError(errno.ECONNRESET, "connection reset")

    monkeypatch.setattr(report_cli, "run", broken)
    with pytest.raises(OSError):
        main(["report", "x"])


def test_search_with_a_budget_nothing_meets_writes_its_evidence_then_exits_2(tmp_path, capsys):
    out = tmp_path / "s"
    argv = ["search", "digits-mlp", "--max-size", "1000", "--recipe", "int8", "--recipe", "kmeans16",
            "--full", "2", "--workers", "1", "-o", str(out)]
    assert main(argv + ["--json"]) == 2
    cap = capsys.readouterr()
    doc = json.loads(cap.out)   # --json still prints result.json, and only it, on stdout
    assert doc == json.loads((out / "result.json").read_text())
    assert doc["chosen"] is None and {c["name"] for c in doc["candidates"]} == {"int8", "kmeans16"}
    near = doc["closest"]["name"]
    assert near == min(doc["candidates"], key=lambda c: c["size_bytes"])["name"]
    line = one_line(cap.err)
    assert line.startswith("shrink search: error: no candidate met the constraints; closest: " + near)
    assert "1,000 B budget" in line and "loosen --max-size" in line
    assert (out / "report.html").is_file() and not (out / "model").exists()
