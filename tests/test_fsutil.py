"""Atomic writes: the whole file or the old one, no temporary left, the usual file mode."""
from __future__ import annotations

import os

import pytest

from shrink.fsutil import write_bytes_atomic, write_json_atomic


def test_atomic_write_replaces_whole_files_with_the_umask_mode(tmp_path):
    p = tmp_path / "sub" / "x.json"
    write_json_atomic(p, {"a": 1})
    write_json_atomic(p, {"a": 2})
    assert p.read_text() == '{\n  "a": 2\n}\n'
    mask = os.umask(0o022)
    try:
        write_bytes_atomic(p, b"z")
        assert (p.stat().st_mode & 0o777) == 0o644
    finally:
        os.umask(mask)
    assert [q.name for q in p.parent.iterdir()] == ["x.json"]


def test_failed_write_keeps_the_old_file(tmp_path):
    p = tmp_path / "x.json"
    write_json_atomic(p, {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomic(p, {"a": object()})
    assert p.read_text() == '{\n  "a": 1\n}\n' and len(list(tmp_path.iterdir())) == 1


def test_replace_dir_swaps_whole_directories_and_refuses_a_file(tmp_path):
    from shrink.fsutil import replace_dir

    out = tmp_path / "out"
    for content in ("old", "new"):
        tmp = tmp_path / f".out.{content}"
        tmp.mkdir()
        (tmp / "f.txt").write_text(content)
        replace_dir(tmp, out)
    assert (out / "f.txt").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    (tmp_path / "file").write_text("x")
    (tmp_path / ".file.tmp").mkdir()
    with pytest.raises(ValueError, match="not a directory"):
        replace_dir(tmp_path / ".file.tmp", tmp_path / "file")
    assert (tmp_path / "file").read_text() == "x"


def test_named_write_error_reads_a_short_write_as_a_full_disk(tmp_path):
    import errno

    from shrink.fsutil import named_write_error

    short = OSError("524288 requested and 229496 written")   # numpy's tofile on a full disk: no errno
    e = named_write_error(short, tmp_path / "m.gguf")
    assert (e.errno, e.filename, e.__cause__) == (errno.ENOSPC, str(tmp_path / "m.gguf"), short)
    unnamed = OSError(errno.EROFS, "Read-only file system")
    assert named_write_error(unnamed, "x").filename == "x"
    other = ValueError("not an I/O error")
    assert named_write_error(other, "x") is other
