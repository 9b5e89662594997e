"""GPTQ in one pass per block (recipe/gptq_inline.py): each layer is solved on the inputs
the block's earlier, already quantized layers give it, and the pass's outputs feed the
next block."""
import copy

import pytest
import torch

from shrink import compress
from shrink.algos import gptq
from shrink.modules.quant_linear import QuantLinear
from shrink.observe import HessianObserver
from shrink.quant import QuantSpec, dequantize, quantize
from shrink.recipe import gptq_inline
from shrink.recipe.gptq_inline import float_replay, join_batches
from tests_support import tiny_llama

SPEC = QuantSpec(bits=4, symmetric=False, granularity="group", group_size=16, axis=0)
STEP = [{"gptq": {"bits": 4, "group_size": 16, "true_sequential": True}}]


def _batches(n=4, seq=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 64, (2, seq), generator=g) for _ in range(n)]


def _codes(model, name):
    return model.get_submodule(name).to_qtensor().int_codes()


def _inputs(model, names, batch):
    """What each named module receives when the model runs `batch`."""
    got = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda _m, args, n=n: got.setdefault(n, args[0].detach().clone())) for n in names]
    with torch.no_grad():
        model(batch, use_cache=False)
    for h in hooks:
        h.remove()
    return got


def _hessian(x):
    obs = HessianObserver(x.shape[-1])
    obs.observe(x)
    return obs.hessian()


def test_each_layer_is_solved_on_the_quantized_layers_before_it():
    model = tiny_llama(num_hidden_layers=2)
    batches = _batches()
    res = compress(model, STEP, calibration=batches, measure_speed=False)
    assert res.steps[0].details["gptq_pass"].startswith("one pass per block: 4 calibration batches joined")
    q = res.model
    joined = torch.cat(batches)
    a = "model.layers.0.self_attn."
    # q/k/v: on the float block input, one Hessian, solved as one stacked weight
    x = _inputs(model, [a + "q_proj"], joined)[a + "q_proj"]
    w = torch.cat([model.get_submodule(a + p).weight.detach() for p in ("q_proj", "k_proj", "v_proj")])
    ref = gptq(w, _hessian(x), SPEC).qtensor.int_codes()
    got = torch.cat([_codes(q, a + p) for p in ("q_proj", "k_proj", "v_proj")])
    assert torch.equal(got, ref)
    # o_proj: on the attention output of the *quantized* q/k/v (not the float ones)
    mixed = copy.deepcopy(model)
    for p in ("q_proj", "k_proj", "v_proj"):
        with torch.no_grad():
            mixed.get_submodule(a + p).weight.copy_(q.get_submodule(a + p).dequantized_weight())
    xo = _inputs(mixed, [a + "o_proj"], joined)[a + "o_proj"]
    ref_o = gptq(model.get_submodule(a + "o_proj").weight.detach(), _hessian(xo), SPEC).qtensor.int_codes()
    assert torch.equal(_codes(q, a + "o_proj"), ref_o)
    x_float = _inputs(model, [a + "o_proj"], joined)[a + "o_proj"]
    assert not torch.equal(xo, x_float)   # the test would prove nothing if the inputs were the same
    # block 1 sees block 0's quantized output
    mixed1 = copy.deepcopy(mixed)
    with torch.no_grad():
        for name, mod in q.named_modules():
            if isinstance(mod, QuantLinear) and name.startswith("model.layers.0."):
                mixed1.get_submodule(name).weight.copy_(mod.dequantized_weight())
    b = "model.layers.1.mlp."
    xg = _inputs(mixed1, [b + "gate_proj"], joined)[b + "gate_proj"]
    wg = torch.cat([model.get_submodule(b + p).weight.detach() for p in ("gate_proj", "up_proj")])
    got_g = torch.cat([_codes(q, b + p) for p in ("gate_proj", "up_proj")])
    # block 1's gate/up share one solve (learnt in block 0) and sit on quantized inputs all the way
    assert not torch.equal(xg, _inputs(model, [b + "gate_proj"], joined)[b + "gate_proj"])
    mixed1b = copy.deepcopy(mixed1)
    with torch.no_grad():
        for name, mod in q.named_modules():
            if isinstance(mod, QuantLinear) and name.startswith("model.layers.1.self_attn."):
                mixed1b.get_submodule(name).weight.copy_(mod.dequantized_weight())
    xg = _inputs(mixed1b, [b + "gate_proj"], joined)[b + "gate_proj"]
    assert torch.equal(got_g, gptq(wg, _hessian(xg), SPEC).qtensor.int_codes())
    notes = {l.name: l.note for l in res.steps[0].layers}
    assert "solved with model.layers.1.mlp.up_proj" in notes[b + "gate_proj"]
    assert "shares its input (and Hessian) with model.layers.0.mlp.gate_proj" in notes["model.layers.0.mlp.up_proj"]
    assert all(l.error < l.error_rtn for l in res.steps[0].layers)


def test_two_pass_when_turned_off_or_over_budget(monkeypatch):
    model = tiny_llama(num_hidden_layers=2)
    batches = _batches()
    one = compress(model, STEP, calibration=batches, measure_speed=False)
    monkeypatch.setenv("SHRINK_GPTQ_ONEPASS", "0")
    two = compress(model, STEP, calibration=batches, measure_speed=False)
    assert two.steps[0].details["gptq_pass"] == "two passes per block: SHRINK_GPTQ_ONEPASS=0"
    # the first layers see the same float inputs either way; later ones differ
    name = "model.layers.0.self_attn.q_proj"
    assert torch.equal(_codes(one.model, name), _codes(two.model, name))
    assert not torch.equal(_codes(one.model, "model.layers.1.mlp.down_proj"),
                           _codes(two.model, "model.layers.1.mlp.down_proj"))
    monkeypatch.delenv("SHRINK_GPTQ_ONEPASS")
    monkeypatch.setattr(gptq_inline, "ONE_PASS_BUDGET", 1000)
    over = compress(model, STEP, calibration=batches, measure_speed=False)
    assert "over the 9.31323e-07 GiB budget" in over.steps[0].details["gptq_pass"]
    assert torch.equal(_codes(over.model, "model.layers.1.mlp.down_proj"),
                       _codes(two.model, "model.layers.1.mlp.down_proj"))


def test_join_batches_only_joins_what_has_one_shape():
    t = [torch.ones(2, 5, dtype=torch.long), torch.zeros(3, 5, dtype=torch.long)]
    joined, why = join_batches(t, widest=8)
    assert joined[0].shape == (5, 5) and why == "2 calibration batches joined into one"
    d = [{"input_ids": x, "attention_mask": torch.ones_like(x), "use_cache": False} for x in t]
    joined, _ = join_batches(d, widest=8)
    assert joined[0]["input_ids"].shape == (5, 5) and joined[0]["use_cache"] is False
    assert join_batches([torch.ones(1, 5, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], 8)[0] is None
    assert join_batches([{"a": torch.ones(1, 5)}, {"b": torch.ones(1, 5)}], 8)[0] is None
    assert join_batches([torch.ones(1, 5), torch.ones(1, 5, dtype=torch.float64)], 8)[0] is None
    # the budget is a fixed number of bytes (the same decision on every machine)
    rows = 2**20
    assert join_batches([torch.ones(rows, 1, dtype=torch.long)] * 2, widest=4096)[0] is None
    one, why = join_batches([torch.ones(2 * rows, 1, dtype=torch.long)], widest=4096)   # one batch: the same budget
    assert one is None and "over the 2 GiB budget" in why
    single = torch.ones(4, 5, dtype=torch.long)
    one, why = join_batches([single], widest=8)
    assert one[0] is single and why == "one calibration batch"


@pytest.mark.parametrize("spec", [SPEC, QuantSpec(bits=8, symmetric=True, granularity="channel", axis=0),
                                  QuantSpec(bits=3, symmetric=True, granularity="group", group_size=32, axis=0)])
def test_float_replay_is_the_forward_the_pass_used(spec):
    torch.manual_seed(0)
    w = torch.randn(48, 64)
    qt = quantize(w, spec)
    layer = QuantLinear.from_qtensor(qt, torch.randn(48))
    x = torch.randn(5, 64)
    block = torch.nn.Sequential(layer)
    with float_replay(block):
        y = block(x)
    assert "forward" not in layer.__dict__   # restored
    # the pass's own forward: F.linear on dequantize(qt) (gptq_inline.OnePassGPTQ._use)
    assert torch.equal(layer.dequantized_weight(), dequantize(qt).float())
    assert torch.equal(y, torch.nn.functional.linear(x, dequantize(qt).float(), layer.bias))


def test_bf16_matmuls_change_only_what_follows_the_first_layers():
    """matmul_dtype: bfloat16 runs the one-pass forward's target matmuls in bf16: the block's
    first layers see the same float input (same codes), later ones the bf16-rounded outputs."""
    model = tiny_llama(num_hidden_layers=2)
    batches = _batches()
    f32 = compress(model, STEP, calibration=batches, measure_speed=False)
    step = [{"gptq": {**STEP[0]["gptq"], "matmul_dtype": "bfloat16"}}]
    bf = compress(model, step, calibration=batches, measure_speed=False)
    assert bf.steps[0].details["gptq_pass"].endswith("; the target layers' matmuls in bfloat16")
    a = "model.layers.0.self_attn."
    for p in ("q_proj", "k_proj", "v_proj"):
        assert torch.equal(_codes(f32.model, a + p), _codes(bf.model, a + p))
    # o_proj is solved on the attention of bf16-matmul q/k/v outputs: rebuild that input
    mixed = copy.deepcopy(model)
    for p in ("q_proj", "k_proj", "v_proj"):
        mod = mixed.get_submodule(a + p)
        w = bf.model.get_submodule(a + p).dequantized_weight().bfloat16()
        mod.forward = lambda x, w=w: torch.nn.functional.linear(x.bfloat16(), w).float()
    xo = _inputs(mixed, [a + "o_proj"], torch.cat(batches))[a + "o_proj"]
    ref_o = gptq(model.get_submodule(a + "o_proj").weight.detach(), _hessian(xo), SPEC).qtensor.int_codes()
    assert torch.equal(_codes(bf.model, a + "o_proj"), ref_o)
    # bf16 did change what later layers were solved on
    last = "model.layers.1.mlp.down_proj"
    assert not torch.equal(_codes(f32.model, last), _codes(bf.model, last))
    assert all(l.error < l.error_rtn for l in bf.steps[0].layers)
    # the same quality: the two models' logits are as close as either is to the float model
    x = torch.cat(batches)
    with torch.no_grad():
        ref, y32, ybf = (m(x).logits for m in (model, f32.model, bf.model))
    assert (ybf - y32).norm() < 0.5 * (y32 - ref).norm()


def test_bf16_matmuls_need_the_one_pass_forward():
    with pytest.raises(ValueError, match="set true_sequential: true as well"):
        compress(tiny_llama(num_hidden_layers=1), [{"gptq": {"matmul_dtype": "bfloat16"}}],
                 calibration=_batches(), measure_speed=False)
    with pytest.raises(ValueError, match="matmul_dtype must be one of float32, bfloat16"):
        compress(tiny_llama(num_hidden_layers=1), [{"gptq": {"true_sequential": True, "matmul_dtype": "fp16"}}],
                 calibration=_batches(), measure_speed=False)


def test_float_replay_with_bf16_matmuls():
    torch.manual_seed(0)
    qt = quantize(torch.randn(48, 64), SPEC)
    layer = QuantLinear.from_qtensor(qt, torch.randn(48))
    x = torch.randn(5, 64)
    with float_replay(torch.nn.Sequential(layer), torch.bfloat16):
        y = layer(x)
    want = torch.nn.functional.linear(x.bfloat16(), dequantize(qt).float().bfloat16()).float() + layer.bias
    assert y.dtype == torch.float32 and torch.equal(y, want)
    assert not torch.equal(y, torch.nn.functional.linear(x, dequantize(qt).float(), layer.bias))


@pytest.mark.parametrize("true_sequential", [False, True])
def test_scale_dtype_float32_keeps_scales_unrounded(true_sequential):
    """scale_dtype: float32 stores group scales and zero-points in float32 (no float16
    rounding up): layer 0's q/k/v codes are GPTQ's with that spec."""
    model = tiny_llama(num_hidden_layers=1)
    batches = _batches()
    gp = {"bits": 4, "group_size": 16, "true_sequential": true_sequential}
    f16 = compress(model, [{"gptq": gp}], calibration=batches, measure_speed=False)
    res = compress(model, [{"gptq": {**gp, "scale_dtype": "float32"}}], calibration=batches, measure_speed=False)
    a = "model.layers.0.self_attn."
    q32, q16 = res.model.get_submodule(a + "q_proj").to_qtensor(), f16.model.get_submodule(a + "q_proj").to_qtensor()
    assert q32.scale.dtype == torch.float32 and q16.scale.dtype == torch.float16
    assert not torch.equal(q32.scale, q32.scale.half().float())   # some scale is not a float16 value
    x = _inputs(model, [a + "q_proj"], torch.cat(batches))[a + "q_proj"]
    w = torch.cat([model.get_submodule(a + p).weight.detach() for p in ("q_proj", "k_proj", "v_proj")])
    spec32 = QuantSpec(bits=4, symmetric=False, granularity="group", group_size=16, axis=0, scale_dtype=torch.float32)
    ref = gptq(w, _hessian(x), spec32).qtensor
    assert torch.equal(q32.int_codes(), ref.int_codes()[: q32.shape[0]])
    # dynamic groups take scales from updated columns: equal up to the Hessians' summation order
    torch.testing.assert_close(q32.scale, ref.scale[: q32.shape[0]], rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="scale_dtype must be one of float16, float32, bfloat16"):
        compress(model, [{"gptq": {"scale_dtype": "fp8"}}], calibration=batches, measure_speed=False)
