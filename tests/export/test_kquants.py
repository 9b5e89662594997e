"""k-quant packers: byte-identical to llama.cpp, decodable by gguf-py, accurate, strict on input."""
from __future__ import annotations

import ctypes
import hashlib
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as GT
from gguf.quants import dequantize, quantize

from shrink.export.kquants import BLOCK_BYTES, KQUANTS, quantize_q4_k, quantize_q5_k, quantize_q6_k

TYPES = ("Q4_K", "Q5_K", "Q6_K")
GGML_TYPE_ID = {"Q4_K": 12, "Q5_K": 13, "Q6_K": 14}  # enum ggml_type


# ---------------------------------------------------------------- reference and data


def llama_cpp_quantize(w: np.ndarray, type_name: str) -> np.ndarray:
    """llama.cpp's own bytes: ggml_quantize_chunk(type, src, dst, 0, rows, cols, imatrix=NULL)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    lib = None
    for path in sorted((Path(llama_cpp.__file__).parent / "lib").glob("libggml*.so*")):
        candidate = ctypes.CDLL(str(path))
        if hasattr(candidate, "ggml_quantize_chunk"):
            lib = candidate
            break
    if lib is None:
        pytest.skip("no ggml library exporting ggml_quantize_chunk in the llama_cpp package")
    fn = lib.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                   ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    src = np.ascontiguousarray(w, dtype=np.float32)
    rows, cols = src.shape
    dst = np.zeros((rows, cols // 256 * BLOCK_BYTES[type_name]), dtype=np.uint8)
    written = fn(GGML_TYPE_ID[type_name], src.ctypes.data, dst.ctypes.data, 0, rows, cols, None)
    assert written == dst.size
    return dst


def as_rows_of_256(t) -> np.ndarray:
    """A real [*, 384] matrix seen as rows of 256 (k-quants need whole super-blocks)."""
    return np.ascontiguousarray(t.detach().numpy().astype(np.float32).reshape(-1, 256))


def edge_blocks() -> np.ndarray:
    """One super-block per row: the cases where the fitting code takes its side branches."""
    rng = np.random.default_rng(7)
    noise = rng.standard_normal(256).astype(np.float32)
    rows = {
        "zeros": np.zeros(256),
        "constant": np.full(256, 0.3),
        "negative constant": np.full(256, -0.3),
        "one outlier": np.where(np.arange(256) == 77, 100.0, noise * 0.01),
        "tiny": noise * 1e-30,
        "subnormal": noise * 1e-40,
        "negative only": -np.abs(noise) - 0.01,
        "positive only": np.abs(noise) + 5.0,
        "half-integers (ties)": np.round(noise * 8) / 2,
        "zero sub-blocks": np.where(np.arange(256) < 64, 0.0, noise),
        "sparse": np.where(np.arange(256) % 37 == 0, noise, 0.0),
        "powers of two": np.sign(noise) * 2.0 ** np.round(noise * 4),
    }
    return np.stack([np.asarray(r, dtype=np.float32) for r in rows.values()])


def golden_input() -> np.ndarray:
    """Deterministic heavy-tailed [8, 512] weights from integer arithmetic (no RNG, no libm)."""
    i = np.arange(8 * 512, dtype=np.int64)
    u = ((i * 2654435761) % 2001 - 1000) / 1000.0
    return (u ** 3 * 0.05).astype(np.float32).reshape(8, 512)


# sha256 of each packer's bytes for golden_input(); test_golden_is_llama_cpps checks them against llama.cpp
GOLDEN = {
    "Q4_K": "4efc674eb94e71dd8aaf16aff5b3e18554e89126117a25968a032c5bec4a3e92",
    "Q5_K": "88cad81c68403f75f2e522322e1cfc0ca522dd85ef84fc66eb9c886deb15126d",
    "Q6_K": "c220b6329edf89c74bcbbc75c0cf946bbb1fbb3aec5a9fe134d4b0eabbd4d6e9",
}


def rel_rmse(w: np.ndarray, approx: np.ndarray) -> float:
    w64 = w.astype(np.float64)
    return float(np.sqrt(np.mean((approx.astype(np.float64) - w64) ** 2) / np.mean(w64 ** 2)))


def rtn64_asym(w: np.ndarray, bits: int, group: int) -> np.ndarray:
    """Float64 round-to-nearest with a per-group min (<= 0) and max: the plain bound a k-quant search should meet."""
    x = w.astype(np.float64).reshape(-1, group)
    lo, hi = np.minimum(x.min(1, keepdims=True), 0), x.max(1, keepdims=True)
    step = (hi - lo) / (2 ** bits - 1)
    step[step == 0] = 1
    return (np.clip(np.round((x - lo) / step), 0, 2 ** bits - 1) * step + lo).reshape(w.shape)


def rtn64_sym(w: np.ndarray, bits: int, group: int) -> np.ndarray:
    """Float64 symmetric absmax round-to-nearest, levels -(2^(b-1)-1)..2^(b-1)-1."""
    x = w.astype(np.float64).reshape(-1, group)
    qmax = 2 ** (bits - 1) - 1
    step = np.abs(x).max(1, keepdims=True) / qmax
    step[step == 0] = 1
    return (np.clip(np.round(x / step), -qmax, qmax) * step).reshape(w.shape)


@pytest.fixture(scope="module")
def real_matrices(minilm_weights, heavy_tailed) -> dict[str, np.ndarray]:
    out = {name.split(".")[-2] + "." + name.split(".")[-1]: as_rows_of_256(t) for name, t in minilm_weights.items()}
    out["heavy_tailed"] = heavy_tailed.numpy().astype(np.float32)
    return out


# ---------------------------------------------------------------- byte identity with llama.cpp


@pytest.mark.parametrize("type_name", TYPES)
def test_bytes_equal_llama_cpp_on_real_weights(type_name, real_matrices):
    for name, w in real_matrices.items():
        ours, theirs = KQUANTS[type_name](w), llama_cpp_quantize(w, type_name)
        assert ours.shape == theirs.shape
        mismatched_blocks = int((ours != theirs).reshape(-1, BLOCK_BYTES[type_name]).any(1).sum())
        assert mismatched_blocks == 0, f"{type_name} {name}: {mismatched_blocks} super-blocks differ"


@pytest.mark.parametrize("type_name", TYPES)
def test_bytes_equal_llama_cpp_on_edge_and_random_blocks(type_name):
    rng = np.random.default_rng(11)
    cases = {"edge": edge_blocks(), "golden": golden_input()}
    for k, scale in enumerate((1e-6, 1e-2, 1.0, 3e3)):
        cases[f"normal*{scale}"] = (rng.standard_normal((4, 512 * (k + 1))) * scale).astype(np.float32)
        cases[f"cauchy*{scale}"] = (rng.standard_cauchy((4, 256)) * scale * 1e-2).astype(np.float32)
        cases[f"fp16 grid*{scale}"] = (rng.standard_normal((4, 256)) * scale).astype(np.float16).astype(np.float32)
    for name, w in cases.items():
        ours, theirs = KQUANTS[type_name](w), llama_cpp_quantize(w, type_name)
        bad = np.argwhere((ours != theirs).reshape(-1, BLOCK_BYTES[type_name]).any(1)).ravel()
        assert bad.size == 0, f"{type_name} {name}: super-blocks {bad.tolist()} differ"


@pytest.mark.parametrize("type_name", TYPES)
def test_golden_bytes(type_name):
    digest = hashlib.sha256(KQUANTS[type_name](golden_input()).tobytes()).hexdigest()
    assert digest == GOLDEN[type_name]


@pytest.mark.parametrize("type_name", TYPES)
def test_golden_is_llama_cpps(type_name):
    digest = hashlib.sha256(llama_cpp_quantize(golden_input(), type_name).tobytes()).hexdigest()
    assert digest == GOLDEN[type_name]


# ---------------------------------------------------------------- round trip through gguf-py's decoder


def roundtrip(w: np.ndarray, type_name: str) -> np.ndarray:
    packed = KQUANTS[type_name](w)
    assert packed.dtype == np.uint8 and packed.shape == (w.shape[0], w.shape[1] // 256 * BLOCK_BYTES[type_name])
    out = dequantize(packed, GT[type_name])
    assert out.shape == w.shape
    return out


def test_error_within_float64_bounds_and_ordered(real_matrices):
    for name, w in real_matrices.items():
        err = {t: rel_rmse(w, roundtrip(w, t)) for t in TYPES}
        legacy = {t: rel_rmse(w, dequantize(quantize(w, GT[t]), GT[t])) for t in ("Q4_0", "Q4_1", "Q5_0", "Q5_1")}
        # the scale search must at least match plain float64 RTN of the same bits and group,
        # despite 6-bit scales and fp16 super-scales
        assert err["Q4_K"] <= rel_rmse(w, rtn64_asym(w, 4, 32)), name
        assert err["Q5_K"] <= rel_rmse(w, rtn64_asym(w, 5, 32)), name
        assert err["Q6_K"] <= 1.05 * rel_rmse(w, rtn64_sym(w, 6, 16)), name
        assert err["Q4_K"] < min(legacy["Q4_0"], legacy["Q4_1"]), name
        assert err["Q5_K"] < min(legacy["Q5_0"], legacy["Q5_1"]), name
        assert err["Q6_K"] < 0.6 * err["Q5_K"] < 0.6 * err["Q4_K"], name
        assert 0.03 < err["Q4_K"] < 0.1, name  # 4 bits: a few percent, never near-lossless or broken


@pytest.mark.parametrize("type_name", TYPES)
def test_edge_blocks_roundtrip(type_name):
    w = edge_blocks()
    out = roundtrip(w, type_name)
    assert np.isfinite(out).all()
    zeros, const, neg_const, outlier, tiny, subnormal, neg_only = out[:7]
    assert not zeros.any()
    np.testing.assert_allclose(const, 0.3, rtol=2e-3)
    np.testing.assert_allclose(neg_const, -0.3, rtol=2e-3)
    assert abs(outlier[77] - 100.0) < 0.5
    assert np.abs(np.delete(outlier, 77) - np.delete(w[3], 77)).max() < 100.0 / 15
    # below fp16's smallest scale the block collapses to zeros, as in llama.cpp, never to garbage
    assert np.abs(tiny).max() <= np.abs(w[4]).max() and np.abs(subnormal).max() <= np.abs(w[5]).max()
    assert rel_rmse(w[6], neg_only) < {"Q4_K": 0.08, "Q5_K": 0.04, "Q6_K": 0.02}[type_name]


def test_packers_are_deterministic_and_leave_input_alone():
    w = golden_input()
    before = w.copy()
    for fn in (quantize_q4_k, quantize_q5_k, quantize_q6_k):
        assert np.array_equal(fn(w), fn(w.copy()))
    assert np.array_equal(w, before)


def test_rows_are_independent():
    # a row's bytes do not depend on its neighbours: quantizing rows one by one gives the same matrix
    w = golden_input()
    for type_name, fn in KQUANTS.items():
        whole = fn(w)
        for r in range(w.shape[0]):
            assert np.array_equal(fn(w[r:r + 1]), whole[r:r + 1]), (type_name, r)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("type_name", TYPES)
@pytest.mark.parametrize("bad, match", [
    (np.zeros((4, 256), dtype=np.float64), "float32"),
    (np.zeros((4, 256), dtype=np.float16), "float32"),
    (np.zeros(256, dtype=np.float32), "2-D"),
    (np.zeros((2, 2, 256), dtype=np.float32), "2-D"),
    (np.zeros((4, 384), dtype=np.float32), "multiple of 256"),
    (np.zeros((4, 0), dtype=np.float32), "multiple of 256"),
    ([[0.0] * 256], "numpy array"),
])
def test_bad_shapes_and_types(type_name, bad, match):
    with pytest.raises(ValueError, match=match):
        KQUANTS[type_name](bad)


@pytest.mark.parametrize("type_name", TYPES)
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_named_with_position(type_name, value):
    w = np.zeros((3, 512), dtype=np.float32)
    w[2, 300] = value
    with pytest.raises(ValueError, match=r"non-finite .* row 2, col 300"):
        KQUANTS[type_name](w)


@pytest.mark.parametrize("type_name", TYPES)
@pytest.mark.parametrize("scale", [1e10, 1e15])  # |w| up to 5e8 (scale overflows fp16), 5e13 (rejected up front)
def test_too_large_for_fp16_scales(type_name, scale):
    w = golden_input() * np.float32(scale)
    with pytest.raises(ValueError, match="too large|fp16"):
        KQUANTS[type_name](w)
