"""Fuzz the ONNX reader (models/onnx_model.py: protobuf framing, the checker, external data,
ONNX Runtime's session) over mutations of a real file written by shrink's ONNX exporter
(a small classifier; the sidecar is removed so the parser, not the recorded checksum,
meets the bytes), and external-data locations that climb out of the model's directory.
Every input loads or is refused with a one-line ValueError / FileNotFoundError."""
from __future__ import annotations

import shutil

import pytest

pytest.importorskip("hypothesis")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from fuzz_support import build_onnx, fuzz_settings, mutate, mutations, outcome  # noqa: E402
from hypothesis import given  # noqa: E402

from shrink.models.onnx_model import load_onnx, sidecar_path  # noqa: E402


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    path = build_onnx(d / "mlp.onnx")
    plain = path.read_bytes()
    ext = d / "ext"
    ext.mkdir()
    proto = onnx.load(str(path))
    onnx.save_model(proto, str(ext / "mlp.onnx"), save_as_external_data=True, location="mlp.onnx.data",
                    size_threshold=0)
    return plain, ext


def test_the_unmutated_files_load(onnx_files, tmp_path):
    plain, ext = onnx_files
    (tmp_path / "m.onnx").write_bytes(plain)
    assert outcome(load_onnx, tmp_path / "m.onnx") is None
    assert outcome(load_onnx, ext / "mlp.onnx") is None


@given(ops=mutations())
@fuzz_settings(120)
def test_mutated_onnx_loads_or_is_refused(onnx_files, tmp_path, ops):
    plain, _ = onnx_files
    path = tmp_path / "m.onnx"
    sidecar_path(path).unlink(missing_ok=True)
    path.write_bytes(mutate(plain, ops))
    outcome(load_onnx, path, names=str(path))


@given(ops=mutations())
@fuzz_settings(40)
def test_mutated_external_data_loads_or_is_refused(onnx_files, tmp_path, ops):
    _, ext = onnx_files
    d = tmp_path / "e"
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(ext, d)
    data = d / "mlp.onnx.data"
    data.write_bytes(mutate(data.read_bytes(), ops))
    outcome(load_onnx, d / "mlp.onnx", names=str(d / "mlp.onnx"))


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/passwd", "sub/../../secret.bin", "link.bin", "",
                                      "missing.bin"])
def test_external_data_outside_the_directory_is_refused(onnx_files, tmp_path, location):
    _, ext = onnx_files
    d = tmp_path / "model"
    shutil.copytree(ext, d)
    (tmp_path / "secret.bin").write_bytes((d / "mlp.onnx.data").read_bytes())   # what an escape would read
    (d / "link.bin").symlink_to(tmp_path / "secret.bin")
    proto = onnx.load(str(d / "mlp.onnx"), load_external_data=False)
    t = proto.graph.initializer[0]
    for e in t.external_data:
        if e.key == "location":
            e.value = location
    (d / "mlp.onnx").write_bytes(proto.SerializeToString())
    msg = outcome(load_onnx, d / "mlp.onnx", names=str(d / "mlp.onnx"))
    assert msg is not None and t.name in msg
    assert ("missing" if location == "missing.bin" else "directory") in msg


def test_nan_initializer_is_refused(onnx_files, tmp_path):
    import numpy as np
    from onnx import numpy_helper

    plain, _ = onnx_files
    proto = onnx.load_model_from_string(plain)
    t = proto.graph.initializer[0]
    arr = numpy_helper.to_array(t).copy()
    arr.flat[3] = np.nan
    t.CopyFrom(numpy_helper.from_array(arr, t.name))
    path = tmp_path / "nan.onnx"
    path.write_bytes(proto.SerializeToString())
    msg = outcome(load_onnx, path, names=str(path))
    assert msg is not None and "NaN/inf" in msg and t.name in msg
