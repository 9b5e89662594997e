"""Replays every input the fuzzers (or probing) found crashing a reader, kept under
tests/fuzz/corpus/<reader>/<case>/: the case's files replace those of the same real
artifact the fuzzers mutate (or are the whole input, for single-file readers). Each is
now refused with a one-line ValueError / FileNotFoundError naming the file."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fuzz_support import CORPUS, build_compressed_dir, build_hf_dir, outcome

CASES = sorted(p for p in CORPUS.glob("*/*") if p.is_dir())


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus-base")
    built = {}

    def get(kind: str) -> Path:
        if kind not in built:
            built[kind] = {"compressed": lambda: build_compressed_dir(root / "c"),
                           "hf": lambda: build_hf_dir(root / "hf" / "tiny")}[kind]()
        return built[kind]
    return get


def _overlay(base: Path, case: Path, dest: Path) -> Path:
    shutil.copytree(base, dest)
    for f in case.iterdir():
        shutil.copy(f, dest / f.name)
    return dest


def replay(case: Path, artifacts, tmp_path: Path) -> str | None:
    reader = case.parent.name
    if reader == "gguf":
        from shrink.models.gguf_read import check_gguf, load_gguf, load_gguf_tokenizer

        path = next(case.glob("*.gguf"))
        return outcome(lambda p: (check_gguf(p), load_gguf(p), load_gguf_tokenizer(p)), path, names=str(path))
    if reader == "compressed":
        from shrink.models.compressed import load_compressed

        d = _overlay(artifacts("compressed"), case, tmp_path / "c")
        return outcome(load_compressed, d, names=str(d))
    if reader == "hf":
        from shrink.models.io import load

        d = _overlay(artifacts("hf"), case, tmp_path / "hf")
        return outcome(load, d, names=str(d))
    if reader == "pickle":
        from shrink.models.io import load

        shutil.copy(artifacts("hf") / "config.json", tmp_path / "config.json")
        path = shutil.copy(next(case.glob("*.bin")), tmp_path / "weights.bin")
        return outcome(load, Path(path), names=str(path))
    if reader == "onnx":
        from shrink.models.onnx_model import load_onnx

        path = next(case.glob("*.onnx"))
        return outcome(load_onnx, path, names=str(path))
    if reader == "recipe":
        from shrink.recipe.steps import parse_recipe

        path = next(case.glob("*.yaml"))
        return outcome(parse_recipe, path, names=str(path))
    if reader == "calibration":
        from shrink.data.calibration import calibration_texts

        path = next(p for p in case.iterdir() if p.suffix in (".txt", ".jsonl"))
        return outcome(calibration_texts, path, names=str(path))
    raise AssertionError(f"corpus: no replay for reader {reader!r}")


def test_the_corpus_is_there():
    assert {c.parent.name for c in CASES} >= {"compressed", "hf", "pickle", "recipe", "calibration"}


@pytest.mark.parametrize("case", CASES, ids=[f"{c.parent.name}/{c.name}" for c in CASES])
def test_a_kept_crash_is_now_refused(case, artifacts, tmp_path):
    before = {f.name: f.read_bytes() for f in case.iterdir()}
    msg = replay(case, artifacts, tmp_path)
    assert msg is not None, f"{case}: loaded, but it is corrupt"
    assert {f.name: f.read_bytes() for f in case.iterdir()} == before
