"""Pruning and training steps at the recipe boundary: parsed from YAML/dicts, validated with
messages that name the step and field, ordered by the rules (structured -> unstructured ->
quantization; quantize-before-prune refused)."""
from __future__ import annotations

import pytest

from shrink.recipe.prune_steps import Finetune, IterativePrune, LotteryTicket, Prune
from shrink.recipe.rules import check_order
from shrink.recipe.steps import BUILTIN, parse_recipe, step_to_dict


def test_yaml_recipe_round_trips(tmp_path):
    text = """
- prune: {method: heads, sparsity: 0.25}
- prune: {method: wanda, pattern: "2:4"}
- iterative_prune: {method: magnitude, target: 0.8, rounds: 3, finetune: {steps: 20, lr: 0.001}}
- lottery_ticket: {target: 0.5, per_round: 0.2, rewind: 10, steps: 40}
- finetune: {steps: 30}
- gptq: {bits: 4, group_size: 64}
"""
    f = tmp_path / "r.yaml"
    f.write_text(text)
    steps = parse_recipe(f)
    assert [type(s) for s in steps][:5] == [Prune, Prune, IterativePrune, LotteryTicket, Finetune]
    assert steps[0].kind == "structured_prune" and steps[1].kind == "prune"
    assert steps[1].nm() == (2, 4)
    assert steps[2].finetune == Finetune(steps=20, lr=0.001)
    assert steps[2].schedule()[-1] == pytest.approx(0.8) and len(steps[2].schedule()) == 3
    assert steps[3].rewind == 10
    again = parse_recipe([step_to_dict(s) for s in steps])
    assert again == steps


@pytest.mark.parametrize("step, msg", [
    ({"prune": {"method": "wanda"}}, "either sparsity"),
    ({"prune": {"sparsity": 0.5, "pattern": "2:4"}}, "not both"),
    ({"prune": {"sparsity": 1.0}}, r"sparsity must be a fraction in \[0, 1\)"),
    ({"prune": {"sparsity": -0.1}}, "sparsity must be"),
    ({"prune": {"pattern": "4:2"}}, "N <= M"),
    ({"prune": {"pattern": "two:four"}}, "pattern must look like"),
    ({"prune": {"method": "heads"}}, "fraction of units"),
    ({"prune": {"method": "heads", "sparsity": 0.5, "pattern": "2:4"}}, "pattern applies"),
    ({"prune": {"method": "sparsegpt", "sparsity": 0.5, "scope": "global"}}, "scope global"),
    ({"prune": {"method": "magnitude", "sparsity": 0.5, "bits": 4}}, "bits"),
    ({"prune": {"method": "pluck", "sparsity": 0.5}}, "method must be one of"),
    ({"prune": {"sparsity": 0.5, "score": "l3"}}, "score must be"),
    ({"prune": {"sparsity": "half"}}, "field 'sparsity' must be a number"),
    ({"iterative_prune": {"rounds": 3, "per_round": 0.2}}, "rounds or per_round"),
    ({"iterative_prune": {"finetune": 7}}, "finetune must be a mapping"),
    ({"iterative_prune": {"finetune": {"stepz": 7}}}, "unknown field 'stepz'"),
    ({"lottery_ticket": {"rewind": "start"}}, "rewind. must be init"),
    ({"lottery_ticket": {"rewind": 500, "steps": 100}}, "must come before"),
    ({"finetune": {"steps": 0}}, "steps must be a positive"),
    ({"finetune": {"loss": "hinge"}}, "loss must be one of"),
])
def test_bad_steps_name_the_step_and_field(step, msg):
    with pytest.raises(ValueError, match=msg) as e:
        parse_recipe([step])
    assert str(e.value).startswith("recipe step 1 (")


def test_ordering_rules_for_pruning():
    prune = Prune(method="wanda", sparsity=0.5)
    heads = Prune(method="heads", sparsity=0.25)
    quant = parse_recipe("w4-gptq")[0]
    with pytest.raises(ValueError, match="quantize-before-prune"):
        check_order([quant, prune])
    with pytest.raises(ValueError, match="coarser"):
        check_order([prune, heads])
    notes = check_order([heads, prune, Finetune(), quant])
    assert not any("suggestion" in n for n in notes)
    notes = check_order([prune, quant])
    assert any("suggestion: step 1 (prune)" in n and "finetune" in n for n in notes)
    # steps that train by themselves get no fine-tune suggestion
    assert check_order([IterativePrune(target=0.5, rounds=2), quant]) == []
    assert check_order([quant, prune], force=True)[0].startswith("forced:")


def test_builtin_pruning_recipes_parse():
    for name in ("prune50-wanda+w4", "prune50-wanda", "prune-2:4-sparsegpt"):
        steps = parse_recipe(name)
        assert steps == list(BUILTIN[name])
        assert isinstance(steps[0], Prune)


def test_search_space_has_pruning_families_and_every_candidate_parses():
    from shrink.recipe.search import candidate_space

    for space in ("small", "default", "wide"):
        for calibrated in (True, False):
            for _, recipe in candidate_space(space, calibrated):
                steps = parse_recipe(recipe)
                check_order(steps)          # every candidate is an order the rules accept
    names = [n for n, _ in candidate_space("default", True)]
    assert {"prune50-wanda", "prune50-wanda+w4", "2:4-sparsegpt"} <= set(names)
    assert "prune50-magnitude" in [n for n, _ in candidate_space("default", False)]
    assert any(n.startswith("heads25") for n, _ in candidate_space("wide", True))


def test_a_scope_the_method_cannot_honour_is_refused():
    for method in ("wanda", "sparsegpt"):
        for scope in ("global", "sensitivity"):
            with pytest.raises(ValueError, match=f"scope {scope} works with magnitude"):
                parse_recipe([{"prune": {"method": method, "sparsity": 0.5, "scope": scope}}])
