"""Reproducibility (issue 8): the same inputs, recipe and seed give byte-identical model files
and the same result (timings aside); the manifest and result.json record the versions, the
seed and the recipe hash."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch

from shrink.recipe.job import run_job
from shrink.recipe.steps import parse_recipe, step_to_dict
from tests_support import strip_timings as strip

RECIPE = [{"prune": {"method": "wanda", "sparsity": 0.5}},
          {"finetune": {"steps": 4, "loss": "ce"}},
          {"gptq": {"bits": 4, "group_size": 32}}]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny matrices: threads only contend on a shared machine
    try:
        dirs = [tmp_path_factory.mktemp(f"run{i}") for i in range(2)]
        for d in dirs:
            run_job("digits-mlp", RECIPE, d, seed=3)
    finally:
        torch.set_num_threads(n)
    return dirs


def test_two_runs_give_identical_bytes_and_metrics(two_runs):
    a, b = two_runs
    names = sorted(p.name for p in (a / "model").iterdir())
    assert names == ["manifest.json", "model.safetensors"]
    for name in names:
        assert (a / "model" / name).read_bytes() == (b / "model" / name).read_bytes(), name
    ra, rb = (json.loads((d / "result.json").read_text()) for d in (a, b))
    assert strip(ra) == strip(rb)
    assert ra["compressed"]["quality"] == rb["compressed"]["quality"]
    assert not (a / ".resume").exists()


def test_manifest_and_result_record_versions_seed_and_recipe_hash(two_runs):
    import numpy
    import safetensors
    import transformers

    canonical = json.dumps([step_to_dict(s) for s in parse_recipe(RECIPE)], sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    manifest = json.loads((two_runs[0] / "model" / "manifest.json").read_text())
    result = json.loads((two_runs[0] / "result.json").read_text())
    for doc in (manifest, result):
        assert doc["seed"] == 3
        assert doc["recipe_sha256"] == digest
        v = doc["versions"]
        assert v["torch"] == torch.__version__.split("+")[0] or v["torch"] == torch.__version__
        assert v["transformers"] == transformers.__version__ and v["numpy"] == numpy.__version__
        assert v["safetensors"] == safetensors.__version__
        assert v["shrink"] and v["python"].count(".") == 2


def test_the_recipe_hash_depends_on_every_option_not_on_spelling():
    from shrink.recipe.resume import recipe_hash

    explicit = [{"gptq": {"bits": 4, "group_size": 128, "block_size": 128}}]
    assert recipe_hash(parse_recipe("w4-gptq")) == recipe_hash(parse_recipe([{"gptq": {"bits": 4}}]))
    assert recipe_hash(parse_recipe(explicit)) == recipe_hash(parse_recipe([{"gptq": {"bits": 4}}]))
    assert recipe_hash(parse_recipe([{"gptq": {"bits": 3}}])) != recipe_hash(parse_recipe("w4-gptq"))
