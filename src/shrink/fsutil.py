"""Writing files so that nothing is ever half-written: a temporary name in the
same directory, fsync, then an atomic rename over the target."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, file_mode())  # mkstemp makes 0600; an output file gets the usual umask mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def file_mode() -> int:
    """The mode a new file gets under the current umask (0666 & ~umask)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def replace_dir(tmp: str | Path, directory: str | Path) -> Path:
    """Put the finished directory `tmp` (a sibling of `directory`) in its place: the old one,
    if any, is moved aside first and removed after, so a reader sees the old or the new, whole."""
    tmp, directory = Path(tmp), Path(directory)
    if directory.exists():
        if not directory.is_dir():
            raise ValueError(f"{directory} exists and is not a directory; choose another output path")
        old = directory.with_name(f".{directory.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(directory)
    return directory


def write_json_atomic(path: str | Path, obj) -> Path:
    return write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())
