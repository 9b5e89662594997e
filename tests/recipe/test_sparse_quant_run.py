"""Quantizing after pruning keeps the sparsity in storage (issue 6): prune50-wanda+w4 stores
the kept weights' int4 codes and a bitmask, smaller than w4 by the bytes counted by hand, with
the outputs of the dense-codes model of the same codes; 2:4 + w4 stores N:M positions; the
compressed directory reloads bit-exactly; exports write the effective dense weight."""
from __future__ import annotations

import pytest
import torch

from shrink.export.dense import carried_layers, plain_copy
from shrink.models.compressed import load_compressed, save_compressed
from shrink.modules import SparseLinear, SparseQuantLinear
from shrink.recipe import compress
from shrink.recipe.records import model_nbytes
from shrink.surgery import replace_module
from tests_support import tiny_llama


@pytest.fixture(scope="module")
def llama():
    model = tiny_llama(hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 64, (4, 32), generator=g)} for _ in range(4)]
    held = torch.randint(0, 64, (2, 32), generator=g)
    return model, batches, held


@pytest.fixture(scope="module")
def runs(llama):
    model, batches, _ = llama
    return {r: compress(model, r, calibration=batches, measure_speed=False)
            for r in ("w4-rtn", "w4-gptq", "prune50-wanda+w4")}


def _quant_bytes(rec):
    return {l.name: l.bytes_stored for l in rec.layers}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_prune50_wanda_w4_stores_kept_codes_and_a_bitmask(runs):
    res = runs["prune50-wanda+w4"]
    layers = {n: m for n, m in res.model.named_modules() if isinstance(m, SparseQuantLinear)}
    assert len(layers) == 14 and not any(isinstance(m, SparseLinear) for m in res.model.modules())
    dense = _quant_bytes(runs["w4-gptq"].steps[0])
    assert dense == _quant_bytes(runs["w4-rtn"].steps[0])
    sparse = _quant_bytes(res.steps[1])
    for name, mod in layers.items():
        out_f, in_f = mod.out_features, mod.in_features
        scales = out_f * -(-in_f // 128) * 2 * 2                  # fp16 scale + zero-point per group of 128
        assert dense[name] == out_f * in_f // 2 + scales
        assert mod.layout == "bitmask" and mod.nnz == out_f * in_f // 2   # wanda: exactly 50% per layer
        assert sparse[name] == mod.nbytes == mod.nnz // 2 + out_f * in_f // 8 + scales
        d = mod.dense_weight()
        assert int((d == 0).sum()) >= out_f * in_f // 2 and bool((d[~mod.mask()] == 0).all())
    ratio = sum(sparse.values()) / sum(dense.values())
    # (0.25 + 0.125 + s) / (0.5 + s), s = the scales' bytes a weight
    s = sum(dense[n] - m.out_features * m.in_features // 2 for n, m in layers.items()) / sum(
        m.out_features * m.in_features for m in layers.values())
    assert ratio == pytest.approx((0.375 + s) / (0.5 + s), rel=1e-9) and ratio < 0.8
    saved = sum(dense.values()) - sum(sparse.values())
    assert runs["w4-gptq"].metrics["compressed"]["size_bytes"] - res.metrics["compressed"]["size_bytes"] == saved
    assert model_nbytes(res.model) == res.metrics["compressed"]["size_bytes"]
    assert all("bitmask" in l.format and "masked GPTQ" in l.note for l in res.steps[1].layers)


def test_outputs_equal_the_dense_codes_model(runs, llama):
    _, _, held = llama
    res = runs["prune50-wanda+w4"]
    dense = plain_copy(res.model)   # export's float copy: the effective weights
    codes = __import__("copy").deepcopy(res.model)
    for name, mod in list(codes.named_modules()):
        if isinstance(mod, SparseQuantLinear):   # the same codes stored dense, zero codes where pruned
            replace_module(codes, name, mod.dense_codes())
    assert not any(isinstance(m, SparseQuantLinear) for m in codes.modules())
    out = _logits(res.model, held)
    assert torch.equal(out, _logits(codes, held))
    assert (out - _logits(dense, held)).abs().max() < 0.01 * out.abs().max()   # down_proj: the bf16 int4 kernel
    for name, mod in res.model.named_modules():
        if isinstance(mod, SparseQuantLinear):
            assert torch.equal(dense.get_submodule(name).weight, mod.dense_weight())
    grids, _ = carried_layers(res.model)   # a GGUF writer carries dense codes: zero codes dequantize to 0
    name = "model.layers.0.mlp.down_proj"
    assert torch.equal(grids[name].dequantize(), res.model.get_submodule(name).dense_weight())


def test_save_and_load_bit_exact(runs, llama, tmp_path):
    _, _, held = llama
    res = runs["prune50-wanda+w4"]
    d = save_compressed(res.model, tmp_path / "m", base={"kind": "hf"})
    import json

    entry = json.loads((d / "manifest.json").read_text())["modules"]["model.layers.1.self_attn.q_proj"]
    assert entry["type"] == "SparseQuantLinear" and entry["layout"] == "bitmask" and entry["nnz"] == 2048
    again = load_compressed(d)
    a, b = res.model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert isinstance(again.get_submodule("model.layers.1.self_attn.q_proj"), SparseQuantLinear)
    assert torch.equal(_logits(again, held), _logits(res.model, held))
    assert model_nbytes(again) == model_nbytes(res.model)


def test_two_four_then_w4_uses_nm_positions(llama):
    model, batches, _ = llama
    res = compress(model, [{"prune": {"method": "wanda", "pattern": "2:4"}}, {"rtn": {"group_size": 32}}],
                   calibration=batches, measure_speed=False)
    layers = [m for m in res.model.modules() if isinstance(m, SparseQuantLinear)]
    assert len(layers) == 14 and all(m.layout == "nm" and (m.n, m.m) == (2, 4) for m in layers)
    for m in layers:
        slots = m.out_features * m.in_features // 2
        scales = m.out_features * (m.in_features // 32) * 4
        assert m.nbytes == slots // 2 + slots // 4 + scales        # 4-bit codes + 2-bit positions a slot
        assert m.kernel == "int4pack_cpu"
        d = m.dense_weight().view(m.out_features, -1, 4)
        assert int((d != 0).sum(-1).max()) <= 2
    assert all(l.format.endswith("+2:4") for l in res.steps[1].layers)


def test_sparsegpt_joint_quantization_stores_sparse_codes(llama):
    model, batches, _ = llama
    res = compress(model, "prune50-sparsegpt-w4", calibration=batches, measure_speed=False)
    layers = [m for m in res.model.modules() if isinstance(m, SparseQuantLinear)]
    assert len(layers) == 14 and all(abs(m.sparsity - 0.5) < 1e-9 for m in layers)
    assert all(int((m.dense_weight() == 0).sum()) >= m.nnz for m in layers)


def test_awq_and_rtn_after_pruning_keep_the_sparsity(llama):
    model, batches, _ = llama
    for q in ({"awq": {"group_size": 32}}, {"rtn": {"bits": 8, "group_size": None, "symmetric": True}}):
        res = compress(model, [{"prune": {"method": "magnitude", "sparsity": 0.5}}, q], calibration=batches,
                       measure_speed=False)
        layers = [m for m in res.model.modules() if isinstance(m, SparseQuantLinear)]
        assert len(layers) == 14 and all(bool((m.dense_weight()[~m.mask()] == 0).all()) for m in layers)
        assert all(l.format.endswith("+bitmask") for l in res.steps[1].layers)


def test_a_pattern_that_costs_more_than_it_saves_stays_dense(llama):
    model, batches, _ = llama
    res = compress(model, [{"prune": {"method": "magnitude", "sparsity": 0.5}}, {"rtn": {"bits": 2, "group_size": 32}}],
                   measure_speed=False)   # 2-bit codes at 50%: the 1-bit mask saves nothing
    assert not any(isinstance(m, SparseQuantLinear) for m in res.model.modules())
    assert all("stored dense" in l.note for l in res.steps[1].layers)
