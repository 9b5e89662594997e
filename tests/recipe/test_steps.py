"""Recipe parsing: built-in names, YAML files, Python lists; errors name the step and field."""
from __future__ import annotations

import pytest

from shrink.recipe import AWQ, BUILTIN, GPTQ, RTN, KMeans, parse_recipe
from shrink.recipe.steps import step_to_dict


def test_builtin_names_and_defaults():
    assert parse_recipe("w4-gptq") == [GPTQ(bits=4, group_size=128, symmetric=False, damp=0.01, block_size=128)]
    assert parse_recipe("int8") == [RTN(bits=8, group_size=None, symmetric=True)]
    assert parse_recipe("w4-awq") == [AWQ()]
    assert set(BUILTIN) >= {"int8", "w4-rtn", "w4-gptq", "w4-awq"}
    assert GPTQ().spec().group_size == 128 and not GPTQ().spec().symmetric


def test_yaml_file_and_python_list_agree(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("- gptq: {bits: 3, group_size: 64, act_order: true}\n- kmeans: {clusters: 8}\n- rtn:\n")
    from_yaml = parse_recipe(f)
    from_list = parse_recipe([{"gptq": {"bits": 3, "group_size": 64, "act_order": True}},
                              {"kmeans": {"clusters": 8}}, {"rtn": None}])
    assert from_yaml == from_list == [GPTQ(bits=3, group_size=64, act_order=True), KMeans(clusters=8), RTN()]
    # typed steps pass through; the dict form round-trips
    assert parse_recipe([step_to_dict(s) for s in from_list]) == from_list


def test_group_size_null_means_per_channel():
    (step,) = parse_recipe([{"rtn": {"bits": 8, "group_size": None, "symmetric": True}}])
    assert step.spec().granularity == "channel"


@pytest.mark.parametrize("recipe, message", [
    ([{"gptx": {}}], "recipe step 1: unknown step 'gptx' (did you mean gptq?)"),
    ([{"rtn": {}}, {"gptq": {"bitz": 4}}], "recipe step 2 (gptq): unknown field 'bitz'"),
    ([{"gptq": {"bits": 9}}], "recipe step 1 (gptq): bits must be an integer in 2..8, got 9"),
    ([{"gptq": {"bits": "4"}}], "recipe step 1 (gptq): field 'bits' must be an integer"),
    ([{"gptq": {"act_order": "yes"}}], "field 'act_order' must be true or false"),
    ([{"gptq": {"damp": 2}}], "damp must be in (0, 1)"),
    ([{"kmeans": {"clusters": 1000}}], "clusters must be an integer in 2..256"),
    ([{"rtn": {"observer": "kl"}}], "observer must be one of minmax, percentile, mse"),
    ([{"rtn": {}, "gptq": {}}], "expected a one-key mapping"),
    ([], "non-empty list"),
    ("w4-gptk", "closest: w4-gptq"),
])
def test_bad_recipes_name_the_step_and_field(recipe, message):
    with pytest.raises(ValueError) as e:
        parse_recipe(recipe)
    assert message in str(e.value)


def test_bad_yaml_and_missing_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("- gptq: {bits: 4\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        parse_recipe(f)
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        parse_recipe(tmp_path / "nope.yaml")
    f.write_text("- !!python/object/apply:os.system ['true']\n")  # safe_load refuses object construction
    with pytest.raises(ValueError, match="not valid YAML"):
        parse_recipe(f)
