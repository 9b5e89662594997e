"""Fuzz the calibration text readers (data/calibration.py: a .txt or .jsonl file) over
mutations of real files; and an empty or blank file is refused naming the file. Every
input is read or refused with a one-line ValueError / FileNotFoundError naming the file."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("hypothesis")

from fuzz_support import fuzz_settings, mutate, mutations, outcome  # noqa: E402
from hypothesis import given  # noqa: E402

from shrink.data.calibration import calibration_texts  # noqa: E402


def real_text() -> str:
    from tests_support import stdlib_sentences

    return "\n".join(stdlib_sentences(12))


@given(ops=mutations(max_ops=4))
@fuzz_settings(100)
def test_mutated_text_file_is_read_or_refused(tmp_path, ops):
    path = tmp_path / "c.txt"
    path.write_bytes(mutate(real_text().encode(), ops))
    outcome(calibration_texts, path, names=str(path))


@given(ops=mutations(max_ops=4))
@fuzz_settings(100)
def test_mutated_jsonl_file_is_read_or_refused(tmp_path, ops):
    path = tmp_path / "c.jsonl"
    lines = "".join(json.dumps({"text": t}) + "\n" for t in real_text().splitlines())
    path.write_bytes(mutate(lines.encode(), ops))
    outcome(calibration_texts, path, names=str(path))


@pytest.mark.parametrize("name, data", [("empty.txt", b""), ("blank.txt", b"  \n\n\t\n"), ("empty.jsonl", b""),
                                        ("blank.jsonl", b'{"text": ""}\n{"text": "  "}\n')])
def test_empty_calibration_files_are_refused(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    msg = outcome(calibration_texts, path, names=str(path))
    assert msg is not None and ("empty" in msg or "blank" in msg)


def test_a_directory_is_refused_as_a_value_error(tmp_path):
    assert "is a directory" in outcome(calibration_texts, tmp_path, names=str(tmp_path))
