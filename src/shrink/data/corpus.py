"""The Python standard library's own sources as a real text corpus.

Code written by many people over thirty years, present on every machine that
runs shrink, readable without a network (DESIGN.md §6). The split is by
module: a module is held out when a stable hash of its dotted name falls
below `heldout_fraction`, so the split does not depend on the file system's
order, on which other files exist, or on the caps.

Excluded: the test suites (`test/`, `tests/`, `idle_test/`), `idlelib`,
installed packages (`site-packages`), the build configuration
(`config-*`, `_sysconfigdata*`, specific to one machine) and two directories
of machine-generated tables (`encodings`' codec maps, `pydoc_data`'s topic
dump), which are not text that people wrote.
"""
from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

EXCLUDED_DIRS = frozenset({
    "test", "tests", "idle_test", "idlelib", "site-packages", "dist-packages",
    "__pycache__", "encodings", "pydoc_data",
})
DEFAULT_HELDOUT_FRACTION = 0.05


@dataclass(frozen=True)
class Document:
    module: str   # dotted module name, e.g. "asyncio.base_events"; a package is its own name
    text: str


@dataclass(frozen=True)
class Corpus:
    """Documents of the two splits, each sorted by module name."""
    train: tuple[Document, ...]
    heldout: tuple[Document, ...]
    root: Path

    @property
    def train_texts(self) -> list[str]:
        return [d.text for d in self.train]

    @property
    def heldout_texts(self) -> list[str]:
        return [d.text for d in self.heldout]


def stdlib_root() -> Path:
    """Directory of the running interpreter's standard library sources."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not (root / "os.py").is_file():
        raise FileNotFoundError(
            f"the standard-library corpus needs the library's .py sources, but {root} has no os.py "
            "(an interpreter without sources, e.g. an embedded or zipped one); "
            "pass a text file or JSONL file as calibration data instead"
        )
    return root


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _excluded(rel: Path) -> bool:
    dirs = rel.parts[:-1]
    if any(d in EXCLUDED_DIRS for d in dirs):
        return True
    if dirs and dirs[0].startswith("config-"):
        return True
    return rel.name.startswith("_sysconfigdata")


def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """The corpus's .py files, sorted by their path relative to `root`."""
    root = stdlib_root() if root is None else Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory")
    files = [p for p in root.rglob("*.py") if p.is_file() and not _excluded(p.relative_to(root))]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def stable_unit(name: str) -> float:
    """A number in [0, 1) fixed by `name` alone (sha256; Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2.0**64


def is_heldout(module: str, fraction: float = DEFAULT_HELDOUT_FRACTION) -> bool:
    return stable_unit(module) < fraction


def _take(docs: list[Document], cap: int | None) -> tuple[Document, ...]:
    """At most `cap` characters of documents. Documents are taken in the stable
    hash order of their names (a spread of the library, not its first letters);
    the last one is cut to fit. The result is sorted by module name."""
    if cap is None:
        return tuple(sorted(docs, key=lambda d: d.module))
    if cap < 0:
        raise ValueError(f"a character cap must be >= 0, got {cap}")
    out, left = [], cap
    for d in sorted(docs, key=lambda d: (stable_unit("order:" + d.module), d.module)):
        if left <= 0:
            break
        out.append(d if len(d.text) <= left else Document(d.module, d.text[:left]))
        left -= len(out[-1].text)
    return tuple(sorted(out, key=lambda d: d.module))


def stdlib_corpus(
    max_train_chars: int | None = None,
    max_heldout_chars: int | None = None,
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
    root: str | Path | None = None,
) -> Corpus:
    """Train and held-out text of the standard library.

    Files are read as UTF-8 with undecodable bytes dropped; empty files are
    skipped. The caps bound the characters returned per split (None: all).
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    root = stdlib_root() if root is None else Path(root)
    train, heldout = [], []
    for path in stdlib_files(root):
        text = path.read_bytes().decode("utf-8", errors="ignore")
        if not text.strip():
            continue
        doc = Document(module_name(path, root), text)
        (heldout if is_heldout(doc.module, heldout_fraction) else train).append(doc)
    if not train or not heldout:
        raise ValueError(
            f"{root}: the corpus split is empty ({len(train)} train, {len(heldout)} held-out modules); "
            "the directory has too few .py files"
        )
    return Corpus(train=_take(train, max_train_chars), heldout=_take(heldout, max_heldout_chars), root=root)


def sentences_from(texts: Sequence[str], n: int = 64, min_chars: int = 40, max_chars: int = 300) -> list[str]:
    """Natural-language lines (comments and docstrings) from source texts, in order, deterministic:
    what a sentence encoder reads, for its calibration (train texts) and its metric (held-out)."""
    out: list[str] = []
    for text in texts:
        for line in text.splitlines():
            s = line.strip().lstrip("#").strip().strip('"').strip()
            if min_chars <= len(s) <= max_chars and sum(c.isalpha() or c == " " for c in s) > 0.85 * len(s):
                out.append(s)
                if len(out) >= n:
                    return out
    return out
