"""ONNX export: dynamic axes, shrink's codes carried as QDQ int8 / MatMulNBits 4-bit (Gemm
included), agreement with shrink's model in ONNX Runtime, and the reader's refusals."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import shrink  # noqa: E402
from shrink.export.dense import Grid, carried_layers, plain_copy  # noqa: E402
from shrink.export.onnx import TOLERANCES, export_onnx, verify_onnx  # noqa: E402
from shrink.export.onnx_quant import nbits_tensors  # noqa: E402
from shrink.export.verify import VerificationError  # noqa: E402
from shrink.models.io import load_tokenizer  # noqa: E402
from shrink.modules import QuantLinear  # noqa: E402
from shrink.quant import QuantSpec  # noqa: E402


def _ops(path) -> dict[str, int]:
    out: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        out[node.op_type] = out.get(node.op_type, 0) + 1
    return out


def _inits(path) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


@pytest.fixture(scope="module")
def gpt():
    return shrink.load("tiny-gpt"), load_tokenizer("tiny-gpt")


@pytest.fixture(scope="module")
def minilm():
    return shrink.load("minilm"), load_tokenizer("minilm")


@pytest.fixture(scope="module")
def gpt_file(gpt, tmp_path_factory):
    model, tok = gpt
    path = tmp_path_factory.mktemp("gpt") / "tiny-gpt.onnx"
    info = export_onnx(model, path, tokenizer=tok, source="tiny-gpt")
    return path, info


# ----------------------------------------------------------------------------- fp32

def test_fp32_causal_lm_matches_shrink_with_dynamic_axes(gpt, gpt_file):
    model, tok = gpt
    path, info = gpt_file
    assert info["kind"] == "causal-lm" and info["inputs"] == ["input_ids", "attention_mask"]
    assert info["quantized"] == {} and info["float_layers"] == {}
    report = verify_onnx(path, model, tok)
    r = report["vs_stored_weights"]
    assert r["rel_rmse"] < 1e-4 and r["top1_agreement"] == 1.0 and report["passed"]
    assert report["latency"]["onnxruntime_batch1_ms"] > 0
    assert [b for b in r["batches"]] == [[1, 256], [2, 128]]
    ort_model = shrink.load(str(path))
    for shape in [(1, 5), (3, 40)]:   # batch and sequence differ from the export's example (2, 16)
        ids = torch.randint(1, model.config.vocab_size, shape, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ref = model(input_ids=ids, use_cache=False).logits
        got = ort_model(input_ids=ids).logits
        assert got.shape == ref.shape
        assert float((got - ref).norm() / ref.norm()) < 1e-4


def test_fp32_encoder_matches_shrink(minilm, tmp_path):
    model, tok = minilm
    info = export_onnx(model, tmp_path / "minilm.onnx", tokenizer=tok, source="minilm")
    assert info["kind"] == "encoder"
    assert info["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    report = verify_onnx(info["path"], model, tok)
    r = report["vs_stored_weights"]
    assert r["rel_rmse"] < 1e-4 and r["min_cosine"] > 0.99999
    assert r["batches"][0][0] == 1 and r["batches"][1][0] > 1 and r["batches"][0][1] != r["batches"][1][1]
    ort_model = shrink.load(info["path"])
    batch = dict(tok(["a short one", "and a somewhat longer sentence than the first"], padding=True,
                     return_tensors="pt"))
    with torch.no_grad():
        ref = model(**batch).last_hidden_state
    got = ort_model(**batch).last_hidden_state
    keep = batch["attention_mask"].bool()
    assert float((got[keep] - ref[keep]).norm() / ref[keep].norm()) < 1e-4


# ----------------------------------------------------------------------------- carried codes

def _quantized(model: nn.Module, spec: QuantSpec, keep_layers: int | None = None) -> nn.Module:
    """A copy of `model` with the Linears of its blocks quantized by shrink (round to nearest)."""
    import copy

    from shrink.surgery import replace_module

    q = copy.deepcopy(model)
    if keep_layers is not None:   # a shorter encoder: the same layers, fewer of them, a faster export
        q.encoder.layer = q.encoder.layer[:keep_layers]
        q.config.num_hidden_layers = keep_layers
    names = [n for n, m in q.named_modules() if isinstance(m, nn.Linear) and ".layer" in n]
    for name in names:
        replace_module(q, name, QuantLinear.from_linear(q.get_submodule(name), spec))
    return q.eval()


def test_int8_carried_as_qdq_with_shrinks_codes(gpt, tmp_path):
    model, tok = gpt
    q = _quantized(model, SPECS["int8-sym-channel"])
    grids, _ = carried_layers(q)
    assert len(grids) == 28
    info = export_onnx(q, tmp_path / "int8.onnx", tokenizer=tok)
    assert set(info["quantized"]) == set(grids) and not info["float_layers"]
    assert all(v["op"] == "DequantizeLinear" for v in info["quantized"].values())
    ops, inits = _ops(info["path"]), _inits(info["path"])
    assert ops["DequantizeLinear"] == len(grids)
    for name, grid in grids.items():   # the file holds shrink's codes, not a second rounding
        codes = inits[f"{name}.wT.qweight"]
        assert codes.dtype == np.int8 and np.array_equal(codes.T, grid.codes.numpy())
        assert np.array_equal(inits[f"{name}.wT.scales"], grid.scale.float().numpy().reshape(-1))
    report = verify_onnx(info["path"], q, tok, n_tokens=128)
    assert report["vs_stored_weights"]["rel_rmse"] < TOLERANCES["causal-lm"]["max_rel_rmse"]
    assert report["vs_stored_weights"]["top1_agreement"] >= 0.99
    assert report["vs_shrink_model"]["top1_agreement"] >= 0.95   # shrink's bf16 int8 kernel


def test_int4_biased_linears_become_matmulnbits(minilm, tmp_path):
    model, tok = minilm
    spec = QuantSpec(bits=4, symmetric=False, granularity="group", group_size=32)
    q = _quantized(model, spec, keep_layers=2)
    q.pooler.dense = QuantLinear.from_linear(q.pooler.dense, spec)
    grids, _ = carried_layers(q)
    assert len(grids) == 2 * 6 + 1
    info = export_onnx(q, tmp_path / "int4.onnx", tokenizer=tok, source="minilm")
    assert info["unused_layers"] == ["pooler.dense"]   # last_hidden_state does not use the pooler
    assert not info["float_layers"]
    carried = set(grids) - set(info["unused_layers"])
    assert set(info["quantized"]) == carried
    ops = _ops(info["path"])
    assert ops["MatMulNBits"] == len(carried) and "DequantizeLinear" not in ops
    floats = [onnx.numpy_helper.to_array(t) for t in onnx.load(info["path"]).graph.initializer
              if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2]
    plain = dict(plain_copy(q).named_modules())
    for name in carried:   # no float copy of a carried weight is left in the file
        w = plain[name].weight.detach().numpy()
        assert not any(f.shape in (w.shape, w.T.shape) and (np.array_equal(f, w) or np.array_equal(f, w.T))
                       for f in floats)
    report = verify_onnx(info["path"], q, tok)
    assert report["vs_stored_weights"]["min_cosine"] > 0.99999 and report["vs_stored_weights"]["rel_rmse"] < 1e-4
    assert report["vs_shrink_model"]["mean_cosine"] > 0.999


class _Mlp(nn.Sequential):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        super().__init__(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


SPECS = {
    "int4-sym-g32": QuantSpec(bits=4, symmetric=True, granularity="group", group_size=32),
    "int4-asym-channel": QuantSpec(bits=4, symmetric=False, granularity="channel"),
    "int3-asym-g16": QuantSpec(bits=3, symmetric=False, granularity="group", group_size=16),
    "int8-asym-g32": QuantSpec(bits=8, symmetric=False, granularity="group", group_size=32),
    "int8-sym-channel": QuantSpec(bits=8, symmetric=True, granularity="channel"),
}


@pytest.mark.parametrize("spec_name", list(SPECS))
def test_gemm_layers_are_carried_exactly(spec_name, tmp_path):
    float_model = _Mlp().eval()
    plain = export_onnx(float_model, tmp_path / "float.onnx")
    assert _ops(plain["path"]).get("Gemm") == 2   # a Linear with a bias on 2-D input is a Gemm
    model = _Mlp().eval()
    for i in (0, 2):
        model[i] = QuantLinear.from_linear(model[i], SPECS[spec_name])
    info = export_onnx(model, tmp_path / "q.onnx")
    assert set(info["quantized"]) == {"0", "2"} and not info["float_layers"]
    ops = _ops(info["path"])
    assert "Gemm" not in ops or ops.get("DequantizeLinear") == 2
    expected = "DequantizeLinear" if SPECS[spec_name].bits == 8 else "MatMulNBits"
    assert ops.get(expected) == 2
    x = torch.rand(37, 64, generator=torch.Generator().manual_seed(2))
    report = verify_onnx(info["path"], model, inputs=x)
    assert report["vs_stored_weights"]["rel_rmse"] < 1e-5 and report["vs_stored_weights"]["agreement"] == 1.0


CARRY_SPECS = {
    **SPECS,
    "int2-sym-g16": QuantSpec(bits=2, symmetric=True, granularity="group", group_size=16),
    "int4-asym-g48": QuantSpec(bits=4, symmetric=False, granularity="group", group_size=48),   # blocks of 16
    "int6-sym-g48": QuantSpec(bits=6, symmetric=True, granularity="group", group_size=48),
}


@pytest.mark.parametrize("spec_name", list(CARRY_SPECS))
def test_carry_into_a_matmul_graph(spec_name):
    """On a MatMul reading the transposed weight (how torch exports a Linear on 3-D input), the
    rewritten graph computes x @ W_hat.T with shrink's W_hat, in ONNX Runtime, bit for bit up
    to float32 summation order."""
    from onnx import TensorProto, helper, numpy_helper

    from shrink.export.onnx_quant import carry

    g = torch.Generator().manual_seed(5)
    k, n = 96, 40
    lin = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * 0.1)
    ql = QuantLinear.from_linear(lin, CARRY_SPECS[spec_name])
    grids, _ = carried_layers(nn.Sequential(ql))
    w = ql.dequantized_weight().float().numpy()
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "wT"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", n])],
        [numpy_helper.from_array(np.ascontiguousarray(w.T), "wT")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    carried, why_not, unused = carry(proto, {"0": w}, grids, 21)
    assert list(carried) == ["0"] and not why_not and not unused
    assert carried["0"]["op"] == ("DequantizeLinear" if CARRY_SPECS[spec_name].bits > 4 else "MatMulNBits")
    assert [t.name for t in proto.graph.initializer if t.name == "wT"] == []   # the float copy is gone
    onnx.checker.check_model(proto)
    options = ort.SessionOptions()   # as verify_onnx's exact session: ORT's own DQ+MatMul fusion
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")   # must not quantize x
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = torch.randn(2, 7, k, generator=g)
    got = session.run(None, {"x": x.numpy()})[0]
    ref = (x @ torch.from_numpy(w).T).numpy()
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


def test_matmulnbits_layout_is_onnxruntimes():
    """ONNX Runtime's own 4-bit packer, read back into a Grid, packs to the same bytes."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    k, n, block = 96, 5, 32
    w = np.random.default_rng(0).standard_normal((k, n)).astype(np.float32)
    blocks = k // block
    packed = np.zeros((n, blocks, block // 2), np.uint8)
    scales = np.zeros((n, blocks), np.float32)
    zp = np.zeros((n, (blocks + 1) // 2), np.uint8)
    quantize_matmul_4bits(packed, w, scales, zp, block, n, k, False)
    codes = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(n, k)
    zeros = np.stack([zp & 0xF, zp >> 4], axis=-1).reshape(n, -1)[:, :blocks]
    grid = Grid(torch.from_numpy(codes.astype(np.int32)), torch.from_numpy(scales),
                torch.from_numpy(zeros.astype(np.float32)), 4, block)
    b, s, z = nbits_tensors(grid, block)
    assert np.array_equal(b, packed) and np.array_equal(s, scales.reshape(-1)) and np.array_equal(z, zp.reshape(-1))


# ----------------------------------------------------------------------------- load, eval, refusals

def test_load_and_cli_eval(gpt, gpt_file, capsys):
    from shrink.cli import main
    from shrink.data.corpus import stdlib_corpus
    from shrink.eval.quality import perplexity_metric

    model, tok = gpt
    path, _ = gpt_file
    m = shrink.load(str(path))
    assert m.kind == "causal-lm" and m.stored_nbytes == path.stat().st_size
    assert type(load_tokenizer(str(path))).__name__ == type(tok).__name__
    assert main(["eval", str(path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["source_model"] == "tiny-gpt" and doc["size_bytes"] == path.stat().st_size
    assert doc["params"] == sum(p.numel() for p in model.parameters())
    q = doc["quality"]
    metric = perplexity_metric(tok, stdlib_corpus(max_train_chars=1, max_heldout_chars=400_000).heldout_texts,
                               seq_len=128, max_tokens=16384)
    assert q["name"] == "perplexity" and q["value"] == pytest.approx(metric(model)["value"], rel=1e-4)


def _damaged(src, dst, data: bytes, sidecar: bool):
    dst.write_bytes(data)
    if sidecar:
        side = src.with_name(src.name + ".json")
        dst.with_name(dst.name + ".json").write_bytes(side.read_bytes())
    return dst


@pytest.mark.parametrize("sidecar", [True, False])
def test_truncated_or_corrupt_files_are_refused(gpt_file, tmp_path, sidecar):
    path, _ = gpt_file
    data = path.read_bytes()
    cases = [data[:n] for n in (0, 1, 7, 300, len(data) // 3, len(data) - 50)]
    rng = np.random.default_rng(0)
    for at in (0, 3, 40, 200, len(data) // 2, len(data) - 20):
        b = bytearray(data)
        b[at] ^= 0xFF if at % 2 else int(rng.integers(1, 256))
        cases.append(bytes(b))
    for i, bad in enumerate(cases):
        f = _damaged(path, tmp_path / f"bad{i}.onnx", bad, sidecar)
        try:
            shrink.load(str(f))
        except ValueError as e:
            assert str(f) in str(e)
        else:   # without the export's checksum a flipped weight byte can go unnoticed, nothing else
            assert not sidecar and len(bad) == len(data), f"case {i} loaded"
    f = _damaged(path, tmp_path / "cut.onnx", data[:len(data) // 3], False)
    with pytest.raises(ValueError, match=r"offset \d+"):
        shrink.load(str(f))


def test_cli_refuses_corrupt_file_with_exit_2(gpt_file, tmp_path, capsys):
    from shrink.cli import main

    path, _ = gpt_file
    f = _damaged(path, tmp_path / "half.onnx", path.read_bytes()[: path.stat().st_size // 2], True)
    assert main(["eval", str(f)]) == 2
    err = capsys.readouterr().err
    assert str(f) in err and "Traceback" not in err


def test_refused_up_front(gpt, tmp_path):
    model, _ = gpt
    with pytest.raises(ValueError, match="ending in .onnx"):
        export_onnx(model, tmp_path / "x.bin")
    with pytest.raises(ValueError, match="quant"):
        export_onnx(model, tmp_path / "x.onnx", quant="int5")
    with pytest.raises(ValueError, match="cannot tell this model's input"):
        export_onnx(nn.Sequential(nn.ReLU()), tmp_path / "x.onnx")
    import transformers

    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32)
    with pytest.raises(ValueError, match="task head"):
        export_onnx(transformers.BertForSequenceClassification(cfg), tmp_path / "x.onnx")
    assert not list(tmp_path.iterdir())


def test_disagreement_fails_verification(gpt, gpt_file):
    model, tok = gpt
    path, _ = gpt_file
    other = plain_copy(model)
    with torch.no_grad():
        other.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    with pytest.raises(VerificationError, match="disagrees"):
        verify_onnx(path, other, tok)


def test_quantize_on_export_and_external_data(tmp_path, monkeypatch):
    """quant="int4" on a float model rounds it with shrink's RTN first (verify does it again);
    past the 2 GB protobuf limit (lowered here) the weights go to PATH.data beside the file."""
    import shrink.export.onnx as onnx_export

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 1)
    model = _Mlp().eval()
    info = export_onnx(model, tmp_path / "mlp.onnx", quant="int4")
    assert info["quantized_by_export"] == {"rtn": {"bits": 4, "group_size": 32, "symmetric": False}}
    assert _ops(info["path"]).get("MatMulNBits") == 2
    assert info["external_data"] == "mlp.onnx.data" and (tmp_path / "mlp.onnx.data").is_file()
    x = torch.rand(9, 64, generator=torch.Generator().manual_seed(3))
    report = verify_onnx(info["path"], model, inputs=x)
    assert report["vs_stored_weights"]["rel_rmse"] < 1e-5
    data = tmp_path / "mlp.onnx.data"
    data.write_bytes(data.read_bytes()[:-4])
    with pytest.raises(ValueError, match="mlp.onnx.data"):
        shrink.load(info["path"])
