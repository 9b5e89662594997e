"""The GPU paths: QuantLinear's CUDA kernels, W8A8Linear's int_mm on CUDA, and
compress() on a model that lives on a GPU.

Every test that needs a GPU is skipped without one (CI has none); they were
run on an H100 (see docs/BENCHMARKS.md, "GPU"). The tests at the top run
everywhere: what the module says when no GPU can take it.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from shrink.modules import QuantLinear, select_kernel
from shrink.modules.w8a8_linear import W8A8Linear
from shrink.quant import QuantSpec, dequantize, quantize

U = 2.0 ** -9  # bf16 unit roundoff
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
INT4_G128 = QuantSpec.from_name("int4-g128")
INT4_G32_SYM = QuantSpec(bits=4, granularity="group", group_size=32)
INT4_CHANNEL = QuantSpec(bits=4)
INT8 = QuantSpec(bits=8)
INT3_G128 = QuantSpec(bits=3, granularity="group", group_size=128)


def _rand(*shape, seed=0, std=0.02):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * std


# ------------------------------------------------------------------ everywhere


@pytest.mark.skipif(CUDA, reason="checks the answer on a machine without a GPU")
def test_cuda_selection_without_a_gpu_says_why():
    kernel, reason = select_kernel(INT4_G128, 256, 512, "cuda")
    assert kernel == "reference" and "CUDA is not available" in reason
    m = QuantLinear.from_qtensor(quantize(_rand(64, 256), INT4_G128))
    with pytest.raises(ValueError, match="runs on cuda, but the weight is on cpu"):
        QuantLinear.from_qtensor(m.to_qtensor(), kernel="int4pack_cuda")


def test_other_devices_take_the_reference_path():
    kernel, reason = select_kernel(INT4_G128, 256, 512, "meta")
    assert kernel == "reference" and "no packed kernel on meta" in reason


# ------------------------------------------------------------------ QuantLinear on a GPU


def _bound_check(m: QuantLinear, x: torch.Tensor, y: torch.Tensor, bias) -> float:
    """y (the GPU kernel's) against F.linear(bf16(x), dequantize(W)) in float64, with the
    bound the CPU kernel tests use: 3u |x||w| + u |x||zero| (scales and folded zeros in bf16)."""
    w_hat = dequantize(m.to_qtensor()).double().cpu()
    zero = torch.zeros_like(w_hat)
    if m.spec.has_zero_point:
        lay = m.to_qtensor().layout
        zp = lay.params_as_blocks(m.zeros.cpu(), "zp").double().expand(lay.rows, lay.groups, lay.group_size)
        sc = lay.params_as_blocks(m.scales.cpu(), "s").double().expand(lay.rows, lay.groups, lay.group_size)
        zero = lay.from_blocks((8 - zp) * sc)
    xb = x.bfloat16().double().cpu()
    ref = xb @ w_hat.t() + (0 if bias is None else bias.double())
    got = y.double().cpu()
    bound = 3 * U * (xb.abs() @ w_hat.abs().t()) + U * (xb.abs() @ zero.abs().t()) + 1e-12
    assert ((got - ref).abs() <= bound).all()
    return float((got - ref).abs().max() / ref.abs().max())


@needs_cuda
@pytest.mark.parametrize("spec", [INT4_G128, INT4_G32_SYM, INT4_CHANNEL])
@pytest.mark.parametrize("k", [512, 96 * 4])  # 384: tinygemm tiles of 4 x 16 instead of 8 x 16
def test_int4_on_cuda_matches_the_reference(spec, k):
    w, b = _rand(96, k, seed=1), _rand(96, seed=2)
    qt = quantize(w, spec)
    m = QuantLinear.from_qtensor(qt, b).cuda()
    assert (m.kernel, m.kernel_reason) == ("int4pack_cuda", None)
    w_hat = dequantize(qt).cuda()
    for lead in ((1,), (5,), (3, 7)):
        x = torch.randn(*lead, k, generator=torch.Generator().manual_seed(len(lead))).cuda()
        with torch.no_grad():
            y = m(x)
        assert y.device.type == "cuda" and y.dtype == torch.float32 and y.shape == (*lead, 96)
        assert _bound_check(m, x.reshape(-1, k), y.reshape(-1, 96), b) < 8e-3  # bf16 x, scales, output
    x = torch.randn(2, k, device="cuda", requires_grad=True)  # the kernel has no backward: the reference runs
    y = m(x)
    assert y.requires_grad and torch.equal(y, F.linear(x, w_hat, b.cuda()))


@needs_cuda
@pytest.mark.parametrize("spec", [INT8, INT3_G128, QuantSpec(bits=8, granularity="tensor"),
                                  QuantSpec(bits=2, granularity="group", group_size=64, symmetric=False)])
def test_other_integer_codes_dequantize_on_the_gpu_exactly(spec):
    w, b = _rand(96, 256, seed=5), _rand(96, seed=6)
    qt = quantize(w, spec)
    m = QuantLinear.from_qtensor(qt, b).cuda()
    assert (m.kernel, m.kernel_reason) == ("dequant_cuda", None) and m._dq_codes.dtype == torch.int8
    w_hat = dequantize(qt).cuda()
    for lead in ((1,), (3, 7)):
        x = torch.randn(*lead, 256).cuda()
        with torch.no_grad():
            assert torch.equal(m(x), F.linear(x, w_hat, b.cuda()))
            assert torch.equal(m(x.bfloat16()), F.linear(x.bfloat16(), w_hat.bfloat16(), b.cuda().bfloat16()))


@needs_cuda
def test_moving_between_devices_repacks_and_keeps_the_stored_codes():
    w, b = _rand(128, 256, seed=3), _rand(128, seed=4)
    m = QuantLinear.from_qtensor(quantize(w, INT4_G128), b)
    codes = m.codes.clone()
    assert m.kernel == "int4pack_cpu"
    m.cuda()
    assert m.kernel == "int4pack_cuda" and m._kernel_weight.is_cuda and m.codes.is_cuda
    assert torch.equal(m.codes.cpu(), codes)
    state = {k: v.cpu() for k, v in m.state_dict().items()}
    m.cpu()
    assert m.kernel == "int4pack_cpu" and torch.equal(m.codes, codes)
    shell = QuantLinear(256, 128, INT4_G128).cuda()
    shell.load_state_dict(state)
    assert shell.kernel == "int4pack_cuda"
    x = torch.randn(4, 256)
    with torch.no_grad():
        assert torch.equal(shell(x.cuda()), m.cuda()(x.cuda()))


@needs_cuda
def test_specs_without_a_gpu_kernel_fall_back_and_are_exact():
    w = _rand(96, 256, seed=5)
    qt = quantize(w, QuantSpec.from_name("nf4-g64"))
    m = QuantLinear.from_qtensor(qt).cuda()
    assert m.kernel == "reference" and "integer codes only" in m.kernel_reason
    x = torch.randn(3, 256)
    with torch.no_grad():
        want = F.linear(x.cuda(), dequantize(qt).cuda())
        assert torch.equal(m(x.cuda()), want)
    forced = QuantLinear.from_qtensor(quantize(w, INT4_G128), kernel="reference").cuda()
    assert forced.kernel == "reference"


# ------------------------------------------------------------------ W8A8 on a GPU


@needs_cuda
@pytest.mark.parametrize("rows", [1, 16, 17, 64])  # cuBLASLt's int_mm takes more than 16 rows
def test_w8a8_on_cuda_equals_the_cpu_layer(rows):
    lin = nn.Linear(256, 96)
    with torch.no_grad():
        lin.weight.copy_(_rand(96, 256, seed=6, std=0.05))
    cpu = W8A8Linear.from_linear(lin)
    gpu = W8A8Linear.from_linear(lin).cuda()
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows))
    with torch.no_grad():
        # the integer sums are exact on every path, so the outputs agree to float32 rounding
        torch.testing.assert_close(gpu(x.cuda()).cpu(), cpu(x), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ compress on a GPU


def _tiny_llama(seed: int = 0):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


@needs_cuda
@pytest.mark.parametrize("recipe", ["w4-gptq", "w4-awq", "w4-rtn"])
def test_compress_a_model_on_the_gpu(recipe):
    import shrink

    model = _tiny_llama().cuda()
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 512, (4, 64), generator=g)} for _ in range(4)]
    res = shrink.compress(model, recipe, calibration=batches)
    layers = [l for s in res.steps for l in s.layers]
    assert len(layers) == 14 and all(l.kernel == "int4pack_cuda" for l in layers)
    for mod in res.model.modules():
        if isinstance(mod, QuantLinear):
            assert mod.codes.is_cuda and mod._kernel_weight.is_cuda
    if recipe != "w4-rtn":
        assert all(l.error <= l.error_rtn * 1.0001 for l in layers)
    ids = batches[0]["input_ids"].cuda()
    with torch.no_grad():
        want = model(ids).logits.float()
        got = res.model(ids).logits.float()
    assert got.is_cuda and torch.isfinite(got).all()
    assert float(F.cosine_similarity(got.flatten(), want.flatten(), dim=0)) > 0.95


@needs_cuda
def test_gptq_on_the_gpu_agrees_with_the_cpu():
    from shrink.algos import gptq
    from shrink.observe import HessianObserver

    w = _rand(192, 256, seed=7, std=0.05)
    x = torch.randn(2048, 256, generator=torch.Generator().manual_seed(8)) @ _rand(256, 256, seed=9, std=0.2)
    obs_cpu, obs_gpu = HessianObserver(256), HessianObserver(256)
    obs_cpu(x)
    obs_gpu(x.cuda())
    h_cpu, h_gpu = obs_cpu.hessian(), obs_gpu.hessian()
    assert h_gpu.is_cuda
    torch.testing.assert_close(h_gpu.cpu(), h_cpu, rtol=1e-5, atol=1e-6)
    a = gptq(w, h_cpu, INT4_G128)
    b = gptq(w.cuda(), h_gpu, INT4_G128)
    same = (a.qtensor.int_codes() == b.qtensor.int_codes()).float().mean()
    assert same > 0.99  # float summation order differs; a code flips where a value sits on a rounding edge

    def err(qt):  # tr(D H D^T), D = W_hat - W: the layer's output error on these inputs
        d = dequantize(qt).double().cpu() - w.double()
        return float(torch.trace(d @ h_cpu.double() @ d.T))

    assert err(b.qtensor) <= 1.01 * err(a.qtensor)
