"""Finding a table entry by a loosely spelled name; suggesting the nearest on a miss."""
from __future__ import annotations

import difflib
import re
from typing import Iterable, Mapping


def key(name: str) -> str:
    """Spelling-insensitive key: lower case, no organisation prefix or '-hf' suffix, only [a-z0-9.]."""
    name = name.strip().lower().rsplit("/", 1)[-1]
    name = re.sub(r"[-_]hf$", "", name)
    return re.sub(r"[^a-z0-9.]", "", name)


def build_index(canonical: Iterable[str], aliases: Mapping[str, str]) -> dict[str, str]:
    """key -> canonical name, for the names themselves and their aliases."""
    index = {key(n): n for n in canonical}
    for alias, target in aliases.items():
        if target not in index.values():
            raise KeyError(f"alias {alias!r} points to unknown {target!r}")
        index.setdefault(key(alias), target)
    return index


def closest(name: str, index: Mapping[str, str], n: int = 3) -> list[str]:
    """Canonical names whose spellings are nearest `name` (difflib), best first, no repeats."""
    found: list[str] = []
    for k in difflib.get_close_matches(key(name), list(index), n=3 * n, cutoff=0.5):
        if index[k] not in found:
            found.append(index[k])
    return found[:n]


def find(kind: str, name: object, index: Mapping[str, str], known: Iterable[str]) -> str:
    """The canonical name for `name`; a one-line ValueError with the closest names otherwise."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{kind} name must be a non-empty string, got {name!r}")
    k = key(name)
    if k in index:
        return index[k]
    near = closest(name, index)
    hint = f"closest: {', '.join(near)}" if near else f"known: {', '.join(known)}"
    raise ValueError(f"unknown {kind} {name!r}; {hint}")
