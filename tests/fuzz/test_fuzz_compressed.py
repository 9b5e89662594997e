"""Fuzz load_compressed on a real compressed directory (a tiny Llama compressed by shrink
with int8 RTN and w4 RTN, saved by save_compressed): model.safetensors' bytes (header
first), manifest.json's bytes and its values. Every input loads or is refused with a
one-line ValueError / FileNotFoundError naming the directory's file; never another
exception, a hang, or memory sized by a number in the manifest."""
from __future__ import annotations

import json
import shutil
import struct

import pytest

pytest.importorskip("hypothesis")
pytest.importorskip("transformers")

from fuzz_support import HUGE, build_compressed_dir, fuzz_settings, mutate, mutations, outcome  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from shrink.models.compressed import load_compressed  # noqa: E402


@pytest.fixture(scope="module")
def compressed_dir(tmp_path_factory):
    return build_compressed_dir(tmp_path_factory.mktemp("c") / "m")


def _fresh(src, tmp_path, name):
    d = tmp_path / name
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(src, d)
    return d


def test_the_unmutated_directory_loads(compressed_dir, tmp_path):
    assert outcome(load_compressed, _fresh(compressed_dir, tmp_path, "ok")) is None


@given(ops=mutations(), header=st.booleans())
@fuzz_settings(100)
def test_mutated_weights_load_or_are_refused(compressed_dir, tmp_path, ops, header):
    d = _fresh(compressed_dir, tmp_path, "w")
    raw = (compressed_dir / "model.safetensors").read_bytes()
    cut = 8 + struct.unpack_from("<Q", raw)[0]
    (d / "model.safetensors").write_bytes(mutate(raw[:cut], ops) + raw[cut:] if header else mutate(raw, ops))
    outcome(load_compressed, d, names=str(d))


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.sampled_from(HUGE)
                    | st.floats() | st.text(max_size=12),
                    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
                    max_leaves=6)


def _paths(doc, prefix=()):
    """Every (path) to a value in a JSON document."""
    out = [prefix] if prefix else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


@given(data=st.data())
@fuzz_settings(100)
def test_manifest_values_load_or_are_refused(compressed_dir, tmp_path, data):
    manifest = json.loads((compressed_dir / "manifest.json").read_text())
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        paths = _paths(manifest)
        if not paths:
            break
        path = data.draw(st.sampled_from(paths), label="path")
        parent = manifest
        for k in path[:-1]:
            parent = parent[k]
        if isinstance(parent, dict) and data.draw(st.booleans(), label="delete"):
            del parent[path[-1]]
        else:
            parent[path[-1]] = data.draw(JSON, label="value")
    d = _fresh(compressed_dir, tmp_path, "j")
    (d / "manifest.json").write_text(json.dumps(manifest))
    outcome(load_compressed, d, names=str(d))


@given(ops=mutations())
@fuzz_settings(40)
def test_manifest_bytes_load_or_are_refused(compressed_dir, tmp_path, ops):
    d = _fresh(compressed_dir, tmp_path, "b")
    (d / "manifest.json").write_bytes(mutate((compressed_dir / "manifest.json").read_bytes(), ops))
    outcome(load_compressed, d, names=str(d))


@given(data=st.data())
@fuzz_settings(40)
def test_config_values_load_or_are_refused(compressed_dir, tmp_path, data):
    config = json.loads((compressed_dir / "config.json").read_text())
    key = data.draw(st.sampled_from(sorted(config)), label="key")
    config[key] = data.draw(JSON, label="value")
    d = _fresh(compressed_dir, tmp_path, "cfg")
    (d / "config.json").write_text(json.dumps(config))
    outcome(load_compressed, d, names=str(d))
