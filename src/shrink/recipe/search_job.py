"""`shrink search MODEL -o DIR` as a library call: screen every candidate recipe on a
proxy (a quarter of the calibration and held-out data), evaluate the promising ones
fully, time them one at a time, keep the Pareto front of size x quality x latency, and
leave DIR as compress does for the chosen recipe, plus the search's evidence.

DIR/trials/NAME/result.json keeps each fully evaluated trial's record."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from shrink.fsutil import fsync_file, replace_dir, temp_path_for

from .job import _jsonable
from .measure import four_ratios
from .search import Constraints, candidate_space, choose, closest, meets, objectives, pareto_front, shortlist
from .steps import parse_recipe, step_to_dict
from .trials import Runner, default_workers, write_tree

Progress = Callable[[str, int, int], None]


def search_job(model_ref: str, out_dir: str | Path, *, device: str | None = None, max_size: int | None = None,
               max_drop: float | None = None, min_quality: float | None = None, space: str = "default",
               recipes: list | None = None, full: int = 4, workers: int | None = None,
               cluster: str | None = None, seed: int = 0, progress: Progress | None = None) -> dict:
    t0 = time.perf_counter()
    if device is not None:
        from shrink.plan.devices import get_device

        get_device(device)
    if full < 1:
        raise ValueError(f"--full must be at least 1, got {full}")
    space_list = _space(recipes, space, calibrated=_calibrated(model_ref), labeled=not _calibrated(model_ref))  # a bad recipe fails first
    out = Path(out_dir)
    base_task = {"model": str(model_ref), "seed": seed, "device": device}
    tick = (lambda label: (lambda d, t: progress(label, d, t))) if progress else (lambda label: None)
    with Runner(workers or default_workers(), cluster) as runner:
        b_proxy, b_full = runner.map([{**base_task, "kind": "baseline", "stage": s} for s in ("proxy", "full")])
        for b in (b_proxy, b_full):
            if "error" in b:
                raise ValueError(f"{model_ref}: {b['error']}")
        base_q = b_full["baseline"].get("quality")
        if base_q is None:
            raise ValueError(f"{model_ref}: no quality metric for this model (no held-out data or tokenizer): "
                             "search needs one to compare candidates; use shrink compress with a recipe instead")
        higher = base_q.get("higher_is_better", True)
        room = b_full["weight_room"]
        if device is not None and room is not None and room <= 0:
            raise ValueError(f"{model_ref} on {device}: the KV cache and activations alone exceed the usable memory; "
                             "no recipe can fit: pick a larger device or a shorter context")
        budget = min([v for v in (max_size, room) if v is not None], default=None)
        cons = Constraints(max_size_bytes=budget, max_drop=max_drop, min_quality=min_quality, device=device)
        floor = cons.floor(base_q)

        proxy = runner.map([{**base_task, "kind": "trial", "stage": "proxy", "name": n, "recipe": r}
                            for n, r in space_list], tick("search: proxy trials"))
        cands = [_candidate(n, r, res) for (n, r), res in zip(space_list, proxy)]
        pq = b_proxy["baseline"]["quality"]["value"]
        loose = _loosen(floor, base_q["value"], pq, higher)
        short = shortlist([c for c in cands if "error" not in c], cons, loose, higher, full)
        trials = out / "trials"
        full_res = runner.map([{**base_task, "kind": "trial", "stage": "full", "name": c["name"],
                                "recipe": c["recipe"], "out_dir": str(trials / c["name"]),
                                "return_files": cluster is not None} for c in short],
                              tick("search: full evaluations"))
    for c, res in zip(short, full_res):
        if "files" in res:   # from a cluster node: its saved model, written here
            write_tree(res.pop("files"), trials / c["name"])
    for c, res in zip(short, full_res):
        c["proxy_quality"] = c["quality"]
        if "error" in res:
            c["error"], c["stage"] = res["error"], "full"
        else:
            c.update(stage="full", quality=res["quality"], size_bytes=res["size_bytes"], seconds=res["seconds"],
                     ran_on=res.get("ran_on"))
    fulls = [c for c in short if c["stage"] == "full" and "error" not in c]
    timing = Runner.here_one_at_a_time(
        [{**base_task, "kind": "latency", "stage": "full", "name": None}] +
        [{**base_task, "kind": "latency", "stage": "full", "name": c["name"],
          "path": str(trials / c["name"] / "model")} for c in fulls], tick("search: latency, one model at a time"))
    base_lat = timing[0]
    for c, t in zip(fulls, timing[1:]):
        c["latency_ms"] = t["latency"]["latency_ms"] if t.get("latency") else None
        c["_timing"] = t
    for c in cands:
        c.setdefault("latency_ms", None)
        c["feasible"] = "error" not in c and c["stage"] == "full" and meets(c, cons, floor, higher)
    flags3 = pareto_front([objectives(c, higher) for c in fulls])
    flags2 = pareto_front([objectives(c, higher, False) for c in fulls])
    for c, f3, f2 in zip(fulls, flags3, flags2):
        c["on_front"], c["on_front_size_quality"] = f3, f2
    for c in cands:
        c.setdefault("on_front", False)
        c.setdefault("on_front_size_quality", False)
    chosen = choose(fulls, cons, floor, higher)
    near = None if chosen is not None else closest(fulls or [c for c in cands if "error" not in c], cons, higher)
    doc = _result(model_ref, out, chosen, near, cands, cons, base_q, b_full["baseline"], base_lat, trials)
    doc["search"] = {"space": space if recipes is None else "given", "candidates": len(cands), "full": len(fulls),
                     "workers": runner.workers, "cluster": cluster, "seconds": time.perf_counter() - t0,
                     "proxy": "16 calibration samples, 4,096 held-out tokens (32 sentences for encoders)",
                     "rule": "with a quality floor: the smallest feasible; with only a size budget: the best quality "
                             "that fits", "proxy_quality_floor": loose}
    for c in cands:
        c.pop("_timing", None)
    _publish(out, _jsonable(doc), trials / chosen["name"] / "model" if chosen is not None else None)
    _drop_trial_models(trials)
    return _jsonable(doc)


def _publish(out: Path, doc: dict, model: Path | None) -> None:
    """Put DIR/result.json and DIR/model in place together: result.json is written to a
    temporary name first, then the chosen model directory replaces DIR/model (one atomic
    exchange), then result.json is renamed over the old one. A failure while writing (a full
    disk) leaves the previous run's files as they were. With no model chosen, a DIR/model
    left by an earlier search is removed after result.json says chosen: null."""
    data = (json.dumps(doc, indent=2, sort_keys=False) + "\n").encode()
    with temp_path_for(out / "result.json") as tmp:
        tmp.write_bytes(data)
        fsync_file(tmp)
        if model is not None:
            replace_dir(model, out / "model")
        os.replace(tmp, out / "result.json")
    if model is None and (out / "model").is_dir():
        shutil.rmtree(out / "model")


def _space(recipes, space: str, calibrated: bool, labeled: bool = False) -> list[tuple[str, list]]:
    if not recipes:
        return [(n, [step_to_dict(s) for s in parse_recipe(r)])
                for n, r in candidate_space(space, calibrated, labeled)]
    out, seen = [], set()
    for r in recipes:
        name = Path(str(r)).stem if str(r).endswith((".yaml", ".yml", ".json")) else str(r)
        if name in seen:
            raise ValueError(f"--recipe {r}: given twice")
        seen.add(name)
        out.append((name, [step_to_dict(s) for s in parse_recipe(r)]))
    return out


def _calibrated(model_ref: str) -> bool:
    """Calibration-based families need transformer blocks: not the digits classifiers (which
    have labeled training data instead: the training families, labeled=True)."""
    return str(model_ref) not in ("digits-mlp", "digits-cnn")


def _candidate(name: str, recipe: list, res: dict) -> dict:
    c = {"name": name, "recipe": recipe, "stage": "proxy"}
    if "error" in res:
        c.update(error=res["error"], size_bytes=None, quality=None)
    else:
        c.update(size_bytes=res["size_bytes"], quality=res["quality"], seconds=res["seconds"])
    return c


def _loosen(floor, q0_full, q0_proxy, higher) -> float | None:
    """The proxy floor: the same relative drop measured against the proxy's own baseline,
    with half again as much room (a quarter of the data is noisier)."""
    if floor is None:
        return None
    drop = (q0_full - floor) / q0_full if q0_full else 0.0
    return q0_proxy * (1 - 1.5 * drop)


def _result(model_ref, out: Path, chosen, near, cands, cons, base_q, baseline, base_lat, trials: Path) -> dict:
    head = {"model": str(model_ref), "constraints": cons.to_json(base_q), "candidates": cands, "chosen": chosen}
    if chosen is None:
        return {**head, "closest": near, "baseline": _with_timing(baseline, base_lat), "recipe": None, "steps": [],
                "note": _none_note(near, cons)}
    trial = trials / chosen["name"]
    run = json.loads((trial / "result.json").read_text(encoding="utf-8"))
    run["baseline"] = _with_timing(run["baseline"], base_lat)
    run["compressed"] = _with_timing(run["compressed"], chosen.get("_timing"))
    run["ratios"] = four_ratios(run["baseline"], run["compressed"])
    return {**run, **head}


def _with_timing(m: dict, t: dict | None) -> dict:
    if not t or not t.get("latency"):
        return m
    return {**m, "latency": t["latency"], "latency_ms": t["latency"]["latency_ms"], "energy": t["energy"]}


def _drop_trial_models(trials: Path) -> None:
    """Trial models are large; their result.json stays as the evidence."""
    if trials.is_dir():
        for d in trials.iterdir():
            if (d / "model").is_dir():
                shutil.rmtree(d / "model")


def _none_note(near, cons: Constraints) -> str:
    if near is None:
        return "no candidate could be evaluated (see each candidate's error)"
    where = []
    if not cons.fits(near["size_bytes"]):
        where.append(f"{near['size_bytes']:,} B is over the {cons.max_size_bytes:,} B budget")
    q = near.get("quality") or {}
    where.append(f"its {q.get('name', 'quality')} is {q.get('value')}")
    return f"no candidate met the constraints; closest: {near['name']} ({'; '.join(where)})"
