"""Checkpoints of a `shrink compress` run, `--resume`, and what makes a run reproducible.

DIR/.resume/ (removed when the run completes):
  state.json        {"format", "version", "key": the run key, "current": "c000004"}
  c000004/          the latest checkpoint, always complete: written under a temporary name,
                    renamed, and only then does state.json (replaced atomically) point at it
    model/          the working model (models/compressed.py save_compressed; reloads bit-exactly)
    tensors.safetensors   what the model files do not hold: pruning masks kept on dense layers,
                    an unfinished step's own state (the weights a lottery ticket rewinds to, ...)
    progress.json   the finished steps' records, and where the unfinished step stands
  train-step3.pt    the training engine's own checkpoint inside step 3 (train/engine.py)

A checkpoint is written after each finished step (not the last: the output follows), after
each block of gptq / awq / smoothquant, after each round of iterative_prune and
lottery_ticket; training steps checkpoint through the engine every TRAIN_EVERY steps. So that
checkpoints cost at most ~10% of the run, one is skipped while the time since the last is
under 9x what the last took to write (SHRINK_CHECKPOINT_EVERY_S=<seconds> sets a fixed
interval instead; 0 writes every one). Where the run stopped never changes its result: a
resumed step recomputes what it needs (a block's inputs by running the calibration through
the blocks already done) with the same operations on the same numbers.

The run key (model reference and a hash of its weights, recipe hash, seed, calibration and
evaluation sources and hashes, versions) is compared on --resume: a different run is refused
(exit 2). Without --resume an earlier run's state is discarded and the run starts over.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from shrink.fsutil import write_json_atomic

from .records import StepRecord

STATE_DIR = ".resume"
FORMAT, VERSION = "shrink-resume", 1
TRAIN_EVERY = 100
PRUNE_MASK = "shrink_prune_mask"


# ---------------------------------------------------------------- what a run is

def canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)


def recipe_hash(steps: list) -> str:
    """sha256 of the canonical JSON of the parsed recipe (every option, defaults included)."""
    from .steps import step_to_dict

    return hashlib.sha256(canonical([step_to_dict(s) for s in steps]).encode()).hexdigest()


def versions() -> dict:
    """The versions a result depends on."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("shrink", "torch", "transformers", "safetensors", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            mod = sys.modules.get(name)
            out[name] = getattr(mod, "__version__", None)
    return out


def _update(h, obj) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        h.update(b"D")
        for k in sorted(obj, key=str):
            h.update(str(k).encode())
            _update(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for v in obj:
            _update(h, v)
    else:
        h.update(repr(obj).encode())


def fingerprint(obj) -> str | None:
    """sha256 of a model's state (names, dtypes, shapes, bytes) or of data batches."""
    if obj is None:
        return None
    h = hashlib.sha256()
    _update(h, obj.state_dict() if isinstance(obj, nn.Module) else obj)
    return h.hexdigest()


def file_hash(path: str | None) -> str | None:
    if path is None or not Path(path).is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run_key(model_ref: str, model: nn.Module, steps: list, seed: int, *, batches=None, train=None,
            calib: str | None = None, eval_source: str | None = None) -> dict:
    v = versions()
    return {"model": str(model_ref), "model_sha256": fingerprint(model), "recipe_sha256": recipe_hash(steps),
            "seed": seed, "calib": calib, "calibration_sha256": fingerprint(batches),
            "train_sha256": fingerprint(train), "eval_source": eval_source, "eval_sha256": file_hash(eval_source),
            "versions": {k: v[k] for k in ("shrink", "torch", "transformers", "safetensors")}}


# ---------------------------------------------------------------- test hook

_events = [0]


def _test_kill(when: str) -> None:
    """SHRINK_TEST_KILL_AFTER=N: SIGKILL this process right after its N-th checkpoint;
    SHRINK_TEST_KILL_DURING=N: in the middle of writing its N-th (tests only)."""
    var = "SHRINK_TEST_KILL_AFTER" if when == "after" else "SHRINK_TEST_KILL_DURING"
    n = os.environ.get(var)
    if n and int(n) == _events[0]:
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------- checkpoints

@dataclass
class Partial:
    """Where an unfinished step stood at its last checkpoint."""
    step: int
    pos: dict                     # the step's own position (block, round, counters)
    layers: list                  # its LayerRecords so far
    skipped: list                 # rec.skipped as it was before the step's runner started
    details: dict
    finished: list                # names of the targets it has processed (its runner is not given them again)
    tensors: dict                 # the step's own tensors


@dataclass
class Restored:
    steps_done: int
    model: nn.Module
    records: list
    partial: Partial | None


class Checkpointer:
    """The checkpoints of one run in DIR/.resume (see the module docstring)."""

    def __init__(self, out_dir: str | Path, key: dict, *, base: dict, resume: bool,
                 warn: Callable[[str], None] | None = None):
        self.root = Path(out_dir) / STATE_DIR
        self.key, self.base = key, base
        self.warn = warn or (lambda msg: None)   # the CLI passes a printer; the library says nothing
        env = os.environ.get("SHRINK_CHECKPOINT_EVERY_S")
        self.every_s = float(env) if env not in (None, "") else None
        self.train_every = 1 if self.every_s == 0 else TRAIN_EVERY
        self.current: str | None = None
        self.resuming = False      # a state of this run was found (--resume)
        self.steps_done = 0
        self._last_end, self._last_cost = time.monotonic(), 0.0
        state = self._read_state(resume)
        if resume and state is not None:
            saved = state.get("key") or {}
            diffs = [k for k in sorted(set(key) | set(saved)) if saved.get(k) != key.get(k)]
            if diffs:
                what = "; ".join(f"{k}: saved {_short(saved.get(k))}, now {_short(key.get(k))}" for k in diffs)
                raise ValueError(f"--resume: {self.root} is the checkpoint of a different run ({what}); give the "
                                 "same model, recipe, seed and data as the interrupted run, or drop --resume to "
                                 "start over")
            self.current, self.resuming = state.get("current"), True
            return
        if resume:
            self.warn(f"shrink compress: --resume: no checkpoint in {self.root}; starting from the beginning")
        elif self.root.exists():
            self.warn(f"shrink compress: {self.root} holds an interrupted run's checkpoint; starting over "
                      "(pass --resume to continue it instead)")
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True)   # the key first: no file in here is ever of an unknown run
        self._write_state()

    def _write_state(self) -> None:
        write_json_atomic(self.root / "state.json", {"format": FORMAT, "version": VERSION, "key": self.key,
                                                     "current": self.current})

    def _read_state(self, resume: bool) -> dict | None:
        path = self.root / "state.json"
        if not path.is_file():
            return None
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
            if state.get("format") != FORMAT or state.get("version") != VERSION:
                raise ValueError(f"format {state.get('format')!r} v{state.get('version')!r}")
        except (OSError, ValueError) as e:
            if resume:
                raise ValueError(f"--resume: cannot read {path} ({e}); drop --resume to start over") from None
            return None
        return state

    # ---------------------------------------------------------- reading

    def restore(self) -> Restored | None:
        """The latest checkpoint's model, finished step records and unfinished step, or None."""
        if not self.resuming:
            return None
        if self.current is None:
            found = sorted(self.root.glob("train-step*.pt"))
            what = (f"step {found[0].name[10:-3]}'s training from its checkpoint" if found
                    else "no checkpoint was written yet: starting from the beginning")
            self.warn(f"shrink compress: resuming in {self.root}: {what}")
            return None
        from safetensors.torch import load_file

        from shrink.models.io import load

        where = self.root / self.current
        try:
            prog = json.loads((where / "progress.json").read_text(encoding="utf-8"))
            model = load(where / "model")
            tensors = load_file(str(where / "tensors.safetensors")) if (where / "tensors.safetensors").is_file() else {}
        except (OSError, ValueError) as e:
            raise ValueError(f"--resume: cannot read the checkpoint {where} ({e}); drop --resume to start over") \
                from None
        named = dict(model.named_modules())
        for k, v in tensors.items():
            if k.startswith("prune_mask/"):
                setattr(named[k.removeprefix("prune_mask/")], PRUNE_MASK, v)
        self.steps_done = int(prog["steps_done"])
        records = [StepRecord.from_dict(r) for r in prog["records"]]
        p = prog.get("partial")
        partial = None
        if p is not None:
            from .records import LayerRecord

            own = {k.removeprefix("step/"): v for k, v in tensors.items() if k.startswith("step/")}
            partial = Partial(step=int(p["step"]), pos=p["pos"], layers=[LayerRecord.from_dict(x) for x in p["layers"]],
                              skipped=p["skipped"], details=p["details"], finished=p["finished"], tensors=own)
        at = (f"step {partial.step} from {_pos(partial.pos)}" if partial else f"after step {self.steps_done}")
        if partial is None and self.train_file(self.steps_done + 1).is_file():
            at += f", step {self.steps_done + 1}'s training from its own checkpoint"
        self.warn(f"shrink compress: resuming {at} (checkpoint {where})")
        return Restored(self.steps_done, model.eval(), records, partial)

    # ---------------------------------------------------------- writing

    def due(self) -> bool:
        since = time.monotonic() - self._last_end
        return since >= (self.every_s if self.every_s is not None else 9 * self._last_cost)

    def commit(self, model: nn.Module, records: list, steps_done: int, partial: dict | None = None,
               tensors: dict | None = None) -> None:
        """Write a checkpoint; the previous one stays valid until this one is complete."""
        from safetensors.torch import save_file

        from shrink.models.compressed import save_compressed

        t0 = time.monotonic()
        self.root.mkdir(parents=True, exist_ok=True)
        seq = int(self.current[1:]) + 1 if self.current else 1
        name = f"c{seq:06d}"
        tmp = self.root / f".tmp-{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_compressed(model, tmp / "model", base=self.base, extra={"checkpoint": True})
        own = {f"prune_mask/{n}": getattr(m, PRUNE_MASK).detach().contiguous() for n, m in model.named_modules()
               if isinstance(getattr(m, PRUNE_MASK, None), torch.Tensor)}
        own.update({f"step/{k}": v.detach().clone().contiguous() for k, v in (tensors or {}).items()})
        if own:
            save_file(own, str(tmp / "tensors.safetensors"))
        write_json_atomic(tmp / "progress.json", {"steps_done": steps_done,
                                                  "records": [r.to_dict() for r in records], "partial": partial})
        _fsync_tree(tmp)   # on disk before the rename makes it the checkpoint (a power cut, not only a kill)
        _events[0] += 1
        _test_kill("during")
        os.replace(tmp, self.root / name)
        self.current, self.steps_done = name, steps_done
        self._write_state()
        self._cleanup()
        self._last_end = time.monotonic()
        self._last_cost = self._last_end - t0
        _test_kill("after")

    def _cleanup(self) -> None:
        keep = {"state.json", self.current}
        for p in self.root.iterdir():
            if p.name in keep:
                continue
            if p.name.startswith("train-step") and int(p.name[10:].split(".")[0]) > self.steps_done:
                continue   # the engine's checkpoint of the step in progress
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)

    def train_file(self, step: int) -> Path:
        return self.root / f"train-step{step}.pt"

    def train_event(self, done: int, total: int) -> None:
        """The engine wrote a checkpoint at this training step (for the test hook's count)."""
        if done % self.train_every == 0 or done == total:
            _events[0] += 1
            _test_kill("after")

    def finish(self) -> None:
        """The run is complete and written: its checkpoints go."""
        shutil.rmtree(self.root, ignore_errors=True)

    def abandon(self) -> None:
        """The run failed: its state stays if there is anything to resume, else it goes."""
        if self.current is None and not any(self.root.glob("train-step*.pt")):
            shutil.rmtree(self.root, ignore_errors=True)


class StepCheckpoint:
    """What one step's runner sees: where it resumes (`resumed`), save(), and the training file."""

    def __init__(self, ck: Checkpointer, index: int, records: list, rec: StepRecord,
                 get_model: Callable[[], nn.Module], resumed: Partial | None):
        self.ck, self.index, self.records, self.rec = ck, index, records, rec
        self.get_model, self.resumed = get_model, resumed
        self.skipped = [dict(s) for s in rec.skipped]   # before the runner adds its own

    def save(self, pos: dict, *, finished: list | None = None, tensors: dict | None = None,
             force: bool = False) -> None:
        if not (force or self.ck.due()):
            return
        self.ck.commit(self.get_model(), self.records, self.index - 1,
                       partial={"step": self.index, "pos": pos, "layers": [x.to_dict() for x in self.rec.layers],
                                "skipped": self.skipped, "details": self.rec.details, "finished": finished or []},
                       tensors=tensors)

    def training(self) -> tuple[str, int, Callable[[int, int], None]]:
        """(checkpoint file, steps between checkpoints, per-step hook) for the training engine."""
        return str(self.ck.train_file(self.index)), self.ck.train_every, self.ck.train_event


def restore_partial(rec: StepRecord, partial: Partial) -> None:
    rec.layers, rec.skipped, rec.details = list(partial.layers), list(partial.skipped), dict(partial.details)


def scrub(obj: Any) -> Any:
    """A record without the engine's resumed_from (where a resume picked training up is not
    part of the result: a resumed run's result.json equals an uninterrupted one's)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "resumed_from":
                obj[k] = None
            else:
                scrub(v)
    elif isinstance(obj, list):
        for v in obj:
            scrub(v)
    return obj


def step_seed(seed: int, index: int) -> None:
    """The global generator at the start of step `index` depends on the seed and the index only,
    not on what ran before (a resumed run skips the steps before)."""
    torch.manual_seed(seed * 1000 + index)


def _fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*"), reverse=True) + [root]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _short(v) -> str:
    s = canonical(v) if not isinstance(v, str) else v
    return s[:16] + "..." if isinstance(v, str) and len(v) == 64 else s


def _pos(pos: dict) -> str:
    if "block" in pos:
        return f"block {pos['block']}"
    return f"after round {pos['round']}" if "round" in pos else "its last checkpoint"


def block_hooks(sc: StepCheckpoint | None, runner, done: list,
                extra: Callable[[], dict] | None = None) -> tuple[int, Callable[[int], None] | None]:
    """(first block to process, after_block callback) for a sequential step (runner:
    surgery.SequentialRunner); done[0] (layers finished) is restored on a resume.
    extra(): more JSON the checkpoint keeps beside the position (sc.resumed.pos on a resume)."""
    if sc is None:
        return 0, None
    start, before = 0, []
    if sc.resumed is not None:
        start, done[0] = int(sc.resumed.pos["block"]), int(sc.resumed.pos["done"])
        before = list(sc.resumed.finished)

    def after(i: int) -> None:
        finished = before + [t.name for ts in runner.block_targets[:i + 1] for t in ts]
        sc.save({"block": i + 1, "done": done[0], **(extra() if extra is not None else {})}, finished=finished)

    return start, after
