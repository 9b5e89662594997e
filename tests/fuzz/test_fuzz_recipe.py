"""Fuzz the recipe reader (recipe/steps.py parse_recipe on a YAML file) over mutations of a
real recipe written from shrink's built-in recipes, and pin down what the loader refuses:
Python object tags (nothing is ever constructed), aliases, oversized files, documents that
are not a list of steps. Every input parses or is refused with a one-line ValueError /
FileNotFoundError naming the file."""
from __future__ import annotations

import pytest

yaml = pytest.importorskip("yaml")
pytest.importorskip("hypothesis")

from fuzz_support import fuzz_settings, mutate, mutations, outcome  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from shrink.recipe.steps import BUILTIN, MAX_RECIPE_BYTES, parse_recipe, step_to_dict  # noqa: E402


def recipe_text() -> bytes:
    """Every built-in recipe's steps in one YAML list, as a user would write them."""
    steps = [step_to_dict(s) for name in sorted(BUILTIN) for s in BUILTIN[name]]
    return yaml.safe_dump(steps, sort_keys=True).encode()


def test_the_real_recipe_parses(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes(recipe_text())
    assert outcome(parse_recipe, path) is None
    assert len(parse_recipe(path)) == sum(len(v) for v in BUILTIN.values())


@given(ops=mutations(max_ops=4))
@fuzz_settings(200)
def test_mutated_recipe_parses_or_is_refused(tmp_path, ops):
    path = tmp_path / "m.yaml"
    path.write_bytes(mutate(recipe_text(), ops))
    outcome(parse_recipe, path, names=str(path))


@given(doc=st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                        lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids, max_size=3),
                        max_leaves=8),
       step=st.sampled_from(sorted({next(iter(step_to_dict(s))) for v in BUILTIN.values() for s in v})),
       key=st.text(max_size=12))
@fuzz_settings(150)
def test_any_values_in_a_step_parse_or_are_refused(tmp_path, doc, step, key):
    path = tmp_path / "v.yaml"
    path.write_text(yaml.safe_dump([{step: {key: doc}}, {step: doc}]))
    outcome(parse_recipe, path, names=str(path))


def test_python_object_tags_are_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    for text in (f"!!python/object/apply:os.system ['touch {marker}']\n",
                 f"- rtn: !!python/object/apply:os.system ['touch {marker}']\n",
                 "- rtn: !!python/name:os.system\n",
                 "- !!python/object:shrink.recipe.steps.RTN {bits: 4}\n"):
        path = tmp_path / "evil.yaml"
        path.write_text(text)
        msg = outcome(parse_recipe, path, names=str(path))
        assert msg is not None and "Python objects are never built" in msg
    assert not marker.exists()


def test_aliases_huge_files_and_wrong_documents_are_refused(tmp_path):
    path = tmp_path / "r.yaml"
    cases = {
        "- &a {rtn: {bits: 4}}\n- *a\n": "aliases",
        "a: &a [x, x, x, x]\nb: &b [*a, *a, *a, *a]\nc: [*b, *b, *b, *b]\n": "aliases",
        "rtn: {bits: 4}\n": "non-empty list of steps",
        "'just a string'\n": "non-empty list of steps",
        "": "non-empty list of steps",
        "- rtn: {bits: 4}\n- rtn: [\n": "not valid YAML: line",
        "- [" * 5000: "",
        "- gptq: {bits: four}\n": "bits",
        "- gptq: 4\n": "options must be a mapping",
    }
    for text, expected in cases.items():
        path.write_text(text)
        msg = outcome(parse_recipe, path, names=str(path))
        assert msg is not None and expected in msg, (text[:40], msg)
    path.write_bytes(b"- rtn: {bits: 4}\n" + b"#" * MAX_RECIPE_BYTES)
    assert "too large for a recipe" in outcome(parse_recipe, path, names=str(path))
    path.write_bytes(b"- rtn: {bits: 4}\n# \xff\xfe\n")
    assert "not UTF-8" in outcome(parse_recipe, path, names=str(path))
