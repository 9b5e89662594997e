"""Helpers shared by test modules (importable: tests/ is on sys.path via conftest)."""
from __future__ import annotations

import importlib
import inspect

MODULES = ["json", "argparse", "collections", "functools", "itertools", "pathlib", "shutil",
           "textwrap", "logging", "csv", "heapq", "bisect", "difflib", "statistics", "fractions", "string"]


def stdlib_sentences(n: int = 48) -> list[str]:
    out: list[str] = []
    for name in MODULES:
        mod = importlib.import_module(name)
        for _, obj in inspect.getmembers(mod):
            doc = inspect.getdoc(obj) if (inspect.isfunction(obj) or inspect.isclass(obj)) else None
            if doc:
                line = " ".join(doc.split())[:300]
                if len(line) > 40 and line not in out:
                    out.append(line)
            if len(out) >= n:
                return out
    return out
