"""Recipe steps of issue 7 at the boundary: YAML spellings, defaults, and messages that
name the step and field."""
from __future__ import annotations

import pytest

from shrink.recipe.prune_steps import Finetune
from shrink.recipe.rules import check_order
from shrink.recipe.steps import parse_recipe, step_to_dict
from shrink.recipe.train_steps import QAT, Distill, EarlyExit, LoRA, LowRank


def test_yaml_spellings_parse_to_typed_steps(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("""
- lowrank: {energy: 0.9, finetune: {epochs: 1}}
- distill: {student: {layers: [4, 0, 2, 2]}, temperature: 4, alpha: 0.7, hidden_loss: cosine}
- lora: {rank: 4, alpha: 8, targets: q_proj, base_bits: 4}
- early_exit: {exits: [2, 1], threshold: 0.8}
- finetune: {epochs: 2, batch_size: 16, mixed_precision_training: {dtype: bf16}}
- qat: {bits: 4, group_size: 32, lsq: true, steps: 100}
""")
    lr, d, lo, ee, ft, q = parse_recipe(path)
    assert isinstance(lr, LowRank) and lr.energy == 0.9 and isinstance(lr.finetune, Finetune)
    assert lr.finetune.epochs == 1.0 and lr.finetune.steps is None and lr.needs_data
    assert isinstance(d, Distill) and d.student == {"layers": [0, 2, 4]} and d.temperature == 4.0
    assert isinstance(lo, LoRA) and lo.targets == ("q_proj",) and lo.base_bits == 4 and lo.merge
    assert isinstance(ee, EarlyExit) and ee.exits == (1, 2)
    assert ft.precision == "bf16" and ft.batch_size == 16 and ft.steps is None
    assert isinstance(q, QAT) and q.lsq and q.spec().group_size == 32
    again = parse_recipe([step_to_dict(s) for s in (lr, d, lo, ee, ft, q)])
    assert again == [lr, d, lo, ee, ft, q]


def test_defaults_a_practitioner_expects():
    assert Finetune().steps == 200 and Finetune(epochs=1).steps is None
    assert LowRank().energy == 0.9 and not LowRank().needs_data
    assert Distill().steps == 500 and Distill().alpha is None
    assert LoRA().rank == 8 and LoRA().alpha == 16.0


@pytest.mark.parametrize("recipe, message", [
    ([{"distill": {"temperature": 0}}], r"step 1 \(distill\): temperature must be a positive number"),
    ([{"distill": {"student": {"depth": 2}}}], r"student must be"),
    ([{"distill": {"student": {"width": 1.0}}}], r"width must be below 1"),
    ([{"lowrank": {"energy": 0.9, "rank": 4}}], r"give one of energy, rank or keep"),
    ([{"lowrank": {"rank": 0}}], r"rank must be a positive integer"),
    ([{"lora": {"base_bits": 8}}], r"base_bits must be 4"),
    ([{"finetune": {"steps": 10, "epochs": 1}}], r"give steps or epochs, not both"),
    ([{"finetune": {"mixed_precision_training": {"dtype": "fp8"}}}], r"precision must be one of"),
    ([{"finetune": {"precision": "fp16", "mixed_precision_training": {"dtype": "bf16"}}}], r"disagree"),
    ([{"qat": {"bits": 1}}], r"bits must be an integer in 2..8"),
    ([{"early_exit": {"threshold": 0}}], r"threshold must be a number in \(0, 1\]"),
    ([{"early_exit": {"exits": []}}], r"exits must be a non-empty list"),
])
def test_bad_training_steps_name_the_step_and_field(recipe, message):
    with pytest.raises(ValueError, match=message):
        parse_recipe(recipe)


def test_ordering_rules_place_the_new_stages():
    check_order(parse_recipe([{"lowrank": {}}, {"distill": {}}, {"rtn": {"bits": 8}}]))
    with pytest.raises(ValueError, match="distill"):
        check_order(parse_recipe([{"rtn": {"bits": 8}}, {"distill": {}}]))
    with pytest.raises(ValueError, match="lowrank"):
        check_order(parse_recipe([{"prune": {"method": "wanda", "sparsity": 0.5}}, {"lowrank": {}}]))
    # lora and early_exit may come anywhere (they are training, like finetune)
    check_order(parse_recipe([{"rtn": {"bits": 8}}, {"lora": {}}, {"early_exit": {}}]))


def test_every_builtin_recipe_round_trips_through_its_dict():
    from shrink.recipe.steps import BUILTIN

    for name, recipe in BUILTIN.items():
        assert parse_recipe([step_to_dict(s) for s in recipe]) == recipe, name
    # per channel (group_size null) must survive: it was once dropped and re-read as group 128
    assert step_to_dict(BUILTIN["int8"][0])["rtn"]["group_size"] is None
