"""Recipe ordering rules: coarse before fine, quantize-before-prune refused unless
forced, one quantizer per layer, and a fine-tune suggested after pruning."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn

from shrink.recipe import compress
from shrink.recipe.rules import check_order
from shrink.recipe.steps import GPTQ, RTN, parse_recipe


@dataclass(frozen=True)
class Prune:
    kind: ClassVar[str] = "prune"
    include: tuple | None = None
    exclude: tuple | None = None


@dataclass(frozen=True)
class Heads:
    kind: ClassVar[str] = "structured_prune"


@dataclass(frozen=True)
class Finetune:
    kind: ClassVar[str] = "finetune"


@dataclass(frozen=True)
class Distill:
    kind: ClassVar[str] = "distill"


def test_coarse_before_fine_passes_and_prune_asks_for_a_finetune():
    assert check_order([Heads(), Finetune(), Distill(), GPTQ()]) == []
    notes = check_order([Prune(), GPTQ()])
    assert len(notes) == 1 and "step 1 (prune)" in notes[0] and "finetune" in notes[0]
    assert check_order([Prune(), Distill(), RTN()]) == []  # distillation recovers too


def test_quantize_before_prune_is_refused_with_the_reason_unless_forced():
    with pytest.raises(ValueError, match=r"step 2 \(prune\) comes after step 1 \(gptq\).*quantize-before-prune"):
        check_order([GPTQ(), Prune()])
    with pytest.raises(ValueError, match=r"step 2 \(heads\).*coarser than distill"):
        check_order([Distill(), Heads()])
    notes = check_order([GPTQ(), Prune(), Finetune()], force=True)
    assert len(notes) == 1 and notes[0].startswith("forced: recipe step 2 (prune)")
    assert check_order([GPTQ(), Finetune()]) == []  # a fine-tune may follow anything (QAT-style)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))


def test_two_quantizers_need_disjoint_targets():
    with pytest.raises(ValueError, match=r"step 2 \(rtn\) would find no float layers.*include"):
        compress(_mlp(), [{"gptq": {}}, {"rtn": {"bits": 8}}], calibration=[torch.randn(8, 32)])
    res = compress(_mlp(), parse_recipe([{"rtn": {"bits": 8, "group_size": None, "include": ["0"]}},
                                         {"rtn": {"bits": 4, "group_size": 16}}]), measure_speed=False)
    assert [l.name for l in res.steps[0].layers] == ["0"] and [l.name for l in res.steps[1].layers] == ["2"]
    assert res.metrics["warnings"] == []


def test_cli_refuses_with_exit_2(tmp_path, capsys):
    from shrink.cli import main

    r = tmp_path / "r.yaml"
    r.write_text("- rtn: {bits: 4}\n- kmeans: {clusters: 16}\n")
    assert main(["compress", "digits-mlp", "--recipe", str(r), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "step 2 (kmeans) would find no float layers" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
