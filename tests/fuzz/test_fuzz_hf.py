"""Fuzz shrink.load on a Hugging Face model directory written by save_pretrained (a tiny
Llama: config.json + model.safetensors) and on a weights-only pickle beside a config:
the bytes of the safetensors file (header first), config.json's bytes and its values,
and the pickle's bytes. Every input loads or is refused with a one-line ValueError /
FileNotFoundError; never another exception, a hang, or memory sized by a corrupt number."""
from __future__ import annotations

import json
import shutil
import struct

import pytest

pytest.importorskip("hypothesis")
pytest.importorskip("transformers")

from fuzz_support import HUGE, build_hf_dir, fuzz_settings, mutate, mutations, outcome  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from shrink.models.io import load  # noqa: E402


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return build_hf_dir(tmp_path_factory.mktemp("hf") / "tiny")


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def header_len(data: bytes) -> int:
    return 8 + struct.unpack_from("<Q", data)[0]


def test_the_unmutated_directory_loads(hf_dir, tmp_path):
    assert outcome(load, _copy(hf_dir, tmp_path / "ok")) is None


@given(ops=mutations(max_ops=3), data=st.data())
@fuzz_settings(120)
def test_mutated_safetensors_loads_or_is_refused(hf_dir, tmp_path, ops, data):
    d = tmp_path / "m"
    shutil.rmtree(d, ignore_errors=True)
    _copy(hf_dir, d)
    raw = (hf_dir / "model.safetensors").read_bytes()
    cut = header_len(raw)
    target = d / "model.safetensors"
    if data.draw(st.booleans(), label="header only"):   # the JSON header: names, dtypes, shapes, offsets
        target.write_bytes(mutate(raw[:cut], ops) + raw[cut:])
    else:
        target.write_bytes(mutate(raw, ops))
    outcome(load, d, names=str(d))


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.sampled_from(HUGE)
                    | st.floats(allow_nan=False) | st.text(max_size=12),
                    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
                    max_leaves=6)


@given(data=st.data())
@fuzz_settings(100)
def test_config_values_load_or_are_refused(hf_dir, tmp_path, data):
    config = json.loads((hf_dir / "config.json").read_text())
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        key = data.draw(st.sampled_from(sorted(config)), label="key")
        if data.draw(st.booleans(), label="delete"):
            config.pop(key, None)
        else:
            config[key] = data.draw(JSON, label="value")
        if not config:
            break
    d = tmp_path / "c"
    shutil.rmtree(d, ignore_errors=True)
    _copy(hf_dir, d)
    (d / "config.json").write_text(json.dumps(config))
    outcome(load, d, names=str(d))


@given(ops=mutations())
@fuzz_settings(40)
def test_config_bytes_load_or_are_refused(hf_dir, tmp_path, ops):
    d = tmp_path / "b"
    shutil.rmtree(d, ignore_errors=True)
    _copy(hf_dir, d)
    (d / "config.json").write_bytes(mutate((hf_dir / "config.json").read_bytes(), ops))
    outcome(load, d, names=str(d))


@given(ops=mutations())
@fuzz_settings(80)
def test_mutated_pickle_loads_or_is_refused(hf_dir, tmp_path, ops):
    path = tmp_path / "weights.bin"
    shutil.copy(hf_dir / "config.json", tmp_path / "config.json")
    path.write_bytes(mutate((hf_dir.parent / "weights.bin").read_bytes(), ops))
    outcome(load, path, names=str(tmp_path))


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from fuzz_support import TEXTS

    from shrink.models.tiny_gpt import train_tokenizer

    d = tmp_path_factory.mktemp("tok")
    train_tokenizer(TEXTS * 4, vocab_size=300).save_pretrained(d)
    return d


@given(ops=mutations(max_ops=3))
@fuzz_settings(60)
def test_mutated_tokenizer_loads_or_is_refused(tokenizer_dir, tmp_path, ops):
    from shrink.models.io import load_tokenizer

    d = tmp_path / "t"
    shutil.rmtree(d, ignore_errors=True)
    _copy(tokenizer_dir, d)
    (d / "tokenizer.json").write_bytes(mutate((tokenizer_dir / "tokenizer.json").read_bytes(), ops))
    outcome(load_tokenizer, d, names=str(d))
