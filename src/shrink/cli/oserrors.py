"""One line for an output that could not be written (a full disk, a read-only file system,
no permission, a directory in the way): what, why, what to do, and that nothing was
half-written (every writer in shrink writes a temporary name and renames it into place,
so a failed write leaves the earlier output, if any, as it was). `shrink` exits 2 with it."""
from __future__ import annotations

import errno
import os
import re

_FULL = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded"}
_NOT_HALF = "nothing was half-written (an earlier output there, if any, is unchanged)"
# a temporary name shrink's writers use: ".NAME.<8 random>" (mkdtemp) or ".NAME.<8 random>.tmp" (mkstemp)
_TEMP = re.compile(r"^\.(.+)\.[A-Za-z0-9_]{8}(?:\.tmp)?$")
_OS_ERROR_IN_TEXT = re.compile(r"\(os error (\d+)\)")   # Rust writers (safetensors) report errno so


def _errno_of(e: BaseException) -> int | None:
    if isinstance(e, OSError) and e.errno is not None:
        return e.errno
    m = _OS_ERROR_IN_TEXT.search(str(e))
    return int(m.group(1)) if m else None


def _shown(path, output=None) -> str:
    """The path the user asked for: a temporary component is shown as the name it stands for
    (".out.onnx.x1y2z3w4.tmp/out.onnx" -> "out.onnx"); no path: the command's output, if given."""
    if path is None:
        return f"the output {output}" if output else "an output file"
    parts: list[str] = []
    temp = False
    for part in str(os.fsdecode(path)).split(os.sep):
        if temp and parts and part == parts[-1]:
            continue   # a staging directory holding the file it stands for
        m = _TEMP.match(part)
        temp = m is not None
        parts.append(m.group(1) if m else part)
    return os.sep.join(parts)


def _cause(e: BaseException) -> BaseException:
    """The OSError behind a wrapped one (raise ... from e), if any."""
    seen = e
    while seen is not None and not isinstance(seen, OSError) and _errno_of(seen) is None:
        seen = seen.__cause__ or seen.__context__
    return seen if seen is not None else e


def write_error_line(e: BaseException, output=None) -> str | None:
    """The one line for an unwritable output, or None when `e` is not such an error.
    output: the command's -o, named when the error names no file."""
    e = _cause(e)
    code = _errno_of(e)
    if code is None:
        return None
    path = getattr(e, "filename2", None) or getattr(e, "filename", None)   # a rename's target, else the file
    what = _shown(path, output)
    if code in _FULL:
        return (f"cannot write {what}: {_FULL[code]}; free some space or give an output (-o) on a disk with "
                f"room, then run again; {_NOT_HALF}")
    if code == errno.EROFS:
        return f"cannot write {what}: the file system is read-only; give an output path (-o) elsewhere; {_NOT_HALF}"
    if code in (errno.EACCES, errno.EPERM):
        if path is not None and os.path.exists(path) and not os.access(path, os.R_OK):
            return f"cannot read {what}: permission denied; make it readable (chmod) or copy it somewhere you can read"
        return (f"cannot write {what}: permission denied; give an output path (-o) you can write to, or change "
                f"its permissions; {_NOT_HALF}")
    if code == errno.EISDIR:
        return f"{what} is a directory where a file was to be written; give a file path (-o FILE); {_NOT_HALF}"
    if code == errno.EEXIST and path is not None and os.path.exists(path) and not os.path.isdir(path):
        return (f"cannot write under {what}: it is a file, and a directory is needed there; give another output "
                f"path (-o); {_NOT_HALF}")
    if code == errno.ENOTDIR:
        return (f"cannot write {what}: a part of that path is a file, not a directory; give another output path "
                f"(-o); {_NOT_HALF}")
    return None
