"""Running search trials: in this process, in a pool of processes (the default), or on
a Ray cluster. A worker prepares the model, its calibration data and metric once per
(model, stage) and reuses them for every trial it runs.

Tasks are plain dicts (picklable, and the same over Ray):
  {"kind": "baseline" | "trial" | "latency", "model": ref, "stage": "proxy" | "full",
   "seed": int, "device": name | None, "name": str, "recipe": [one-key dicts],
   "out_dir": path | None, "path": a saved model dir (latency), "threads": int | None,
   "return_files": bool (on a cluster: the saved model comes back as {relative path: bytes},
   since the node's disk is not the driver's)}
"""
from __future__ import annotations

import multiprocessing
import os
import shutil
import socket
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Callable, Iterable

import torch

from shrink.fsutil import replace_dir

_CACHE: dict = {}


def run_task(task: dict) -> dict:
    """One unit of search work; errors a user can act on come back as {"error": message}."""
    if task.get("threads"):
        torch.set_num_threads(int(task["threads"]))
    if multiprocessing.parent_process() is not None:  # a worker of ours: its loads draw no progress bars
        quiet_model_loading()
    try:
        return _run(task)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        return {"name": task.get("name"), "stage": task.get("stage"), "error": f"{type(e).__name__}: {e}"}


def quiet_model_loading() -> None:
    try:
        from transformers.utils import logging

        logging.disable_progress_bar()
    except ImportError:
        pass


def _prepared(task: dict):
    from .job import prepare
    from .measure import measure

    proxy = task["stage"] == "proxy"
    key = (task["model"], proxy, task["seed"])
    if key not in _CACHE:
        from shrink.eval.latency import latency_probe

        _CACHE.clear()  # one model at a time per worker
        torch.manual_seed(task["seed"])
        prepared = prepare(task["model"], seed=task["seed"], proxy=proxy)
        model, batches, metric, _, _ = prepared
        probe = latency_probe(batches[0]) if batches else None
        _CACHE[key] = (prepared, measure(model, metric, None), probe)
    return _CACHE[key]


def _run(task: dict) -> dict:
    from .figures import plan_for, weight_room
    from .job import run_prepared
    from .steps import parse_recipe

    prepared, base, probe = _prepared(task)
    kind = task["kind"]
    if kind == "baseline":
        plan = plan_for(prepared[0], base["params"], task.get("device"))
        return {"baseline": base, "weight_room": weight_room(plan)}
    if kind == "latency":
        from shrink.eval.energy import energy_estimate
        from shrink.eval.latency import latency_metric
        from shrink.models.io import load

        if probe is None:
            return {"name": task.get("name"), "latency": None}
        model = prepared[0] if task.get("path") is None else load(task["path"])
        lat = latency_metric(model, probe)
        return {"name": task.get("name"), "latency": lat, "energy": energy_estimate(model, probe["batch1"])}
    t0 = time.perf_counter()
    out_dir = task.get("out_dir")
    scratch = tempfile.mkdtemp(prefix="shrink-trial-") if out_dir and task.get("return_files") else None
    try:
        doc = run_prepared(prepared, task["model"], parse_recipe(task["recipe"]), scratch or out_dir,
                           seed=task["seed"], device=task.get("device"), measure_speed=False, baseline=base)
        files = _read_tree(Path(scratch)) if scratch else None
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    c = doc["compressed"]
    res = {"name": task["name"], "stage": task["stage"], "size_bytes": c["size_bytes"], "params": c["params"],
           "quality": c.get("quality"), "seconds": time.perf_counter() - t0, "ran_on": _where()}
    if files is not None:
        res["files"] = files
    return res


def _where() -> str:
    """Where a trial ran: 'ray:<node id>' in a Ray worker, else 'process:<host>:<pid>'."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        try:
            return f"ray:{ray.get_runtime_context().get_node_id()}"
        except Exception:  # noqa: BLE001 - a driver process, not a worker
            pass
    return f"process:{socket.gethostname()}:{os.getpid()}"


def _read_tree(root: Path) -> dict[str, bytes]:
    """Every file under root by its relative path: a trial's saved model travels back this way
    from a cluster node, whose disk the driver cannot read."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def write_tree(files: dict[str, bytes], root: str | Path) -> None:
    """Write what _read_tree read under `root` (a directory put in place whole)."""
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        for rel, data in files.items():
            target = (tmp / rel).resolve()
            if tmp.resolve() not in target.parents:
                raise ValueError(f"a trial returned the file {rel!r}, outside its directory")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        replace_dir(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class Runner:
    """Runs tasks with `workers` processes (1: in this process) or on a Ray cluster."""

    def __init__(self, workers: int = 1, cluster: str | None = None):
        self.workers, self.cluster = max(1, int(workers)), cluster
        self._pool = None
        self._ray = None
        if cluster is not None:
            try:
                import ray
            except ImportError:
                raise ValueError("--cluster needs Ray, an optional extra: pip install 'shrink[cluster]' "
                                 "(or drop --cluster to run trials in local processes)") from None
            _check_reachable(cluster)
            ray.init(address=cluster, ignore_reinit_error=True, log_to_driver=False)
            self._ray = ray
            self._remote = ray.remote(run_task)
        elif self.workers > 1:
            threads = max(1, torch.get_num_threads() // self.workers)
            self._threads = threads
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))

    def map(self, tasks: Iterable[dict], on_done: Callable[[int, int], None] | None = None) -> list[dict]:
        """Results in the order of `tasks`."""
        tasks = list(tasks)
        results: list = [None] * len(tasks)
        if self._ray is not None:
            refs = {self._remote.remote(t): i for i, t in enumerate(tasks)}
            pending = list(refs)
            while pending:
                ready, pending = self._ray.wait(pending, num_returns=1)
                results[refs[ready[0]]] = self._ray.get(ready[0])
                on_done and on_done(len(tasks) - len(pending), len(tasks))
            return results
        if self._pool is None:
            for i, t in enumerate(tasks):
                results[i] = run_task(t)
                on_done and on_done(i + 1, len(tasks))
            return results
        futs = {self._pool.submit(run_task, {**t, "threads": self._threads}): i for i, t in enumerate(tasks)}
        pending = set(futs)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                results[futs[f]] = f.result()
            on_done and on_done(len(tasks) - len(pending), len(tasks))
        return results

    @staticmethod
    def here_one_at_a_time(tasks: Iterable[dict], on_done=None) -> list[dict]:
        """Tasks run in this process, alone, with all its threads: latency timings must not
        share the CPU with other trials, and are taken on this machine even with a cluster."""
        tasks = list(tasks)
        out = []
        for i, t in enumerate(tasks):
            out.append(run_task(t))
            on_done and on_done(i + 1, len(tasks))
        return out

    def close(self) -> None:
        if self._ray is not None:
            self._ray.shutdown()   # disconnects this driver; the cluster keeps running
            self._ray = None
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A HOST:PORT (or ray://HOST:PORT) nobody answers on fails now, in one line, instead of
    after Ray's own minutes of retries. Other forms ('auto', 'local') go to Ray as they are."""
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise ValueError(f"--cluster {address}: no Ray cluster answers there ({e.strerror or e}); start one with "
                         "`ray start --head` on that machine and pass the address it prints, or drop --cluster "
                         "to run trials in local processes") from None


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))
