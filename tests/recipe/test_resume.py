"""Resume (issue 8): a run interrupted at any checkpoint — SIGKILL included — and resumed gives
the same model bytes and the same result (timings aside) as an uninterrupted run; a different
run's state is refused with exit 2."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import shrink.recipe.resume as resume_mod
from shrink.recipe import compress
from shrink.recipe.resume import Checkpointer, fingerprint, run_key
from shrink.recipe.steps import parse_recipe
from tests_support import strip_timings as strip, tiny_llama

RNG = random.Random(8)   # the kill points: seeded, no hypothesis


class Interrupted(BaseException):
    pass


def files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((d / "model").iterdir())}


def interrupt_at(monkeypatch, n: int, when: str = "after") -> None:
    """Raise Interrupted at the n-th checkpoint of a run (in-process stand-in for the SIGKILL hook)."""
    def hook(w: str) -> None:
        if w == when and resume_mod._events[0] == n:
            raise Interrupted(n)

    monkeypatch.setattr(resume_mod, "_test_kill", hook)


# ---------------------------------------------------------------- library: a Llama's blocks

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: threads only contend (the suite shares few CPUs)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def llama():
    model = tiny_llama()
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(2, 64, (4, 16), generator=g)} for _ in range(2)]
    return model, batches


def _run(model, batches, recipe, out: Path, resume: bool):
    resume_mod._events[0] = 0
    steps = parse_recipe(recipe)
    ck = Checkpointer(out, run_key("tiny-llama", model, steps, 0, batches=batches), base={"kind": "hf"},
                      resume=resume, warn=lambda msg: None)
    res = compress(model, steps, calibration=batches, measure_speed=False, checkpoint=ck)
    return res, ck


@pytest.mark.parametrize("recipe,every", [
    ([{"gptq": {"bits": 4, "group_size": 16}}], True),
    ([{"gptq": {"bits": 4, "group_size": 16, "true_sequential": True}}], True),   # one pass; float replay
    ([{"gptq": {"bits": 4, "group_size": 16, "true_sequential": True, "matmul_dtype": "bfloat16"}}], True),
    ([{"smoothquant": {"alpha": 0.5, "include": ["*.mlp.*"]}}, {"gptq": {"bits": 4, "group_size": 16}}], True),
    ([{"awq": {"bits": 4, "group_size": 16, "include": ["*.o_proj"]}}], False),   # slow: one random point
], ids=["gptq", "gptq-true-sequential", "gptq-one-pass-bf16", "smoothquant+gptq", "awq"])
def test_llama_interrupted_at_a_checkpoint_resumes_bit_exactly(llama, recipe, every, tmp_path, monkeypatch):
    """Interrupted after (or while writing) checkpoint n, for every n, and resumed: the same
    weights and records as the uninterrupted run."""
    model, batches = llama
    monkeypatch.setenv("SHRINK_CHECKPOINT_EVERY_S", "0")
    ref, _ = _run(model, batches, recipe, tmp_path / "ref", resume=False)
    ref_state = ref.model.state_dict()
    n_events = resume_mod._events[0]
    # one checkpoint per block of each sequential step (3 blocks), one after each step but the last
    assert n_events == 3 * len(recipe) + len(recipe) - 1
    for n in range(1, n_events + 1) if every else [RNG.randint(1, n_events)]:
        out = tmp_path / f"k{n}"
        interrupt_at(monkeypatch, n, RNG.choice(["after", "during"]))
        with pytest.raises(Interrupted):
            _run(model, batches, recipe, out, resume=False)
        monkeypatch.setattr(resume_mod, "_test_kill", lambda w: None)
        res, ck = _run(model, batches, recipe, out, resume=True)
        state = res.model.state_dict()
        assert state.keys() == ref_state.keys()
        assert all(torch.equal(state[k], ref_state[k]) for k in state), f"interrupted at checkpoint {n}"
        got, want = strip([r.to_dict() for r in res.steps]), strip([r.to_dict() for r in ref.steps])
        for g, w in zip(got, want):
            assert g.keys() == w.keys()
            for k in g:
                if k == "layers":
                    for lg, lw in zip(g[k], w[k]):
                        assert lg == lw, f"interrupted at checkpoint {n}"
                assert g[k] == w[k], (k, f"interrupted at checkpoint {n}")
        assert got == want


def test_resume_refuses_a_different_run_and_says_what_differs(llama, tmp_path, monkeypatch):
    model, batches = llama
    monkeypatch.setenv("SHRINK_CHECKPOINT_EVERY_S", "0")
    interrupt_at(monkeypatch, 1)
    with pytest.raises(Interrupted):
        _run(model, batches, [{"gptq": {"bits": 4, "group_size": 16}}], tmp_path, resume=False)
    with pytest.raises(ValueError, match=r"different run \(recipe_sha256: saved .*drop --resume"):
        _run(model, batches, [{"gptq": {"bits": 3, "group_size": 16}}], tmp_path, resume=True)
    other = tiny_llama(hidden_size=32, intermediate_size=40)
    assert fingerprint(other) != fingerprint(model)
    with pytest.raises(ValueError, match="model_sha256"):
        _run(other, batches, [{"gptq": {"bits": 4, "group_size": 16}}], tmp_path, resume=True)
    assert (tmp_path / ".resume" / "state.json").is_file()   # a refused resume leaves the state alone


# ---------------------------------------------------------------- the command, killed with SIGKILL

def _cli(out: Path, recipe: str, *extra: str, env: dict | None = None):
    e = {**os.environ, "HF_HUB_OFFLINE": "1", "SHRINK_CHECKPOINT_EVERY_S": "0", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "shrink", "compress", "digits-mlp", "--recipe", recipe,
                           "-o", str(out), *extra], capture_output=True, text=True, timeout=300, env=e)


def _assert_same(ref: Path, out: Path) -> None:
    assert files(out) == files(ref)
    a, b = (json.loads((d / "result.json").read_text()) for d in (ref, out))
    assert strip(a) == strip(b)
    assert not (out / ".resume").exists()   # removed once the run is complete


@pytest.mark.parametrize("recipe,events", [
    ("w4-gptq", 5),                        # one checkpoint per block of digits-mlp (5 children)
    ("ROUNDS", 11),                        # 3 pruning rounds, the step, 6 training steps, the step
], ids=["gptq-blocks", "prune-rounds+finetune"])
def test_kill_9_then_resume_gives_identical_bytes(recipe, events, tmp_path):
    gptq = recipe == "w4-gptq"
    if not gptq:
        path = tmp_path / "rounds.yaml"
        path.write_text("- iterative_prune: {target: 0.5, rounds: 3, storage: dense, finetune: {steps: 3}}\n"
                        "- finetune: {steps: 6, loss: ce}\n"
                        "- rtn: {bits: 8}\n")
        recipe = str(path)
    ref = tmp_path / "ref"
    r = _cli(ref, recipe)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "run"
    n = RNG.randint(1, events - 1)
    r = _cli(out, recipe, env={"SHRINK_TEST_KILL_AFTER": str(n)})
    assert r.returncode == -9, (n, r.stderr)
    assert (out / ".resume" / "state.json").is_file() and not (out / "model").exists()
    if gptq:
        # another run's --resume: exit 2, one line saying what differs; the state is left alone
        r = _cli(out, recipe, "--resume", "--seed", "1")
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and "seed: saved 0, now 1" in lines[0], r.stderr
        # killed again, in the middle of writing its next checkpoint: the one before stays usable
        r = _cli(out, recipe, "--resume", env={"SHRINK_TEST_KILL_DURING": "1"})
        assert r.returncode == -9, r.stderr
        assert any(p.name.startswith(".tmp-") for p in (out / ".resume").iterdir())
    r = _cli(out, recipe, "--resume")
    assert r.returncode == 0, (n, r.stderr)
    assert "resuming" in r.stderr, r.stderr
    _assert_same(ref, out)


def test_no_state_starts_from_the_beginning_and_a_fresh_run_discards_old_state(tmp_path):
    said = []
    key = {"seed": 0}
    Checkpointer(tmp_path, key, base={"kind": "hf"}, resume=True, warn=said.append)
    assert "no checkpoint" in said[-1] and "starting from the beginning" in said[-1]
    stale = tmp_path / ".resume" / "train-step1.pt"
    stale.write_bytes(b"an interrupted run's training")
    ck = Checkpointer(tmp_path, key, base={"kind": "hf"}, resume=False, warn=said.append)
    assert "starting over" in said[-1] and "--resume" in said[-1]
    assert not stale.exists() and ck.restore() is None   # nothing of the old run is used
    assert json.loads((tmp_path / ".resume" / "state.json").read_text())["key"] == key
