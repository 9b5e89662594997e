"""`shrink search --cluster ADDRESS`: the trials run as Ray tasks on a real (local, one-node)
Ray cluster started with `ray start`, and their saved models come back to the driver."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from shrink.recipe.search_job import search_job  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    ray_cli = Path(sys.executable).with_name("ray")
    port = _free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    temp = tmp_path_factory.mktemp("ray")
    start = [str(ray_cli), "start", "--head", f"--port={port}", "--num-cpus=2", "--object-store-memory=100000000",
             "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"]
    r = subprocess.run(start, env=env, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        pytest.fail(f"ray start failed: {r.stderr[-2000:]}")
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([str(ray_cli), "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def test_trials_run_on_the_cluster_and_models_come_back(cluster, tmp_path):
    out = tmp_path / "s"
    doc = search_job("digits-mlp", out, max_drop=2.0, space="small", cluster=cluster)
    assert doc["search"]["cluster"] == cluster
    fulls = [c for c in doc["candidates"] if c.get("stage") == "full" and "error" not in c]
    assert fulls, doc["candidates"]
    for c in fulls:
        assert c["ran_on"].startswith("ray:"), c["ran_on"]   # a Ray task, not a local process
        assert c["latency_ms"] is not None, c                 # timed here, from the model files sent back
        rec = json.loads((out / "trials" / c["name"] / "result.json").read_text())
        assert rec["compressed"]["size_bytes"] == c["size_bytes"]
    chosen = doc["chosen"]
    assert chosen is not None and chosen["name"] in {c["name"] for c in fulls}
    import shrink

    model = shrink.load(str(out))                             # the chosen model, written on this side
    assert sum(b.numel() for b in model.state_dict().values()) > 0
    assert json.loads((out / "model" / "manifest.json").read_text())["recipe"] == chosen["recipe"]


def test_cluster_results_equal_local_ones(cluster, tmp_path):
    """The same search on the cluster and in local processes measures the same sizes and quality."""
    far = search_job("digits-mlp", tmp_path / "r", max_drop=2.0, space="small", cluster=cluster)
    near = search_job("digits-mlp", tmp_path / "l", max_drop=2.0, space="small", workers=2)
    key = lambda d: {c["name"]: (c["size_bytes"], (c.get("quality") or {}).get("value")) for c in d["candidates"]}  # noqa: E731
    assert key(far) == key(near)
    assert far["chosen"]["name"] == near["chosen"]["name"]
    assert all(c["ran_on"].startswith("process:") for c in near["candidates"] if c.get("ran_on"))


def test_unreachable_cluster_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no Ray cluster answers there") as e:
        search_job("digits-mlp", tmp_path / "x", max_drop=2.0, space="small", cluster=f"127.0.0.1:{_free_port()}")
    assert "127.0.0.1" in str(e.value)
