"""DESIGN.md §3: a module imports only from its own layer or the layers below it.

Order, bottom first. `shrink/__init__.py` and `__main__.py` are the public
facade and may import anything. A new subpackage must be placed here.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

LAYERS = [
    "fsutil", "formats", "quant", "calc", "observe", "algos", "modules", "surgery",
    "data", "models", "train", "eval", "plan", "recipe", "export", "report", "cli",
]
SRC = Path(__file__).resolve().parents[1] / "src" / "shrink"
FACADE = {"__init__", "__main__"}


def layer_of(parts: list[str]) -> str | None:
    """Layer of a module path inside shrink (parts after 'shrink')."""
    name = parts[0].removesuffix(".py") if parts else None
    return None if name is None or name in FACADE else name


def imported_shrink_modules(path: Path, root: Path) -> list[tuple[int, list[str]]]:
    """(line, parts after 'shrink') of every shrink import in a file, function-level ones included."""
    rel = path.relative_to(root).with_suffix("").parts  # e.g. ('quant', 'ops')
    pkg = list(rel[:-1]) if path.name != "__init__.py" else list(rel[:-1])
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "shrink" or a.name.startswith("shrink."):
                    out.append((node.lineno, a.name.split(".")[1:]))
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                base = pkg[: len(pkg) - (node.level - 1)] if node.level > 1 else pkg
                mod = base + (node.module.split(".") if node.module else [])
                if not mod:  # `from . import x` at the top: x is the layer
                    for a in node.names:
                        out.append((node.lineno, [a.name]))
                else:
                    out.append((node.lineno, mod))
            elif node.module and (node.module == "shrink" or node.module.startswith("shrink.")):
                parts = node.module.split(".")[1:]
                if not parts:  # `from shrink import x`
                    for a in node.names:
                        out.append((node.lineno, [a.name]))
                else:
                    out.append((node.lineno, parts))
    return out


def violations(root: Path, layers: list[str]) -> list[str]:
    rank = {name: i for i, name in enumerate(layers)}
    found = []
    for path in sorted(root.rglob("*.py")):
        own = layer_of(list(path.relative_to(root).parts))
        if own is None:
            continue
        if own not in rank:
            found.append(f"{path.relative_to(root)}: layer {own!r} is not in the layer list")
            continue
        for line, parts in imported_shrink_modules(path, root):
            target = layer_of(parts)
            if target is None or target == "__version__":
                continue
            if target not in rank:
                found.append(f"{path.relative_to(root)}:{line} imports unknown layer {target!r}")
            elif rank[target] > rank[own]:
                found.append(f"{path.relative_to(root)}:{line}: {own} imports {target}, a layer above it")
    return found


def test_no_layer_imports_a_layer_above_it():
    assert SRC.is_dir()
    problems = violations(SRC, LAYERS)
    assert not problems, "layering violations:\n" + "\n".join(problems)


def test_every_subpackage_has_a_layer():
    names = {p.name.removesuffix(".py") for p in SRC.iterdir() if not p.name.startswith("_") and (p.is_dir() or p.suffix == ".py")}
    names.discard("py.typed")
    assert names <= set(LAYERS), f"place these in LAYERS: {sorted(names - set(LAYERS))}"


@pytest.mark.parametrize("code, bad", [
    ("from shrink.algos import rtn\n", True),           # quant importing algos: upward
    ("import shrink.cli\n", True),
    ("def f():\n    from shrink.observe import MinMaxObserver\n", True),  # hidden in a function
    ("from ..algos import gptq\n", True),                # relative, upward
    ("from shrink.formats import IntFormat\n", False),   # downward is fine
    ("from . import spec\n", False),                     # own layer
])
def test_checker_catches_upward_imports(tmp_path, code, bad):
    root = tmp_path / "shrink"
    (root / "quant").mkdir(parents=True)
    (root / "quant" / "__init__.py").write_text("")
    (root / "quant" / "x.py").write_text(code)
    assert bool(violations(root, LAYERS)) is bad
