"""Writing files so that nothing is ever half-written: a temporary name in the
same directory, fsync, then an atomic rename over the target.

- write_bytes_atomic / write_json_atomic: one file.
- replace_dir: a finished directory (built under a temporary sibling name) put in
  place of the old one: on Linux one atomic exchange (renameat2 RENAME_EXCHANGE), so a
  reader sees the old directory or the new one, whole, even after a kill -9.
- replace_files: several files that belong together (an .onnx file, its external data
  and its sidecar) placed as a group, the old ones restored if placing fails.
- temp_path_for: a temporary path beside a target, for writers that need a file name.

Temporary names start with "." and end in ".tmp"; a failed write removes its own.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
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
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and e.filename is None:   # write()/fsync() name no file: name the target
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    _fsync_dir(path.parent)
    return path


def file_mode() -> int:
    """The mode a new file gets under the current umask (0666 & ~umask)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def temp_path_for(path: str | Path, suffix: str = ".tmp"):
    """A fresh temporary file path beside `path` (same directory, so a rename is atomic),
    removed on leaving the block unless the caller renamed it away meanwhile."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
    finally:
        Path(tmp).unlink(missing_ok=True)


def fsync_file(path: str | Path) -> None:
    """Flush a finished file's data to the disk (before the rename that publishes it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from e
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file under `root`, then the directories (a finished directory, before its rename)."""
    root = Path(root)
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            fsync_file(p)
    for d in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        _fsync_dir(d)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass   # some filesystems refuse fsync on a directory; the rename is atomic all the same
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the system or
    filesystem has no such call (the caller falls back to two renames)."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(tmp: str | Path, directory: str | Path) -> Path:
    """Put the finished directory `tmp` (a sibling of `directory`) in its place. Its files are
    fsynced first; an existing directory is swapped with it in one atomic exchange where the
    system has one (else moved aside first, and put back if the second rename fails), then
    removed, so a reader sees the old or the new, whole."""
    tmp, directory = Path(tmp), Path(directory)
    fsync_tree(tmp)
    if directory.exists() or directory.is_symlink():
        if not directory.is_dir() or directory.is_symlink():
            raise ValueError(f"{directory} exists and is not a directory; choose another output path")
        if _exchange(tmp, directory):
            shutil.rmtree(tmp, ignore_errors=True)   # now the old directory
            _fsync_dir(directory.parent)
            return directory
        old = directory.with_name(f".{directory.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        directory.rename(old)
        try:
            tmp.rename(directory)
        except BaseException:
            old.rename(directory)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(directory)
    _fsync_dir(directory.parent)
    return directory


def replace_files(pairs: list[tuple[str | Path, str | Path]]) -> None:
    """Place finished temporary files over their targets as one group: [(tmp, target), ...],
    targets in one directory, placed in the order given. The old targets are first renamed to
    hidden backups (the last pair's first: list a file that describes the others, such as a
    sidecar, last), so no old file ever sits beside a new one it does not describe; if
    placing fails the new files are removed and the backups put back. Each tmp is fsynced."""
    pairs = [(Path(t), Path(p)) for t, p in pairs]
    for t, _ in pairs:
        fsync_file(t)
    backups: list[tuple[Path, Path]] = []
    placed: list[Path] = []
    try:
        for _, target in reversed(pairs):
            if target.exists():
                backup = target.with_name(f".{target.name}.{os.getpid()}.old.tmp")
                os.replace(target, backup)
                backups.append((backup, target))
        for t, target in pairs:
            os.replace(t, target)
            placed.append(target)
    except BaseException:
        for target in placed:
            target.unlink(missing_ok=True)
        for backup, target in reversed(backups):
            os.replace(backup, target)
        raise
    for backup, _ in backups:
        backup.unlink(missing_ok=True)
    if pairs:
        _fsync_dir(pairs[-1][1].parent)


def named_write_error(e: BaseException, path: str | Path) -> BaseException:
    """`e` as an OSError that names `path`, for an error raised while writing it: numpy's short
    write ("N requested and M written", no errno) is the disk filling up (ENOSPC); an OSError
    that names no file gets `path`. Anything else is returned as it is."""
    if not isinstance(e, OSError) or e.filename is not None:
        return e
    code = e.errno
    if code is None and "requested and" in str(e) and "written" in str(e):
        code = errno.ENOSPC
    if code is None:
        return e
    err = OSError(code, os.strerror(code) if e.errno is None else e.strerror, str(path))
    err.__cause__ = e
    return err


def write_json_atomic(path: str | Path, obj) -> Path:
    return write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())
