"""GGUF writer: carried codes are gguf's own blocks bit for bit, quantized tensors are the
bytes gguf's quantizers make, and llama.cpp runs the files as shrink's model does."""
from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from shrink.export.dense import Grid, carried_layers, plain_copy  # noqa: E402
from shrink.export.gguf import carrier, encode, pack_carried, qk_rows, write_gguf  # noqa: E402

Q = gguf.GGMLQuantizationType
LEGACY = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")


def _weight(rows=24, cols=128, seed=0) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, cols, generator=g) * 0.05).numpy()


def _grid_from_gguf(blocks: np.ndarray, type_name: str, rows: int, cols: int) -> Grid:
    """Read gguf's own blocks back into (codes, scale, zero_point): the inverse of pack_carried."""
    nb = cols // 32
    b = blocks.reshape(rows, nb, -1)
    d = b[..., 0:2].copy().view(np.float16)[..., 0]
    if type_name == "Q8_0":
        q = b[..., 2:].copy().view(np.int8).astype(np.int32)
        return Grid(torch.from_numpy(q.reshape(rows, cols)), torch.from_numpy(d), None, 8, 32)
    asym = type_name.endswith("_1")
    m = b[..., 2:4].copy().view(np.float16)[..., 0] if asym else None
    at = 4 if asym else 2
    qh = None
    if type_name.startswith("Q5"):
        qh = b[..., at:at + 4].copy().view("<u4")[..., 0]
        at += 4
    qs = b[..., at:at + 16]
    q = np.concatenate([qs & 0xF, qs >> 4], axis=-1).astype(np.int32)
    if qh is not None:
        q |= (((qh[..., None] >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.int32)
    bits = 5 if qh is not None else 4
    if asym:  # w = d*q + m  ->  zero_point = -m/d (not an integer in general; here only for the layout)
        zp = -(m.astype(np.float32) / np.where(d == 0, 1, d).astype(np.float32))
        return Grid(torch.from_numpy(q.reshape(rows, cols)), torch.from_numpy(d), torch.from_numpy(zp), bits, 32)
    q -= 8 if bits == 4 else 16
    return Grid(torch.from_numpy(q.reshape(rows, cols)), torch.from_numpy(d), None, bits, 32)


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q5_0"])
def test_carried_blocks_are_gguf_blocks_bit_for_bit(type_name):
    w = _weight()
    ref = gguf.quants.quantize(w, Q[type_name])
    grid = _grid_from_gguf(ref, type_name, *w.shape)
    assert carrier(grid) == type_name
    assert np.array_equal(pack_carried(grid, type_name), ref)


@pytest.mark.parametrize("type_name", ["Q4_1", "Q5_1"])
def test_carried_asymmetric_blocks_match_gguf_layout(type_name):
    """Codes and scales land exactly; the min m = -zero_point*scale is recomputed in fp16."""
    w = _weight(seed=1)
    ref = gguf.quants.quantize(w, Q[type_name])
    grid = _grid_from_gguf(ref, type_name, *w.shape)
    mine = pack_carried(grid, type_name).reshape(w.shape[0], w.shape[1] // 32, -1)
    theirs = ref.reshape(mine.shape)
    assert np.array_equal(mine[..., :2], theirs[..., :2])   # d
    assert np.array_equal(mine[..., 4:], theirs[..., 4:])   # (qh and) nibbles
    m_mine = mine[..., 2:4].copy().view(np.float16).astype(np.float32)
    m_ref = theirs[..., 2:4].copy().view(np.float16).astype(np.float32)
    assert np.all(np.abs(m_mine - m_ref) <= np.spacing(np.abs(m_ref).astype(np.float16)).astype(np.float32))


@pytest.mark.parametrize("bits,symmetric,group", [(4, True, 32), (3, True, 128), (4, False, 64), (5, False, 32),
                                                    (8, True, 128), (5, True, 96)])
def test_shrink_grids_dequantize_identically_in_gguf(bits, symmetric, group):
    """A grid as shrink's quantizers make it (fp16 scales): gguf's dequantizer of the carried
    blocks gives shrink's dequantized weight (exactly when symmetric; within the fp16 min's
    rounding when asymmetric)."""
    from shrink.algos import rtn
    from shrink.quant import QuantSpec

    w = torch.from_numpy(_weight(16, 384, seed=bits))
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity="group", group_size=group)
    from shrink.modules import QuantLinear

    ql = QuantLinear.from_qtensor(rtn(w, spec).qtensor)
    grids, _ = carried_layers(torch.nn.Sequential(ql))
    grid = grids["0"]
    kind = carrier(grid)
    assert kind is not None
    back = gguf.quants.dequantize(pack_carried(grid, kind), Q[kind]).reshape(16, 384)
    want = ql.dequantized_weight().float().numpy()
    if symmetric:
        assert np.array_equal(back, want)
    else:
        assert np.max(np.abs(back - want)) <= 2e-3 * np.max(np.abs(want))


def test_grids_that_cannot_be_carried():
    g = Grid(torch.zeros(4, 48, dtype=torch.int32), torch.ones(4, 3), None, 4, 16)
    assert carrier(g) is None                       # groups of 16 are not whole 32-blocks
    g = Grid(torch.zeros(4, 64, dtype=torch.int32), torch.ones(4, 1), torch.ones(4, 1), 8, 64)
    assert carrier(g) is None                       # asymmetric 8-bit has no GGUF block type


@pytest.mark.parametrize("type_name", LEGACY + ("F16",))
def test_quantized_tensors_are_gguf_quantizer_bytes(type_name):
    w = _weight(8, 256, seed=3)
    stored = encode(w, type_name)
    want = w.astype(np.float16) if type_name == "F16" else gguf.quants.quantize(w, Q[type_name])
    assert stored.dtype == want.dtype and np.array_equal(stored, want)


def test_qk_rows_interleave_the_halves_of_each_head():
    rows = qk_rows(8, 2)   # 2 heads of 4 rows: [0 1 | 2 3], [4 5 | 6 7]
    assert rows.tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


# ----------------------------------------------------------------------------- whole files

@pytest.fixture(scope="module")
def tiny():
    import shrink
    from shrink.models.io import load_tokenizer

    return shrink.load("tiny-gpt"), load_tokenizer("tiny-gpt")


def test_file_holds_gguf_quantizer_bytes_under_llama_cpp_names(tiny, tmp_path):
    model, tok = tiny
    path = tmp_path / "m.gguf"
    written = write_gguf(model, tok, path, "Q8_0")
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    plain = plain_copy(model).state_dict()
    heads = model.config.num_attention_heads
    q = plain["model.layers.1.self_attn.q_proj.weight"].numpy()[qk_rows(128, heads)]
    assert tensors["blk.1.attn_q.weight"].tensor_type == Q.Q8_0
    assert np.array_equal(np.asarray(tensors["blk.1.attn_q.weight"].data).reshape(-1),
                          gguf.quants.quantize(q, Q.Q8_0).reshape(-1))
    assert tensors["blk.1.attn_norm.weight"].tensor_type == Q.F32
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    assert arch == "llama"
    assert int(reader.fields["llama.block_count"].parts[-1][0]) == model.config.num_hidden_layers
    n_tokens = len(reader.fields["tokenizer.ggml.tokens"].data)
    assert n_tokens == model.config.vocab_size
    assert {t["name"] for t in written.tensors} == set(tensors)


def test_unsupported_architecture_is_refused_before_writing(tmp_path):
    import shrink

    with pytest.raises(ValueError, match="Llama .* GPT-2|GPT-2"):
        write_gguf(shrink.load("minilm"), None, tmp_path / "x.gguf", "F32")
    assert not list(tmp_path.iterdir())


def test_unknown_type_is_refused(tiny, tmp_path):
    with pytest.raises(ValueError, match="Q4_K_M"):
        write_gguf(tiny[0], tiny[1], tmp_path / "x.gguf", "Q3_X")


def test_shrink_reads_back_what_it_writes(tiny, tmp_path):
    """Writer and reader are inverse: the model read from the file holds exactly the stored
    weights (the Q/K row order undone), and its tokenizer gives the same ids."""
    import shrink
    from shrink.export.verify import heldout_ids, reference_from_state, torch_logits
    from shrink.models.io import load_tokenizer

    model, tok = tiny
    for type_name in ("F32", "Q4_0"):
        path = tmp_path / f"m-{type_name}.gguf"
        written = write_gguf(model, tok, path, type_name)
        back = shrink.load(path)
        ids = heldout_ids(tok, 64)
        want = torch_logits(reference_from_state(model, written.state), ids)
        got = torch_logits(back, ids)
        assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want))
    text = "def main(argv):\n    return sorted(set(argv))  # ünïcode\n"
    assert load_tokenizer(path)(text)["input_ids"] == tok(text)["input_ids"]
