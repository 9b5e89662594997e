"""shrink search: the Pareto front, the constraints and the choice, on the real digits
classifier (data-free families) and in unit form against brute force."""
from __future__ import annotations

import json
import random

import pytest
import torch

from shrink.recipe.search import Constraints, candidate_space, choose, pareto_front
from shrink.recipe.search_job import search_job


def _dominates(a, b):
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def test_pareto_front_matches_brute_force():
    rng = random.Random(0)
    for _ in range(200):
        n, d = rng.randint(1, 12), rng.randint(1, 3)
        pts = [tuple(rng.choice([0.0, 1.0, 2.0, 3.0]) for _ in range(d)) for _ in range(n)]
        flags = pareto_front(pts)
        for i, p in enumerate(pts):
            assert flags[i] == (not any(_dominates(q, p) for q in pts))


def test_floor_follows_the_metrics_direction():
    cons = Constraints(max_drop=2.0)
    assert cons.floor({"value": 0.9, "higher_is_better": True}) == pytest.approx(0.882)
    assert cons.floor({"value": 100.0, "higher_is_better": False}) == pytest.approx(102.0)
    both = Constraints(max_drop=2.0, min_quality=0.89)
    assert both.floor({"value": 0.9, "higher_is_better": True}) == 0.89  # the tighter bound
    with pytest.raises(ValueError, match="max-drop"):
        Constraints(max_drop=150)


def test_choice_rule():
    c = lambda n, s, q, lat=1.0: {"name": n, "size_bytes": s, "quality": {"value": q}, "latency_ms": lat}  # noqa: E731
    cands = [c("a", 100, 0.95), c("b", 50, 0.90), c("c", 30, 0.80), c("d", 50, 0.93)]
    floor = Constraints(max_drop=10).floor({"value": 1.0})
    assert choose(cands, Constraints(max_drop=10), floor, True)["name"] == "d"      # smallest meeting 0.9, then quality
    assert choose(cands, Constraints(max_size_bytes=60), None, True)["name"] == "d"  # best quality that fits
    assert choose(cands, Constraints(max_size_bytes=10), None, True) is None
    with pytest.raises(ValueError, match="space"):
        candidate_space("huge")


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    out = tmp_path_factory.mktemp("search")
    doc = search_job("digits-mlp", out, max_drop=1.0, workers=1, full=3)
    return out, doc


def test_front_is_non_dominated_and_the_choice_meets_the_constraints(searched):
    out, doc = searched
    on_disk = json.loads((out / "result.json").read_text())
    assert on_disk["chosen"] == doc["chosen"] and len(on_disk["candidates"]) == len(candidate_space("default", False, labeled=True))
    higher = doc["constraints"]["higher_is_better"]
    full = [c for c in doc["candidates"] if c["stage"] == "full" and not c.get("error")]
    assert 1 <= len(full) <= 3
    obj = [(c["size_bytes"], -c["quality"]["value"] if higher else c["quality"]["value"], c["latency_ms"]) for c in full]
    for c, o in zip(full, obj):
        dominated = any(_dominates(p, o) for p in obj)
        assert c["on_front"] == (not dominated)
    assert not any(c["on_front"] for c in doc["candidates"] if c["stage"] == "proxy")
    chosen = doc["chosen"]
    floor = doc["constraints"]["quality_floor"]
    assert floor == pytest.approx(doc["baseline"]["quality"]["value"] * 0.99)
    assert chosen["feasible"] and chosen["quality"]["value"] >= floor
    # the rule: no feasible candidate is smaller
    assert all(c["size_bytes"] >= chosen["size_bytes"] for c in full if c["feasible"])
    assert doc["compressed"]["size_bytes"] == chosen["size_bytes"]
    assert doc["recipe"] == chosen["recipe"]


def test_saved_model_is_the_chosen_one(searched):
    import shrink
    from shrink.models.digits import digits_data
    from shrink.recipe.records import model_nbytes

    out, doc = searched
    model = shrink.load(out)
    assert model_nbytes(model) == doc["chosen"]["size_bytes"]
    split = digits_data()
    with torch.no_grad():
        acc = float((model(split.x_test).argmax(-1) == split.y_test).float().mean())
    assert acc == pytest.approx(doc["chosen"]["quality"]["value"], abs=1e-9)
    # trial models are removed, their records kept
    trials = sorted(p.name for p in (out / "trials").iterdir())
    assert trials and all(not (out / "trials" / t / "model").exists() for t in trials)
    assert all((out / "trials" / t / "result.json").is_file() for t in trials)


def test_nothing_feasible_says_so_and_names_the_closest(tmp_path):
    doc = search_job("digits-mlp", tmp_path, max_size=1000, workers=1, space="small", full=2)
    assert doc["chosen"] is None and not (tmp_path / "model").exists()
    smallest = min((c for c in doc["candidates"] if c["stage"] == "full"), key=lambda c: c["size_bytes"])
    assert doc["closest"]["name"] == smallest["name"]
    assert "no candidate met the constraints" in doc["note"] and smallest["name"] in doc["note"]
    assert json.loads((tmp_path / "result.json").read_text())["chosen"] is None


def test_process_pool_gives_the_same_measurements(tmp_path):
    one = search_job("digits-mlp", tmp_path / "a", max_drop=5, recipes=["int8", "kmeans16"], workers=1, full=2)
    two = search_job("digits-mlp", tmp_path / "b", max_drop=5, recipes=["int8", "kmeans16"], workers=2, full=2)
    assert two["search"]["workers"] == 2
    for a, b in zip(one["candidates"], two["candidates"]):
        assert (a["name"], a["size_bytes"], a["quality"]["value"]) == (b["name"], b["size_bytes"], b["quality"]["value"])


def test_cli_bad_input(tmp_path, capsys):
    from shrink.cli import main

    assert main(["search", "digits-mlp", "-o", str(tmp_path)]) == 2
    assert "give a target" in capsys.readouterr().err
    assert main(["search", "digits-mlp", "--max-drop", "abc", "-o", str(tmp_path)]) == 2
    assert "--max-drop" in capsys.readouterr().err
    assert main(["search", "digits-mlp", "--max-drop", "1", "--recipe", "w9-magic", "-o", str(tmp_path)]) == 2
    assert "unknown recipe" in capsys.readouterr().err
    assert main(["search", "digits-mlp", "--device", "toaster", "-o", str(tmp_path)]) == 2
    assert "toaster" in capsys.readouterr().err
