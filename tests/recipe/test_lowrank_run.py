"""The lowrank step end to end through shrink.compress: ranks chosen by energy / fixed rank /
budget against a float64 reference spectrum, layers that would not shrink left dense with
the reason, GPT-2's transposed Conv1D weights, Conv2d skipped, a fine-tune after, the
composition with a later int8 step, save/reload bit-exact, export to transformers, the
report, and a rank too large named with its layer."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from shrink import calc
from shrink.export.dense import plain_copy
from shrink.models.compressed import load_compressed, save_compressed
from shrink.modules import LowRankLinear, QuantLinear
from shrink.recipe import compress
from shrink.recipe.records import model_nbytes, model_params
from shrink.report.html import steps_section
from tests_support import tiny_gpt2, tiny_llama


def _batches(vocab=64, n=4, seq=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (2, seq), generator=g)} for _ in range(n)]


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _low_rank_weights(model: nn.Module, rank: int, seed: int = 0) -> nn.Module:
    """Give every Linear a fast-decaying spectrum (a rank-`rank` matrix plus small noise), as
    trained weights with a low effective rank would have."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.weight.shape[0] < 64:   # not the head (vocab rows)
                o, i = m.weight.shape
                m.weight.copy_(torch.randn(o, rank, generator=g) @ torch.randn(rank, i, generator=g) / rank
                               + 1e-3 * torch.randn(o, i, generator=g))
    return model


@pytest.fixture(scope="module")
def llama():
    return _low_rank_weights(tiny_llama(), rank=4)


def test_energy_picks_the_reference_rank_and_error_is_the_discarded_energy(llama):
    res = compress(llama, [{"lowrank": {"energy": 0.95}}], measure_speed=False)
    details = res.steps[0].details["lowrank"]
    originals = dict(llama.named_modules())
    assert details["criterion"] == "energy" and details["factorized"] == len(res.steps[0].layers) == 21
    for e in details["layers"]:
        w = originals[e["layer"]].weight.detach().double()
        sigma = torch.linalg.svdvals(w)
        assert e["rank"] == calc.rank_for_energy(sigma.tolist(), 0.95) <= 4
        assert len(e["energy"]) == len(e["ranks"]) <= 64 and e["rank"] in e["ranks"]
        new = res.model.get_submodule(e["layer"])
        assert isinstance(new, LowRankLinear) and new.rank == e["rank"]
        direct = float(((new.dense_weight().detach().double() - w) ** 2).sum())
        discarded = float((sigma[e["rank"]:] ** 2).sum())
        assert direct == pytest.approx(discarded, rel=1e-3, abs=1e-9)          # Eckart-Young, float32 factors
        assert e["relative_error"] == pytest.approx(math.sqrt(discarded / float((sigma ** 2).sum())), rel=1e-3)
    rec = res.steps[0].layers[0]
    assert rec.format == f"lowrank-r{details['layers'][0]['rank']}" and "energy" not in rec.format
    assert rec.bytes_stored == details["layers"][0]["rank"] * sum(rec.shape) * 4
    # sizes: the model shrank by exactly the factorized weights
    saved = sum(o * i - e["rank"] * (o + i) for e in details["layers"] for o, i in [e["shape"]])
    assert model_params(llama) - model_params(res.model) == saved
    assert model_nbytes(llama) - model_nbytes(res.model) == 4 * saved
    # the model computes what the original computes with each weight replaced by its truncation
    ref = copy.deepcopy(llama)
    with torch.no_grad():
        for e in details["layers"]:
            ref.get_submodule(e["layer"]).weight.copy_(res.model.get_submodule(e["layer"]).dense_weight())
    b = _batches()[0]
    assert torch.allclose(_logits(res.model, b), _logits(ref, b), atol=1e-5)
    assert not torch.allclose(_logits(res.model, b), _logits(llama, b), atol=1e-5)


def test_flat_spectra_stay_dense_with_the_reason():
    model = tiny_llama()   # random weights: flat spectra, 99% of the energy needs nearly every rank
    res = compress(model, [{"lowrank": {"energy": 0.99}}], measure_speed=False)
    rec = res.steps[0]
    assert rec.details["lowrank"]["factorized"] == 0 and not rec.layers
    reasons = [s["reason"] for s in rec.skipped if "break-even" in s["reason"]]
    assert len(reasons) == 21 and "not fewer than the matrix's" in reasons[0]
    assert not any(isinstance(m, LowRankLinear) for m in res.model.modules())
    assert model_params(res.model) == model_params(model)


def test_fixed_rank_and_budget(llama):
    res = compress(llama, [{"lowrank": {"rank": 3}}], measure_speed=False)
    assert {m.rank for m in res.model.modules() if isinstance(m, LowRankLinear)} == {3}
    res = compress(llama, [{"lowrank": {"keep": 0.25}}], measure_speed=False)
    for e in res.steps[0].details["lowrank"]["layers"]:
        o, i = e["shape"]
        assert e["rank"] * (o + i) <= 0.25 * o * i < (e["rank"] + 1) * (o + i)


def test_a_rank_too_large_names_the_layer(llama):
    with pytest.raises(ValueError, match=r"rank 17 is larger than layer model\.layers\.0\.self_attn\.k_proj "
                                         r"\(16x32\) allows \(at most min\(out, in\) = 16\)"):
        compress(llama, [{"lowrank": {"rank": 17}}], measure_speed=False)
    with pytest.raises(ValueError, match="no dense Linear or Conv1D layer"):
        compress(llama, [{"lowrank": {"rank": 2, "include": ["nothing.*"]}}], measure_speed=False)


def test_gpt2_conv1d_is_factorized_in_its_own_layout_and_exports_to_transformers(tmp_path):
    from transformers import GPT2LMHeadModel

    model = _low_rank_weights(tiny_gpt2(), rank=4)
    with torch.no_grad():   # Conv1D [in, out] weights with a low rank too
        g = torch.Generator().manual_seed(3)
        for m in model.modules():
            if type(m).__name__ == "Conv1D":
                i, o = m.weight.shape
                m.weight.copy_(torch.randn(i, 4, generator=g) @ torch.randn(4, o, generator=g) / 4
                               + 1e-3 * torch.randn(i, o, generator=g))
    res = compress(model, [{"lowrank": {"energy": 0.99}}], measure_speed=False)
    lr = [n for n, m in res.model.named_modules() if isinstance(m, LowRankLinear)]
    assert "transformer.h.0.attn.c_attn" in lr and res.model.get_submodule(lr[0]).source == "conv1d"
    # the reference: each Conv1D's [in, out] weight replaced by the truncation of W = weight.T
    ref = GPT2LMHeadModel(model.config).eval()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for n in lr:
            ref.get_submodule(n).weight.copy_(res.model.get_submodule(n).dense_weight().t())
    b = _batches()[0]
    assert torch.allclose(_logits(res.model, b), _logits(ref, b), atol=1e-5)
    # exported: plain Conv1D layers, loaded by transformers alone, same outputs
    plain_copy(res.model).save_pretrained(tmp_path / "hf")
    back = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert type(back.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    assert torch.allclose(_logits(back, b), _logits(res.model, b), atol=1e-4)


def test_lowrank_then_int8_composes_saves_reloads_and_exports(llama, tmp_path):
    from transformers import LlamaForCausalLM

    res = compress(llama, [{"lowrank": {"energy": 0.95}}, {"rtn": {"bits": 8, "group_size": None,
                                                                    "symmetric": True}}], measure_speed=False)
    lr = res.model.model.layers[0].mlp.up_proj
    assert isinstance(lr, LowRankLinear) and isinstance(lr.up, QuantLinear) and isinstance(lr.down, QuantLinear)
    assert {l.name for l in res.steps[1].layers} >= {"model.layers.0.mlp.up_proj.up", "model.layers.0.mlp.up_proj.down"}
    assert model_nbytes(res.model) < model_nbytes(compress(llama, [{"lowrank": {"energy": 0.95}}],
                                                           measure_speed=False).model)
    d = save_compressed(res.model, tmp_path / "c", base={"kind": "hf"})
    back = load_compressed(d)
    assert isinstance(back.model.layers[0].mlp.up_proj.up, QuantLinear)
    b = _batches()[0]
    assert torch.equal(_logits(back, b), _logits(res.model, b))
    sd, sd2 = res.model.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    # the export multiplies the dequantized factors out: one Linear per layer, transformers agrees
    plain = plain_copy(res.model)
    w = plain.model.layers[0].mlp.up_proj.weight
    assert torch.allclose(w, lr.dense_weight().detach(), atol=1e-6)
    plain.save_pretrained(tmp_path / "hf")
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert torch.allclose(_logits(hf, b), _logits(plain, b), atol=1e-5)
    y_hf, y = _logits(hf, b), _logits(res.model, b)   # shrink's int8 kernel runs its activations in bf16
    assert float(((y_hf - y) ** 2).mean().sqrt() / (y ** 2).mean().sqrt()) < 0.1


def test_plain_lowrank_reloads_bit_exactly(llama, tmp_path):
    res = compress(llama, [{"lowrank": {"keep": 0.3}}], measure_speed=False)
    d = save_compressed(res.model, tmp_path / "c", base={"kind": "hf"})
    back = load_compressed(d)
    b = _batches()[0]
    assert torch.equal(_logits(back, b), _logits(res.model, b))
    assert model_nbytes(back) == model_nbytes(res.model)


def test_finetune_after_factorizing_recovers(llama):
    batches = _batches(n=4)
    ref = [_logits(llama, b) for b in batches]

    def gap(model):
        value = sum(float(((_logits(model, b) - r) ** 2).mean()) for b, r in zip(batches, ref)) / len(batches)
        return {"name": "logit mse", "value": value, "higher_is_better": False}

    res = compress(llama, [{"lowrank": {"rank": 2, "finetune": {"steps": 20, "lr": 3e-3}}}], calibration=batches,
                   evaluate=gap, measure_speed=False)
    d = res.steps[0].details
    assert d["training"]["steps_run"] == 20 and d["training"]["loss"] == "distill"
    before, after = d["quality_before_finetune"]["value"], res.metrics["compressed"]["quality"]["value"]
    assert after < 0.7 * before
    assert {m.rank for m in res.model.modules() if isinstance(m, LowRankLinear)} == {2}   # factors trained, rank kept
    with pytest.raises(ValueError, match="calibration"):
        compress(llama, [{"lowrank": {"rank": 2, "finetune": {"steps": 5}}}], measure_speed=False)


def test_conv2d_is_skipped_with_a_reason():
    from shrink.models.io import load

    res = compress(load("digits-cnn"), [{"lowrank": {"keep": 0.5}}], measure_speed=False)
    conv = [s for s in res.steps[0].skipped if "Conv2d" in s["reason"]]
    assert conv and "k x k conv" in conv[0]["reason"]
    assert res.steps[0].layers and all(l.format.startswith("lowrank-r") for l in res.steps[0].layers)


def test_report_shows_ranks_and_energy_curves(llama):
    res = compress(llama, [{"lowrank": {"energy": 0.9}}], measure_speed=False)
    html = steps_section([res.steps[0].to_dict()])
    assert "lowrank-ranks" in html and "break-even rank" in html
    assert html.count('data-plot="svd-energy"') == 1 and html.count('data-mark="kept"') == 4
    assert "21 of 21 layers factorized" in html
