"""Latency and the energy estimate: counts against hand computation, and the
four ratios that compress() reports."""
from __future__ import annotations

import time

import pytest
import torch
from torch import nn

import shrink
from shrink.eval.energy import PJ_PER_DRAM_BYTE, PJ_PER_MAC, energy_estimate
from shrink.eval.latency import batch_rows, first_rows, latency_metric, latency_probe, measure_latency
from shrink.modules import QuantLinear
from shrink.modules.w8a8_linear import W8A8Linear
from shrink.quant import QuantSpec, quantize


class _Sleepy(nn.Module):
    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds
        self.lin = nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        time.sleep(self.seconds)
        return self.lin(x)


def test_latency_runs_warmup_plus_runs_and_reports_the_median():
    m = _Sleepy(0.004)
    m.train()
    r = measure_latency(m, torch.randn(3, 4), warmup=2, runs=5)
    assert m.calls == 7 and m.training  # training mode restored
    assert r["runs"] == 5 and r["batch_size"] == 3
    assert 4.0 <= r["min_ms"] <= r["median_ms"] <= r["max_ms"]
    with pytest.raises(ValueError, match="runs >= 1"):
        measure_latency(m, torch.randn(3, 4), runs=0)


def test_probe_slices_every_batch_shaped_tensor():
    batch = {"input_ids": torch.arange(40).reshape(10, 4), "attention_mask": torch.ones(10, 4),
             "position_bias": torch.zeros(4)}
    probe = latency_probe(batch, batched=8)
    assert probe["batch1"]["input_ids"].tolist() == [[0, 1, 2, 3]]
    assert probe["batched"]["attention_mask"].shape == (8, 4)
    assert probe["batched"]["position_bias"].shape == (4,)  # not a batch dimension: kept whole
    assert batch["input_ids"].shape == (10, 4)  # the input is not modified
    assert first_rows((torch.zeros(5, 2), "x"), 2)[0].shape == (2, 2)
    assert batch_rows(torch.zeros(6, 3)) == 6
    with pytest.raises(ValueError, match="no tensor with a batch dimension"):
        batch_rows({"flag": True})


def test_latency_metric_measures_both_sizes():
    m = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    out = latency_metric(m, latency_probe(torch.randn(20, 16)), runs=3)
    assert out["latency_ms"] == out["batch1"]["median_ms"] > 0
    assert out["batch1"]["batch_size"] == 1 and out["batched"]["batch_size"] == 8
    assert out["device"] == "cpu" and out["threads"] == torch.get_num_threads()


def test_energy_counts_macs_and_bytes_as_by_hand():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    x = torch.randn(3, 64)
    e = energy_estimate(m, x)
    macs = 3 * 64 * 32 + 3 * 32 * 10
    nbytes = 4 * (64 * 32 + 32 + 32 * 10 + 10)
    assert e["macs"] == {"fp32": macs} and e["weight_bytes"] == nbytes and e["layers"] == 2
    want = (nbytes * PJ_PER_DRAM_BYTE + macs * PJ_PER_MAC["fp32"]) * 1e-12
    assert e["joules"] == pytest.approx(want, rel=1e-12)
    assert f"{nbytes:,} weight bytes" in e["derivation"] and "Horowitz" in e["constants"]["source"]


def test_energy_of_quantized_and_conv_layers():
    torch.manual_seed(1)
    lin = nn.Linear(128, 64)
    q4 = QuantLinear.from_qtensor(quantize(lin.weight.detach(), QuantSpec.from_name("int4-g128")), lin.bias.detach())
    w8 = W8A8Linear.from_linear(lin)
    x = torch.randn(5, 128)
    e4, e8 = energy_estimate(q4, x), energy_estimate(w8, x)
    assert e4["macs"] == {"fp16": 5 * 128 * 64}  # int4pack_cpu computes in bf16
    assert e4["weight_bytes"] == q4.nbytes + 64 * 4
    assert e8["macs"] == {"int8": 5 * 128 * 64}
    ref = QuantLinear.from_qtensor(q4.to_qtensor(), kernel="reference")
    assert energy_estimate(ref, x)["macs"] == {"fp32": 5 * 128 * 64}
    conv = nn.Conv2d(4, 6, kernel_size=3, padding=1, groups=2)
    ec = energy_estimate(conv, torch.randn(2, 4, 5, 5))
    assert ec["macs"] == {"fp32": 2 * 6 * 5 * 5 * (4 // 2) * 3 * 3}


def test_energy_counts_gpt2_conv1d():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2)
    torch.manual_seed(2)
    m = transformers.GPT2LMHeadModel(cfg).eval()
    e = energy_estimate(m, torch.randint(0, 64, (1, 7)))
    d = 32
    per_token = d * 3 * d + d * d + d * 4 * d + 4 * d * d + d * 64  # c_attn, c_proj, c_fc, mlp c_proj, lm_head
    assert e["macs"] == {"fp32": 7 * per_token} and e["layers"] == 5


def test_compress_reports_the_four_ratios():
    model = shrink.load("digits-mlp")
    from shrink.models.digits import digits_data

    split = digits_data()
    from shrink.eval.quality import accuracy_metric

    metric = accuracy_metric(split.x_test, split.y_test)
    res = shrink.compress(model, "int8", calibration=[split.x_train[:64]], evaluate=metric)
    b, c, r = res.metrics["baseline"], res.metrics["compressed"], res.metrics["ratios"]
    assert b["latency_ms"] > 0 and c["latency_ms"] > 0 and b["latency"]["batched"]["batch_size"] == 8
    assert r["R"] == pytest.approx(b["size_bytes"] / c["size_bytes"]) == res.metrics["size_reduction"]
    assert r["A"] == pytest.approx(c["quality"]["value"] / b["quality"]["value"]) and r["A"] > 0.97
    assert r["L"] == pytest.approx(b["latency_ms"] / c["latency_ms"])
    # int8 weights: a quarter of the bytes and bf16 arithmetic instead of fp32
    assert r["E"] == pytest.approx(b["energy"]["joules"] / c["energy"]["joules"]) and r["E"] > 2.5
    quiet = shrink.compress(model, "int8", measure_speed=False)
    assert "latency_ms" not in quiet.metrics["compressed"] and quiet.metrics["ratios"]["L"] is None
