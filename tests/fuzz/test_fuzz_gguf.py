"""Fuzz the GGUF reader (models/gguf_read.py and the tokenizer rebuilt from its metadata)
over mutations of a real file written by shrink's own GGUF exporter: it loads or refuses
with a one-line ValueError naming the file; never another exception, a hang, or an
allocation sized by a corrupt length."""
from __future__ import annotations

import struct

import pytest

pytest.importorskip("gguf")
pytest.importorskip("hypothesis")

from fuzz_support import build_gguf, fuzz_settings, mutate, mutations, outcome  # noqa: E402
from hypothesis import given  # noqa: E402

from shrink.models.gguf_read import check_gguf, load_gguf, load_gguf_tokenizer  # noqa: E402

@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    path = build_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    data = path.read_bytes()
    info = check_gguf(path)
    return data, info.data_offset


def read_all(path):
    check_gguf(path)
    load_gguf(path)
    load_gguf_tokenizer(path)


def test_the_unmutated_file_loads(gguf_file, tmp_path):
    data, _ = gguf_file
    (tmp_path / "m.gguf").write_bytes(data)
    assert outcome(read_all, tmp_path / "m.gguf") is None


@given(ops=mutations(regions=[(0.0, 0.02), (0.0, 0.3)]))
@fuzz_settings(150)
def test_mutated_gguf_loads_or_is_refused(gguf_file, tmp_path, ops):
    data, header_end = gguf_file
    # most of the file is tensor data: aim most mutations at the header, metadata and tensor table
    head = mutate(data[:header_end], ops)
    path = tmp_path / "m.gguf"
    path.write_bytes(head + data[header_end:])
    outcome(read_all, path, names=str(path))


@given(ops=mutations())
@fuzz_settings(40)
def test_mutated_anywhere_loads_or_is_refused(gguf_file, tmp_path, ops):
    data, _ = gguf_file
    path = tmp_path / "any.gguf"
    path.write_bytes(mutate(data, ops))
    outcome(read_all, path, names=str(path))


def test_every_length_field_set_huge_is_refused(gguf_file, tmp_path):
    """Each 8-byte little-endian field before the data that holds a small count or length,
    set to 2^40 and 2^64-1: refused, quickly."""
    data, header_end = gguf_file
    path = tmp_path / "huge.gguf"
    refused = 0
    for at in range(8, header_end - 8):
        (value,) = struct.unpack_from("<Q", data, at)
        if not 0 < value < 4096:
            continue
        for huge in (1 << 40, (1 << 64) - 1):
            path.write_bytes(data[:at] + struct.pack("<Q", huge) + data[at + 8:])
            refused += outcome(read_all, path, names=str(path)) is not None
    assert refused > 20
