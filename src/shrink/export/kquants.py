"""llama.cpp's k-quant packers (Q4_K, Q5_K, Q6_K) in vectorized NumPy, byte for byte.

The k-quants group a row into super-blocks of QK_K = 256 weights. Each super-block
carries one or two fp16 super-scales, a small scale (and for Q4_K/Q5_K a min) per
sub-block quantized against those super-scales, and the weight codes:

  Q4_K (144 bytes): d, dmin (fp16) | 12 bytes: eight 6-bit scales + eight 6-bit mins
                    | 128 bytes of 4-bit codes. Sub-blocks of 32; w = d*sc*q - dmin*m.
  Q5_K (176 bytes): as Q4_K, plus 32 bytes holding the fifth bit of every code.
  Q6_K (210 bytes): 128 bytes low 4 bits | 64 bytes high 2 bits | sixteen int8 scales
                    | d (fp16). Sub-blocks of 16; w = d*sc*(q - 32).

The 6-bit scale/min layout (llama.cpp's `get_scale_min_k4`): bytes 0-3 hold scales 0-3
in their low 6 bits, bytes 4-7 mins 0-3; scales/mins 4-7 keep their low nibbles in
bytes 8-11 (scale low, min high) and their top two bits in the top two bits of bytes
0-3 (scales) and 4-7 (mins).

What is mirrored (ggml/src/ggml-quants.c, `quantize_row_q{4,5,6}_K_ref`, used by
`ggml_quantize_chunk` when no importance matrix is given):

- Q4_K/Q5_K fit each 32-weight sub-block with `make_qkx2_quants`: weights
  w_i = rms(x) + |x_i|, an offset min <= 0, then a grid of candidate inverse scales
  (nmax + rmin + rdelta*k)/(max - min), k = 0..nstep, each refit by weighted least
  squares and kept when its weighted error is strictly smaller; `min` is the best
  offset so far, so a winning candidate moves the rest of the grid. Q4_K: nmax 15,
  rmin -1, rdelta 0.1, 20 steps; Q5_K: nmax 31, rmin -0.5, rdelta 0.1, 15 steps.
  The sub-block scales and mins are then rounded to 6 bits against the largest of
  each, and every code is re-rounded against the rounded scales (a sub-block whose
  rounded scale is zero keeps its fitted codes).
- Q6_K fits each 16-weight sub-block with `make_qx_quants` (nmax 32, weights x^2):
  the scale -32/max, then 18 nearby candidates -(32 + 0.1k)/max, k = -9..9, kept when
  the least-squares gain is strictly larger; scales become int8 against the one of
  largest magnitude (-128/that scale), codes are re-rounded.

Bit-exactness needs C's arithmetic exactly: every sum is a float32 sum taken in index
order (the library is built without -ffast-math or FMA), `nearest_int` is the
"add 1.5*2^23 and read the mantissa" trick (round half to even, and its wrap-around
for out-of-range values), and fp16 conversion rounds to nearest even, which NumPy's
float32 -> float16 cast also does. The loops below therefore run over the 16 or 32
positions of a sub-block, each step vectorized across every sub-block of the matrix.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

QK_K = 256
BLOCK_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}

_F32 = np.float32
_MAGIC = _F32(12582912.0)  # 1.5 * 2**23
_GROUP_MAX_EPS = _F32(1e-15)
_TOO_LARGE = 1e12  # far past fp16's reach already; keeps every float32 sum below overflow
_CHUNK = 2048  # super-blocks per pass: keeps the working arrays in cache


def _nearest_int(f: np.ndarray) -> np.ndarray:
    """llama.cpp's nearest_int: float32 add of 1.5*2^23, low 23 bits, minus 2^22 (int32)."""
    with np.errstate(over="ignore", invalid="ignore"):
        v = np.asarray(f, dtype=_F32) + _MAGIC
    return (v.view(np.int32) & 0x007FFFFF) - 0x00400000


def _seqsum(terms: np.ndarray) -> np.ndarray:
    """Float32 sum over axis 0 in index order, starting from 0 (C's `s += t[i]` loop)."""
    s = np.zeros(terms.shape[1:], dtype=_F32)
    for t in terms:
        s += t
    return s


def _fp16_bits(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return np.asarray(x, dtype=_F32).astype(np.float16).view(np.uint16)


def _fp16_value(bits: np.ndarray) -> np.ndarray:
    return bits.view(np.float16).astype(_F32)


def _check(w: np.ndarray, type_name: str) -> np.ndarray:
    if not isinstance(w, np.ndarray):
        raise ValueError(f"{type_name}: expected a numpy array, got {type(w).__name__}; "
                         "pass tensor.detach().cpu().numpy()")
    if w.dtype != np.float32:
        raise ValueError(f"{type_name}: expected float32 weights, got {w.dtype}; "
                         "convert with w.astype(np.float32)")
    if w.ndim != 2:
        raise ValueError(f"{type_name}: expected a 2-D [rows, cols] matrix, got shape {w.shape}; "
                         "reshape to rows of the GGUF row length (ne[0])")
    if w.shape[1] % QK_K != 0 or w.shape[1] == 0:
        raise ValueError(f"{type_name}: row length {w.shape[1]} is not a positive multiple of {QK_K}; "
                         "k-quants need whole 256-weight super-blocks (use a 32-block type such as "
                         "Q5_0/Q8_0 for this tensor, as llama.cpp's fallback does)")
    if not np.isfinite(w).all():
        bad = np.argwhere(~np.isfinite(w))[0]
        raise ValueError(f"{type_name}: non-finite value {w[tuple(bad)]} at row {bad[0]}, col {bad[1]}; "
                         "fix or clamp the weights before export")
    big = np.abs(w).max(initial=0.0)
    if big > _TOO_LARGE:
        raise ValueError(f"{type_name}: |w| reaches {big:.3g}, beyond what fp16 super-block scales can "
                         "hold (llama.cpp would write inf or zero scales); rescale the tensor before export")
    return np.ascontiguousarray(w)


def _check_scales(bits: np.ndarray, blocks_per_row: int, type_name: str) -> None:
    bad = ~np.isfinite(bits.view(np.float16))
    if bad.any():
        row = int(np.argwhere(bad)[0][0]) // blocks_per_row
        raise ValueError(f"{type_name}: weights in row {row} are too large for the fp16 super-block "
                         "scale (it overflows past 65504; roughly |w| > 1e7); rescale the tensor before export")


def _make_qkx2(x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """llama.cpp's make_qkx2_quants on sub-blocks x [n, N] (position-major).

    Returns (scale [N], the_min [N] = -offset, codes [n, N] uint8 in 0..nmax).
    """
    sum_x2 = _seqsum(x * x)
    av_x = np.sqrt(sum_x2 / _F32(x.shape[0]))
    w = av_x + np.abs(x)

    lo = np.minimum(x.min(axis=0), _F32(0))
    hi = x.max(axis=0)
    flat = hi == lo
    span = np.where(flat, _F32(1), hi - lo)
    sum_w = w[0].copy()
    sum_x = w[0] * x[0]
    for i in range(1, x.shape[0]):
        sum_w += w[i]
        sum_x += w[i] * x[i]

    fmax = _F32(nmax)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        iscale = fmax / span
        scale = _F32(1) / iscale
        codes = np.clip(_nearest_int(iscale * (x - lo)), 0, nmax).astype(np.uint8)
        lf = codes.astype(_F32)
        diff = scale * lf + lo - x
        best = _seqsum(w * (diff * diff))
        best_min = lo.copy()
        for k in range(nstep + 1):
            # C reuses `min` after a candidate wins: the grid moves with the best offset so far
            num = _F32(rmin) + _F32(rdelta) * _F32(k) + fmax
            iscale = num / np.where(flat, _F32(1), hi - best_min)
            aux = np.clip(_nearest_int(iscale * (x - best_min)), 0, nmax)
            la = aux.astype(_F32)
            wl = w * la
            sum_l = _seqsum(wl)
            sum_l2 = _seqsum(wl * la)
            sum_xl = _seqsum(wl * x)
            det = sum_w * sum_l2 - sum_l * sum_l
            ok = det > 0
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            pos = this_min > 0
            this_min = np.where(pos, _F32(0), this_min)
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
            diff = this_scale * la + this_min - x
            err = _seqsum(w * (diff * diff))
            take = ok & (err < best) & ~flat
            if take.any():
                codes = np.where(take, aux.astype(np.uint8), codes)
                best = np.where(take, err, best)
                scale = np.where(take, this_scale, scale)
                best_min = np.where(take, this_min, best_min)
    codes = np.where(flat, np.uint8(0), codes)
    scale = np.where(flat, _F32(0), scale).astype(_F32)
    return scale, (-best_min).astype(_F32), codes


def _pack_scale_min(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins [nb, 8] -> the 12-byte get_scale_min_k4 layout."""
    out = np.empty((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return out


def _q45_k_chunk(x: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K (bits 4) or Q5_K (bits 5) for super-blocks x [nb, 256]: (block bytes, d bits)."""
    nb = x.shape[0]
    nmax = (1 << bits) - 1
    rmin, nstep = (-1.0, 20) if bits == 4 else (-0.5, 15)
    sub = np.ascontiguousarray(x.reshape(nb, 8, 32).transpose(2, 0, 1).reshape(32, nb * 8))
    scales, mins, codes = _make_qkx2(sub, nmax, rmin, 0.1, nstep)
    scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)

    # C keeps a running `if (v > best) best = v` from 0: NaN and negatives never win
    max_scale = np.where(scales > 0, scales, _F32(0)).max(axis=1)
    max_min = np.where(mins > 0, mins, _F32(0)).max(axis=1)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        inv_scale = np.where(max_scale > 0, _F32(63) / max_scale, _F32(0)).astype(_F32)
        inv_min = np.where(max_min > 0, _F32(63) / max_min, _F32(0)).astype(_F32)
        ls = np.minimum(_nearest_int(inv_scale[:, None] * scales) & 0xFF, 63).astype(np.uint8)
        lm = np.minimum(_nearest_int(inv_min[:, None] * mins) & 0xFF, 63).astype(np.uint8)
        d_bits = _fp16_bits(max_scale / _F32(63))
        dmin_bits = _fp16_bits(max_min / _F32(63))

        # re-round every code against the 6-bit scales; zero-scale sub-blocks keep theirs
        d = _fp16_value(d_bits)[:, None] * ls.astype(_F32)
        dm = _fp16_value(dmin_bits)[:, None] * lm.astype(_F32)
        xb = x.reshape(nb, 8, 32)
        requant = np.clip(_nearest_int((xb + dm[:, :, None]) / d[:, :, None]), 0, nmax)
    codes = codes.reshape(32, nb, 8).transpose(1, 2, 0)
    codes = np.where((d != 0)[:, :, None], requant.astype(np.uint8), codes).reshape(nb, 4, 2, 32)

    parts = [d_bits.view(np.uint8).reshape(nb, 2), dmin_bits.view(np.uint8).reshape(nb, 2),
             _pack_scale_min(ls, lm)]
    low = codes & 0xF
    if bits == 5:
        high = (codes >> 4).astype(np.uint8)
        qh = np.zeros((nb, 32), dtype=np.uint8)
        for c in range(4):
            qh |= (high[:, c, 0] << (2 * c)) | (high[:, c, 1] << (2 * c + 1))
        parts.append(qh)
    parts.append((low[:, :, 0] | (low[:, :, 1] << 4)).reshape(nb, 128))
    return np.concatenate(parts, axis=1), np.stack([d_bits, dmin_bits], axis=1)


def _make_qx(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp's make_qx_quants with rmse_type 1 on sub-blocks x [n, N].

    Returns (scale [N], codes [n, N] int8 holding l + nmax; all-zero sub-blocks give 0).
    """
    n, count = x.shape
    cols = np.arange(count)
    xmax = x[np.abs(x).argmax(axis=0), cols]  # first element of largest magnitude
    zero = np.abs(xmax) < _GROUP_MAX_EPS
    safe_max = np.where(zero, _F32(1), xmax)
    w = x * x
    wx = w * x
    fn = _F32(nmax)

    def trial(iscale):
        l = np.clip(_nearest_int(iscale * x), -nmax, nmax - 1)
        lf = l.astype(_F32)
        return l, _seqsum(wx * lf), _seqsum((w * lf) * lf)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        l, sumlx, suml2 = trial(_F32(-nmax) / safe_max)
        scale = np.where(suml2 != 0, sumlx / suml2, _F32(0)).astype(_F32)
        best = scale * sumlx
        for k in range(-9, 10):
            if k == 0:
                continue
            iscale = -(fn + _F32(0.1) * _F32(k)) / safe_max
            lk, sumlx, suml2 = trial(iscale)
            take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            if take.any():
                l = np.where(take, lk, l)
                scale = np.where(take, sumlx / suml2, scale).astype(_F32)
                best = np.where(take, scale * sumlx, best).astype(_F32)
    codes = np.where(zero, 0, l + nmax).astype(np.int8)
    return np.where(zero, _F32(0), scale).astype(_F32), codes


def _q6_k_chunk(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q6_K for super-blocks x [nb, 256]: (block bytes, d bits)."""
    nb = x.shape[0]
    sub = np.ascontiguousarray(x.reshape(nb, 16, 16).transpose(2, 0, 1).reshape(16, nb * 16))
    scales, codes = _make_qx(sub, 32)
    scales = scales.reshape(nb, 16)
    codes = codes.reshape(16, nb, 16).transpose(1, 2, 0)  # [nb, sub-block, position]

    pick = np.abs(scales).argmax(axis=1)  # first sub-block of largest |scale|
    max_scale = scales[np.arange(nb), pick]
    empty = np.abs(max_scale) < _GROUP_MAX_EPS
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        iscale = (_F32(-128) / np.where(empty, _F32(1), max_scale)).astype(_F32)
        d_bits = np.where(empty, np.uint16(0), _fp16_bits(_F32(1) / iscale))
        sc = (np.minimum(_nearest_int(iscale[:, None] * scales), 127) & 0xFF).astype(np.uint8)
        sc = np.where(empty[:, None], np.uint8(0), sc)
        d = _fp16_value(d_bits)[:, None] * sc.view(np.int8).astype(_F32)
        requant = np.clip(_nearest_int(x.reshape(nb, 16, 16) / d[:, :, None]), -32, 31) + 32
    codes = np.where((d != 0)[:, :, None], requant, codes).astype(np.uint8)
    codes = np.where(empty[:, None, None], np.uint8(0), codes).reshape(nb, 2, 4, 32)

    low, high = codes & 0xF, codes >> 4
    ql = np.stack([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    out = np.concatenate([ql.reshape(nb, 128), qh.reshape(nb, 64), sc,
                          d_bits.view(np.uint8).reshape(nb, 2)], axis=1)
    return out, d_bits[:, None]


def _quantize(w: np.ndarray, type_name: str, chunk_fn: Callable) -> np.ndarray:
    w = _check(w, type_name)
    rows, cols = w.shape
    blocks = w.reshape(-1, QK_K)
    out = np.empty((blocks.shape[0], BLOCK_BYTES[type_name]), dtype=np.uint8)
    supers = np.empty((blocks.shape[0], 2), dtype=np.uint16)
    for start in range(0, blocks.shape[0], _CHUNK):
        stop = start + _CHUNK
        with np.errstate(all="ignore"):  # masked lanes divide by zero; C ignores them too
            packed, d_bits = chunk_fn(blocks[start:stop])
        out[start:stop] = packed
        supers[start:stop, : d_bits.shape[1]] = d_bits
        supers[start:stop, d_bits.shape[1]:] = 0
    _check_scales(supers, cols // QK_K, type_name)
    return out.reshape(rows, cols // QK_K * BLOCK_BYTES[type_name])


def quantize_q4_k(w: np.ndarray) -> np.ndarray:
    """float32 [rows, cols] (cols % 256 == 0) -> uint8 [rows, cols/256*144], as llama.cpp's Q4_K."""
    return _quantize(w, "Q4_K", lambda x: _q45_k_chunk(x, 4))


def quantize_q5_k(w: np.ndarray) -> np.ndarray:
    """float32 [rows, cols] (cols % 256 == 0) -> uint8 [rows, cols/256*176], as llama.cpp's Q5_K."""
    return _quantize(w, "Q5_K", lambda x: _q45_k_chunk(x, 5))


def quantize_q6_k(w: np.ndarray) -> np.ndarray:
    """float32 [rows, cols] (cols % 256 == 0) -> uint8 [rows, cols/256*210], as llama.cpp's Q6_K."""
    return _quantize(w, "Q6_K", _q6_k_chunk)


KQUANTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "Q4_K": quantize_q4_k,
    "Q5_K": quantize_q5_k,
    "Q6_K": quantize_q6_k,
}
