"""The planner (`shrink.plan(...)`): stored bytes per format, KV cache, fit, decode bounds.

Every figure is checked against a reference that does not share the planner's code
path: real tensors quantized with `shrink.quant.quantize` (their `.nbytes`), real
transformers models (`sum(p.numel())`), hand-written KV formulas, the calc module's
documented roofline convention, and the seeds' worked examples.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

import shrink
from shrink.plan import DEVICES, Device, custom_device, from_hf_config, get_device, get_preset
from shrink.plan.formats import DEFAULT_FORMATS
from shrink.quant import QuantSpec, quantize

GiB = 2**30

# --- tiny architectures -------------------------------------------------------------------
# hidden 192 and MLP 320 are not multiples of 128 or 64: the last group of each row is short
# (ceil), which is where a sloppy metadata count goes wrong.
TINY = {
    "llama": {"model_type": "llama", "vocab_size": 100, "hidden_size": 192, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 320,
              "max_position_embeddings": 64},
    "phi3": {"model_type": "phi3", "vocab_size": 100, "hidden_size": 192, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 320,
             "max_position_embeddings": 64},
    "gpt2": {"model_type": "gpt2", "vocab_size": 100, "n_embd": 192, "n_layer": 2, "n_head": 4,
             "n_positions": 64},
    "bert": {"model_type": "bert", "vocab_size": 100, "hidden_size": 192, "num_hidden_layers": 2,
             "num_attention_heads": 4, "intermediate_size": 320, "max_position_embeddings": 64},
}
# the defaults plus per-channel / ungrouped / other-grouped variants
FORMATS = tuple(DEFAULT_FORMATS) + ("int4", "nf4", "int3", "fp8-e5m2", "int8-g32")


def _quantized_reference_bytes(arch, fmt: str) -> int:
    """Sum of QTensor.nbytes over real random tensors of every weight matrix's shape, the
    embedding table included; norms, biases and positions at 2 bytes (4 for fp32)."""
    spec = QuantSpec.from_name(fmt)
    g = torch.Generator().manual_seed(0)
    total = 0
    for s in arch.linear_shapes():
        w = torch.randn(s.out_features, s.in_features, generator=g)
        total += quantize(w, spec).nbytes * s.count
    total += quantize(torch.randn(arch.vocab_size, arch.hidden_size, generator=g), spec).nbytes
    total += arch.other_params() * (4 if fmt == "fp32" else 2)
    return total


@pytest.fixture(scope="module", params=sorted(TINY))
def tiny(request):
    arch = from_hf_config(TINY[request.param], name=f"tiny-{request.param}")
    return arch, shrink.plan(arch, formats=list(FORMATS), context=16)


@pytest.mark.parametrize("fmt", FORMATS)
def test_weight_bytes_equal_quantized_tensors_nbytes(tiny, fmt):
    arch, plan = tiny
    assert plan.format(fmt).weight_bytes == _quantized_reference_bytes(arch, fmt)


def test_tiny_llama_anchor_by_hand():
    """One case fully by hand: [out, in] shapes of the tiny llama, int4-g128, asymmetric
    (scale + zero-point, fp16 each, per group of 128 along `in`, last group short)."""
    arch = from_hf_config(TINY["llama"])
    d, inter, kv_out, v = 192, 320, 2 * 48, 100
    shapes = [(d, d), (kv_out, d), (kv_out, d), (d, d), (inter, d), (inter, d), (d, inter)] * 2
    shapes += [(v, d), (v, d)]                       # lm_head (untied) and the embedding
    codes = sum(r * c for r, c in shapes) // 2
    meta = sum(r * math.ceil(c / 128) * 2 * 2 for r, c in shapes)
    other = (2 * 2 + 1) * d                          # rmsnorm weights: 2 per layer + final
    plan = shrink.plan(arch, formats=["int4-g128", "fp16"])
    assert plan.format("int4-g128").weight_bytes == codes + meta + other * 2
    params = sum(r * c for r, c in shapes) + other
    assert plan.model.params == params
    assert plan.format("fp16").weight_bytes == 2 * params


def test_formats_are_case_insensitive_deduplicated_and_fp16_is_always_the_baseline():
    p = shrink.plan("llama-2-7b", formats=["INT4-G128", "int4-g128", "int8"])
    assert [f.name for f in p.formats] == ["int4-g128", "int8"]
    with pytest.raises(KeyError):
        p.format("fp16")
    for f in p.formats:  # fp16 is not listed but still the yardstick: llama's fp16 is 2 B/param
        assert f.compression_vs_fp16 == pytest.approx(2 * p.model.params / f.weight_bytes, rel=1e-12)


def test_bits_per_weight_and_totals_are_consistent():
    p = shrink.plan("llama-2-70b", device="a100-80gb", context=2048, batch=2)
    for f in p.formats:
        assert f.bits_per_weight == pytest.approx(8 * f.weight_bytes / p.model.params, rel=1e-12)
        assert f.total_bytes == f.weight_bytes + f.kv_cache_bytes + p.activation_bytes
        assert isinstance(f.weight_bytes, int) and isinstance(f.total_bytes, int)
    # group metadata: int4-g128 costs 4 B per 128 weights on top of 4 bits -> 4.25 bits
    assert p.format("int4-g128").bits_per_weight == pytest.approx(4.25, abs=0.01)
    assert p.format("nf4-g64").bits_per_weight == pytest.approx(4.25, abs=0.01)   # scale only
    assert p.format("int2-g64").bits_per_weight == pytest.approx(2.5, abs=0.01)


# --- transformers: the real model ----------------------------------------------------------

def test_params_equal_a_real_transformers_model(tmp_path):
    tf = pytest.importorskip("transformers")
    cases = [
        (tf.LlamaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=96, max_position_embeddings=128),
         tf.LlamaForCausalLM),
        (tf.GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                       bos_token_id=0, eos_token_id=0), tf.GPT2LMHeadModel),
        (tf.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=96, max_position_embeddings=128), tf.BertModel),
    ]
    for i, (cfg, cls) in enumerate(cases):
        model = cls(cfg)                       # instantiated for real (tiny)
        n = sum(p.numel() for p in model.parameters())
        d = tmp_path / f"m{i}"
        cfg.save_pretrained(d)                 # the config.json transformers itself writes
        plan = shrink.plan(str(d), formats=["fp16", "fp32"])
        assert plan.model.params == n, cls.__name__
        assert plan.model.name == f"m{i}"      # a directory is named after itself
        assert plan.format("fp16").weight_bytes == 2 * n
        assert plan.format("fp32").weight_bytes == 4 * n
        # the same numbers from the dict and from the config.json path
        assert shrink.plan(str(d / "config.json"), formats=["fp16"]).model.params == n
        assert shrink.plan(from_hf_config(cfg.to_dict()), formats=["fp16"]).model.params == n


def test_a_safetensors_file_is_planned_from_the_config_beside_it(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY["llama"]))
    (tmp_path / "weights.safetensors").write_bytes(b"")  # only its config is read
    p = shrink.plan(str(tmp_path / "weights.safetensors"))
    assert p.model.name == "weights"
    assert p.model.params == from_hf_config(TINY["llama"]).params()


# --- KV cache -------------------------------------------------------------------------------

@pytest.mark.parametrize("ctx, batch", [(4096, 1), (1000, 3)])
def test_kv_cache_grouped_query_by_hand(ctx, batch):
    """Llama-2-70B: 80 layers, 8 KV heads (GQA, 64 query heads) of 128."""
    p = shrink.plan("llama-2-70b", context=ctx, batch=batch)
    expect = 2 * 80 * 8 * 128 * ctx * batch * 2
    assert {f.kv_cache_bytes for f in p.formats} == {expect}  # independent of the weight format
    assert "8 KV heads for 64 query heads" in p.derivations["kv_cache_bytes"]
    assert f"{expect:,}" in p.derivations["kv_cache_bytes"]


def test_grouped_query_attention_shrinks_the_cache():
    # per token: 7B (MHA, 32 x 128, 32 layers) 524,288 B; 70B (8 KV heads, 80 layers) 327,680 B
    kv7 = shrink.plan("llama-2-7b", context=4096).format("fp16").kv_cache_bytes
    kv70 = shrink.plan("llama-2-70b", context=4096).format("fp16").kv_cache_bytes
    assert (kv7, kv70) == (524_288 * 4096, 327_680 * 4096)


@pytest.mark.parametrize("kvf, factor", [("fp32", 2.0), ("bf16", 1.0), ("int8", 0.5), ("fp8", 0.5),
                                         ("FP8-E4M3", 0.5), ("int4", 0.25)])
def test_kv_format_scales_the_cache(kvf, factor):
    base = shrink.plan("llama-2-13b", context=8192, formats=["int4-g128"]).format("int4-g128")
    p = shrink.plan("llama-2-13b", context=8192, formats=["int4-g128"], kv_format=kvf)
    f = p.format("int4-g128")
    assert f.kv_cache_bytes == base.kv_cache_bytes * factor == 6_710_886_400 * factor
    assert f.weight_bytes == base.weight_bytes
    assert p.kv_format == kvf.lower()


def test_unknown_kv_format_is_a_value_error():
    with pytest.raises(ValueError, match="int5"):
        shrink.plan("llama-2-7b", kv_format="int5")


@pytest.mark.parametrize("model", ["bert-base", "minilm"])
@pytest.mark.parametrize("kvf", ["fp16", "int8"])
def test_encoders_keep_no_kv_cache(model, kvf):
    p = shrink.plan(model, context=512, batch=8, kv_format=kvf)
    assert all(f.kv_cache_bytes == 0 for f in p.formats)
    assert "encoder" in p.derivations["kv_cache_bytes"]
    assert p.context == 512


def test_defaults_without_an_architecture():
    p = shrink.plan(params="7B")
    assert p.model.params == 7_000_000_000 and p.model.arch is None
    assert p.context == 2048 and p.batch == 1            # no model context to cap at 4096
    assert all(f.kv_cache_bytes == 0 for f in p.formats)  # no shape, so no KV cache
    assert "architecture" in p.derivations["kv_cache_bytes"]
    assert shrink.plan("minilm").context == 512           # the model's own, under 4096
    assert shrink.plan("mistral-7b").context == 4096      # 32768 capped


# --- fits -----------------------------------------------------------------------------------

def _memory_for_usable(target: int) -> int:
    """A device memory whose 90% (the planner's usable share, floored) is exactly `target`."""
    m0 = target * 10 // 9
    for m in range(m0 - 3, m0 + 4):
        if int(m * 0.9) == target:
            return m
    raise AssertionError(target)


@pytest.mark.parametrize("fmt", ["int4-g128", "fp16"])
def test_fits_is_exact_at_the_boundary(fmt):
    total = shrink.plan("llama-2-7b", context=4096, formats=[fmt]).format(fmt).total_bytes
    at = shrink.plan("llama-2-7b", context=4096, formats=[fmt], memory=_memory_for_usable(total),
                     bandwidth="1TB/s")
    assert at.usable_bytes == total
    assert at.format(fmt).fits is True
    below = shrink.plan("llama-2-7b", context=4096, formats=[fmt],
                        device=custom_device(memory=_memory_for_usable(total - 1), bandwidth="1TB/s"))
    assert below.usable_bytes == total - 1
    assert below.format(fmt).fits is False


def test_usable_memory_is_ninety_percent():
    p = shrink.plan("llama-2-7b", device="rtx-4090")
    assert p.usable_bytes == int(24 * GiB * 0.9) == 23_192_823_398
    p = shrink.plan("llama-2-7b", device="rtx-4090", memory="8GB")   # --memory overrides the card's
    assert p.device.name == "rtx-4090 (custom)" and p.usable_bytes == 7_200_000_000
    assert p.device.bandwidth_bytes_per_s == 1008e9                   # the rest is kept


def test_without_a_device_nothing_is_judged():
    p = shrink.plan("llama-2-13b", context=8192)
    assert p.device is None and p.usable_bytes is None and p.recommendation is None
    for f in p.formats:
        assert f.fits is None and f.decode_tokens_per_s_bound is None and f.bound is None
    j = json.loads(json.dumps(p.to_json()))
    assert j["device"] is None and j["recommendation"] is None
    assert all(f["fits"] is None and f["decode_tokens_per_s_bound"] is None for f in j["formats"])


def test_bandwidth_only_device_gives_speed_but_no_fit():
    p = shrink.plan("llama-2-7b", bandwidth="1TB/s")
    assert p.device.name == "custom" and p.usable_bytes is None and p.recommendation is None
    f = p.format("fp16")
    assert f.fits is None
    assert f.decode_tokens_per_s_bound == pytest.approx(1e12 / (f.weight_bytes + f.kv_cache_bytes))
    assert f.bound is None  # a custom device has no compute peaks


# --- decode bound and the roofline -------------------------------------------------------------

@pytest.mark.parametrize("batch", [1, 4])
def test_memory_bound_decode_is_batch_times_bandwidth_over_bytes_read(batch):
    p = shrink.plan("llama-2-7b", device="rtx-4090", context=4096, batch=batch)
    bw = 1008e9
    for f in p.formats:
        assert f.bound == "memory"
        assert f.decode_tokens_per_s_bound == pytest.approx(
            batch * bw / (f.weight_bytes + f.kv_cache_bytes), rel=1e-12)


def test_bound_flips_exactly_at_the_ridge_on_a_raspberry_pi():
    """gpt2 on a Raspberry Pi 5 (307.2 GFLOP/s fp16, 17.07 GB/s: ridge 18 FLOP/B): a short
    context keeps the KV cache small, so intensity grows ~ batch and crosses the ridge."""
    pi = get_device("raspberry-pi-5")
    P = get_preset("gpt2").params()
    kv_per_seq = 2 * 12 * 12 * 64 * 16 * 2   # layers, heads, head dim, context 16, fp16
    seen = set()
    for b in range(1, 41):
        p = shrink.plan("gpt2", device=pi, context=16, batch=b, formats=["fp16", "int8"])
        for name, peak in (("fp16", 307.2e9), ("int8", 614.4e9)):
            f = p.format(name)
            step = f.weight_bytes + kv_per_seq * b
            intensity = b * 2 * P / step
            ridge = peak / pi.bandwidth_bytes_per_s
            assert f.kv_cache_bytes == kv_per_seq * b
            assert f.intensity == pytest.approx(intensity, rel=1e-12)
            assert f.ridge == pytest.approx(ridge, rel=1e-12)
            expect = "memory" if intensity < ridge else "compute"
            assert f.bound == expect, (b, name, intensity, ridge)
            seen.add((name, expect))
            if expect == "memory":
                assert f.decode_tokens_per_s_bound == pytest.approx(b * pi.bandwidth_bytes_per_s / step)
            else:  # the compute roof: peak / (2 FLOP per weight per token)
                assert f.decode_tokens_per_s_bound == pytest.approx(peak / (2 * P))
    assert seen == {("fp16", "memory"), ("fp16", "compute"), ("int8", "memory"), ("int8", "compute")}


def test_seed_000_ex_0_5_ridge_156_and_the_large_batch_flip():
    """Seed 000, Ex. 0.5: A100 312 TFLOPS fp16 / 2 TB/s = 156 FLOP/byte; batch-1 decode in
    fp16 does 2 FLOP per 2-byte weight = 1 FLOP/byte: memory-bound. "At large batch sizes the
    same weights are reused ... compute-bound": with --params (no KV cache) intensity = batch,
    so it flips at batch 156 exactly (the calc module's convention: memory iff intensity < ridge)."""
    from shrink.calc import roofline_bound

    def fp16(batch):
        return shrink.plan(params="7B", device="a100-80gb", bandwidth="2TB/s", batch=batch,
                           formats=["fp16"]).format("fp16")

    f1 = fp16(1)
    assert f1.ridge == pytest.approx(156.0) and f1.intensity == pytest.approx(1.0) and f1.bound == "memory"
    for b in (155, 156, 157):
        f = fp16(b)
        assert f.intensity == pytest.approx(b)
        assert f.bound == roofline_bound(b, 312e12, 2e12) == ("memory" if b < 156 else "compute")
        assert f.decode_tokens_per_s_bound == pytest.approx(min(b * 2e12 / 14e9, 312e12 / 14e9))


def test_custom_base_device_with_a_low_peak_is_compute_bound():
    toy = Device(name="toy", tier="edge", memory_bytes=64 * GiB, bandwidth_bytes_per_s=1e9,
                 peak_flops={"fp16": 10e9})  # ridge 10 FLOP/B
    for b, bound in ((9, "memory"), (10, "compute"), (11, "compute")):
        f = shrink.plan(params="1B", device=toy, batch=b, formats=["fp16"]).format("fp16")
        assert f.intensity == pytest.approx(b) and f.bound == bound
        assert f.decode_tokens_per_s_bound == pytest.approx(min(b * 1e9 / 2e9, 10e9 / 2e9))



@pytest.mark.parametrize("device", ["microcontroller", "mcu"])
def test_decode_bound_never_exceeds_the_fastest_compute_unit(device):
    d = get_device(device)
    p = shrink.plan("gpt2", device=d, context=16)
    roof = max(d.peak_flops.values()) / (2 * p.model.params)
    too_fast = [f.name for f in p.formats if f.decode_tokens_per_s_bound > roof * (1 + 1e-9)]
    no_roof = [f.name for f in p.formats if f.bound is None]
    assert (too_fast, no_roof) == ([], [])


def test_decode_bound_never_exceeds_compute_on_devices_with_fp16():
    for name, d in DEVICES.items():
        if "fp16" not in d.peak_flops:
            continue
        p = shrink.plan("gpt2", device=d, context=16, batch=64)
        roof = max(d.peak_flops.values()) / (2 * p.model.params)
        for f in p.formats:
            assert f.bound in ("memory", "compute"), (name, f.name)
            assert f.decode_tokens_per_s_bound <= roof * (1 + 1e-9), (name, f.name)


# --- the seeds' plan-level numbers ------------------------------------------------------------

def test_seed_000_ex_0_1_13b_fp16_is_26_gb():
    """Seed 000, Ex. 0.1: 13 x 10^9 params x 2 bytes = 26 GB."""
    assert shrink.plan(params="13B").format("fp16").weight_bytes == 26 * 10**9


def test_seed_000_ex_0_2_and_0_4_bandwidth_bound_speedup():
    """Seed 000, Ex. 0.2: 14 GB fp16 -> 3.5 GB int4 is 4.0x. Ex. 0.4: an A100 at 2 TB/s loads
    14 GB in 7.0 ms and 3.5 GB in 1.75 ms: 4.0x. `int4` without a group is per-channel; with
    --params alone the planner knows no shapes, so it counts codes only (exactly 3.5 GB)."""
    p = shrink.plan(params="7B", memory="80GB", bandwidth="2TB/s", formats=["fp16", "int4"])
    fp16, int4 = p.format("fp16"), p.format("int4")
    assert (fp16.weight_bytes, int4.weight_bytes) == (14 * 10**9, 3_500_000_000)
    assert int4.compression_vs_fp16 == 4.0
    assert fp16.decode_tokens_per_s_bound == pytest.approx(1 / 0.007, rel=1e-12)
    assert int4.decode_tokens_per_s_bound == pytest.approx(1 / 0.00175, rel=1e-12)
    assert int4.decode_tokens_per_s_bound / fp16.decode_tokens_per_s_bound == pytest.approx(4.0)


def test_seed_000_ex_0_4_with_real_shapes_within_metadata():
    """The same with Llama-2-7B's real shapes at context 1 (KV cache negligible): per-channel
    int4 adds one fp16 scale per row, so the speedup is just under 4x; group-128 metadata
    (4 B per 128 weights, asymmetric) costs more: 16 / 4.25 = 3.76x."""
    p = shrink.plan("llama-2-7b", device="a100-80gb", bandwidth="2TB/s", context=1,
                    formats=["fp16", "int4", "int4-g128"])
    fp16 = p.format("fp16").decode_tokens_per_s_bound
    assert 1 / 0.007 * 0.95 < fp16 < 1 / 0.007 * 1.05          # 6.74B, not 7B
    r = p.format("int4").decode_tokens_per_s_bound / fp16
    assert 3.99 < r < 4.0
    assert p.format("int4-g128").decode_tokens_per_s_bound / fp16 == pytest.approx(16 / 4.25, rel=2e-3)


@pytest.mark.parametrize("params, fp32, fp16, int8, int4", [
    ("1.5B", 6e9, 3e9, 1.5e9, 0.75e9),
    ("7B", 28e9, 14e9, 7e9, 3.5e9),
    ("13B", 52e9, 26e9, 13e9, 6.5e9),
    ("70B", 280e9, 140e9, 70e9, 35e9),
    ("175B", 700e9, 350e9, 175e9, 87.5e9),
])
def test_seed_001_ch0_memory_table(params, fp32, fp16, int8, int4):
    """Seed 001, ch. 0 table (GPT-2 1.5B .. 175B at FP32/FP16/INT8/INT4); seed 002 "7B: 28.0,
    14.0, 7.0, 3.5 GB"; seed 004 "175B x 4 bytes = 700GB"."""
    p = shrink.plan(params=params, formats=["fp32", "fp16", "int8", "int4"])
    assert [p.format(n).weight_bytes for n in ("fp32", "fp16", "int8", "int4")] == [fp32, fp16, int8, int4]


def test_seed_001_ch0_70b_on_one_a100():
    """Seed 001, ch. 0: "A 70B model at INT4 is 35 GB - it fits on a single A100 with room to
    spare for KV cache. At INT8, it's 70 GB - tight, but possible. The same model at FP32
    requires a minimum of 4 GPUs." Checked with Llama-2-70B's real shapes and a 4K KV cache."""
    p = shrink.plan("llama-2-70b", device="a100-80gb", context=4096)
    int4, int8, fp32 = p.format("int4-g128"), p.format("int8"), p.format("fp32")
    assert int4.fits and p.usable_bytes - int4.total_bytes > 35e9            # room to spare
    assert int8.fits and p.usable_bytes - int8.total_bytes < 0.1 * p.usable_bytes   # tight
    assert not fp32.fits and math.ceil(fp32.weight_bytes / p.usable_bytes) == 4


def test_seed_001_ch7_int4_g128_scales_are_2_gb_not_5():
    """Seed 001, ch. 7 table: "INT4 GPTQ (group=128): 35 GB + 5 GB scales" for LLaMA-70B. One
    fp16 scale and zero-point per 128 weights is 1/32 B per weight: ~2.2 GB, not 5.
    (Every Llama-2-70B matrix dimension is a multiple of 128, so no group is short.)"""
    a = get_preset("llama-2-70b")
    w = shrink.plan("llama-2-70b", formats=["int4-g128"]).format("int4-g128").weight_bytes
    quantized = a.params() - a.other_params()
    codes, meta = quantized // 2, quantized // 128 * 4
    assert w == codes + meta + a.other_params() * 2
    assert 34e9 < codes < 35e9 and 2.1e9 < meta < 2.2e9


def test_seed_001_ch9_design_challenge_llama_2_13b_on_rtx_4090():
    """Seed 001, ch. 9 Design Challenge: LLaMA-2-13B on an RTX 4090 (24 GB), >= 8 GB free for
    KV cache, weights <= 16 GB: "AWQ INT4 g128 -> ~7.5 GB weights + ~1 GB scales = 8.5 GB ...
    supporting ~8K context at FP16 or ~16K at INT8 KV cache". The seed's 8.5 GB is high: 4-bit
    codes for 13.0B weights are 6.50 GB and g128 metadata (scale + zero-point, 4 B per 128
    weights) 0.41 GB, so shrink's exact figure is 6,915,287,040 B (~6.9 GB)."""
    p = shrink.plan("llama-2-13b", device="rtx-4090", context=8192)
    f = p.format("int4-g128")
    assert f.weight_bytes == 6_915_287_040
    assert f.weight_bytes <= 16e9 and p.usable_bytes - f.weight_bytes >= 8e9
    assert f.kv_cache_bytes == 2 * 40 * 40 * 128 * 8192 * 2 == 6_710_886_400
    assert f.fits                                                          # ~8K at fp16 KV
    p16 = shrink.plan("llama-2-13b", device="rtx-4090", context=16384, kv_format="int8")
    assert p16.format("int4-g128").kv_cache_bytes == 6_710_886_400 and p16.format("int4-g128").fits
    assert not shrink.plan("llama-2-13b", device="rtx-4090", context=8192).format("fp16").fits  # 26 GB


def test_seed_002_7b_fp32_on_a100_and_gpt3_on_80_gb():
    """Seed 002: 7B "FP32 28.0 GB - A100 80GB: yes, but tight"; "INT2 1.75 GB"; GPT-3 175B in
    FP16 is 350 GB and "your 80 GB GPU can hold less than a quarter of the model"."""
    p = shrink.plan(params="7B", device="a100-80gb", formats=["fp32", "int2"])
    assert p.format("fp32").weight_bytes == 28e9 and p.format("fp32").fits
    assert p.format("int2").weight_bytes == 1.75e9
    g = shrink.plan("gpt-3-175b", device="a100-80gb", formats=["fp16"])
    assert g.format("fp16").weight_bytes == pytest.approx(350e9, rel=0.005)
    assert 80 * GiB / g.format("fp16").weight_bytes < 0.25 and not g.format("fp16").fits


def test_seed_004_int4_gpt3_and_llama_7b_on_mobile():
    """Seed 004: "4-bit quantization: 700GB becomes 87GB (fits on some GPUs!)": 87.5 GB does
    not fit an 80 GB A100 but does an H200 (141 GB). Mobile tier (4 GB): "LLaMA-7B: 28GB ->
    3.5GB" fits at 4 bits, not at 8."""
    g = [shrink.plan(params="175B", device=d, formats=["int4"]).format("int4") for d in ("a100-80gb", "h200")]
    assert g[0].weight_bytes == 87.5e9 and (g[0].fits, g[1].fits) == (False, True)
    m = shrink.plan(params="7B", device="mobile", formats=["int4", "int8"])
    assert m.format("int4").fits and not m.format("int8").fits


def test_api_md_example_and_json_round_trip():
    """API.md: plan = shrink.plan(params=7e9, device="rtx-4090", context=4096)."""
    p = shrink.plan(params=7e9, device="rtx-4090", context=4096)
    assert p.model.params == 7_000_000_000 and p.context == 4096
    j = json.loads(json.dumps(p.to_json(), allow_nan=False))
    assert [f["name"] for f in j["formats"]] == list(DEFAULT_FORMATS)
    assert j["recommendation"]["format"] == "int8"
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in j["derivations"].items())


@pytest.mark.parametrize("kwargs, match", [
    ({"model": "llama-2-7b", "params": "7B"}, "not both"),
    ({}, "nothing to plan"),
    ({"params": "0"}, "--params"),
    ({"params": "7B", "context": "-5"}, "--context"),
    ({"params": "7B", "batch": "2.5"}, "--batch"),
    ({"model": "llama-2-13c"}, "llama-2-13b"),
    ({"model": "llama-2-7b", "device": "rtx-4091"}, "rtx-4090"),
    ({"model": "llama-2-7b", "formats": ["int9"]}, "int9"),
    ({"model": "llama-2-7b", "device": "rtx-4090", "max_drop": 0}, "max-drop"),
])
def test_bad_input_is_a_value_error_naming_it(kwargs, match):
    model = kwargs.pop("model", None)
    with pytest.raises(ValueError, match=match):
        shrink.plan(model, **kwargs)


def test_missing_config_path_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        shrink.plan(str(tmp_path / "nope" / "config.json"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        shrink.plan(str(tmp_path))  # a directory without its config.json
