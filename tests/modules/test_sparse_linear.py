"""SparseLinear / SparseConv2d: outputs equal the dense layer's, bytes are exact, the
pattern is fixed under training, shells reload from a state_dict, bad input is refused."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_model, save_model
from torch import nn
from torch.nn import functional as F

from shrink.formats.sparse import sparse_nbytes
from shrink.modules import SparseConv2d, SparseLinear, select_sparse_kernel

LAYOUTS = {"bitmask": {}, "csr": {}, "nm": {"n": 2, "m": 4}}


def _pruned(out_f=24, in_f=32, sparsity=0.7, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    mask = torch.rand(out_f, in_f, generator=g) >= sparsity
    return w.to(dtype), mask, torch.randn(out_f, generator=g).to(dtype)


def _nm_mask(w: torch.Tensor) -> torch.Tensor:
    """2:4 by magnitude, the usual N:M pruning."""
    groups = w.abs().reshape(w.shape[0], -1, 4)
    keep = groups.argsort(-1, descending=True).argsort(-1) < 2
    return keep.reshape(w.shape)


def _build(layout, dtype=torch.float32, bias=True, seed=0):
    w, mask, b = _pruned(dtype=dtype, seed=seed)
    if layout == "nm":
        mask = _nm_mask(w)
    return SparseLinear.from_dense(w, b if bias else None, mask, layout, **LAYOUTS[layout]), w, mask


@pytest.mark.parametrize("layout", LAYOUTS)
def test_output_equals_the_dense_linear(layout):
    for bias in (True, False):
        sl, w, mask = _build(layout, bias=bias)
        dense = torch.where(mask, w, 0.0)
        assert torch.equal(sl.dense_weight(), dense) and torch.equal(sl.mask(), mask)
        assert sl.nnz == int(mask.sum()) and sl.sparsity == pytest.approx(1 - int(mask.sum()) / mask.numel())
        for shape in ((1, 32), (5, 32), (2, 3, 32), (32,)):
            x = torch.randn(shape)
            want = F.linear(x, dense, sl.bias)
            for ctx in (torch.no_grad, torch.inference_mode, torch.enable_grad):
                with ctx():
                    y = sl(x)
                assert y.shape == want.shape
                if sl.kernel == "csr_cpu" and ctx is not torch.enable_grad:
                    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
                else:
                    assert torch.equal(y, want), (layout, shape, ctx)


def test_kernels_and_reasons():
    assert _build("csr")[0].kernel == "csr_cpu" and _build("csr")[0].kernel_reason is None
    assert _build("bitmask")[0].kernel == "dense_rebuild"
    nm = _build("nm")[0]
    assert nm.kernel == "dense_rebuild" and "NVIDIA" in nm.kernel_reason
    half = _build("csr", dtype=torch.bfloat16)[0]
    assert half.kernel == "dense_rebuild" and "fp32/fp64 only" in half.kernel_reason
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(half(x), F.linear(x, half.dense_weight(), half.bias))
    assert select_sparse_kernel("nm", torch.float16, "cpu", (64, 64), 1, 4)[1].startswith("nm 1:4")
    assert "csr" in repr(_build("csr")[0]) and "kernel=csr_cpu" in repr(_build("csr")[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_semi_structured_on_cuda():  # pragma: no cover - runs only where a GPU is lent
    w = torch.randn(128, 256)
    sl = SparseLinear.from_dense(w, torch.randn(128), _nm_mask(w), "nm", n=2, m=4).half().cuda()
    x = torch.randn(64, 256, dtype=torch.float16, device="cuda")
    major, _ = torch.cuda.get_device_capability()
    assert sl.kernel == ("semi_structured_cuda" if major >= 8 else "dense_rebuild")
    with torch.no_grad():
        torch.testing.assert_close(sl(x), F.linear(x, sl.dense_weight(), sl.bias), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nbytes_counts_values_pattern_and_bias(layout, dtype):
    sl, w, mask = _build(layout, dtype=dtype)
    vb = torch.empty((), dtype=dtype).element_size()
    stored = sparse_nbytes(layout, (24, 32), int(mask.sum()), vb, **LAYOUTS[layout])
    assert sl.nbytes == stored + 24 * vb
    tensors = [sl.values, sl.bias, *sl.buffers()]
    assert sl.nbytes == sum(t.nbytes for t in tensors)
    assert sl.nbytes < w.nbytes  # 70% sparse (or 2:4): smaller than the dense weight alone


@pytest.mark.parametrize("layout", LAYOUTS)
def test_training_moves_values_never_the_pattern(layout):
    sl, w, mask = _build(layout)
    ref = nn.Linear(32, 24)
    with torch.no_grad():
        ref.weight.copy_(sl.dense_weight())
        ref.bias.copy_(sl.bias)
    x, target = torch.randn(16, 32), torch.randn(16, 24)
    sl.train()
    F.mse_loss(sl(x), target).backward()
    F.mse_loss(ref(x), target).backward()
    stored_mask = sl.mask()
    # the values' gradient is the dense gradient at the stored positions, in storage order
    if layout == "nm":
        want = ref.weight.grad.view(24, 8, 4)[stored_mask.view(24, 8, 4)].view(24, 16)
    else:
        want = ref.weight.grad[stored_mask]
    torch.testing.assert_close(sl.values.grad, want)
    torch.testing.assert_close(sl.bias.grad, ref.bias.grad)
    assert [n for n, p in sl.named_parameters()] == ["values", "bias"]
    before = sl.dense_weight()
    opt = torch.optim.SGD(sl.parameters(), lr=0.5)
    for _ in range(3):
        opt.step()
        opt.zero_grad()
        F.mse_loss(sl(x), target).backward()
    after = sl.dense_weight()
    assert torch.equal(sl.mask(), stored_mask)
    assert bool((after[~stored_mask] == 0).all()) and not torch.equal(after, before)
    assert bool((after[stored_mask] != before[stored_mask]).any())


def test_nm_from_a_mask_that_is_not_nm_errors_clearly():
    w, mask, b = _pruned(sparsity=0.3)
    with pytest.raises(ValueError, match=r"SparseLinear.from_dense: .*not 2:4: row \d+, columns \d+\.\.\d+ keep"):
        SparseLinear.from_dense(w, b, mask, "nm", n=2, m=4)
    with pytest.raises(ValueError, match="in_features 30 is not a multiple of m=4"):
        SparseLinear.from_dense(torch.randn(4, 30), None, None, "nm", n=2, m=4)
    with pytest.raises(ValueError, match="bias must be a float tensor of shape \\(24,\\)"):
        SparseLinear.from_dense(w, torch.randn(23), mask)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        SparseLinear.from_dense(w, b, mask[:, :3])
    with pytest.raises(ValueError, match=r"nnz=5 does not match 2:4 on \[24, 32\]"):
        SparseLinear(32, 24, "nm", 5, n=2, m=4)
    with pytest.raises(ValueError, match="layout must be one of"):
        SparseLinear(32, 24, "coo", 5)
    with pytest.raises(ValueError, match="nnz must be an integer in 0..768"):
        SparseLinear(32, 24, "csr", 769)
    sl = _build("csr")[0]
    with pytest.raises(ValueError, match="does not match in_features=32"):
        sl(torch.randn(3, 31))
    with pytest.raises(TypeError, match="floating-point"):
        sl(torch.ones(3, 32, dtype=torch.long))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_shell_reloads_a_state_dict_and_safetensors(layout, tmp_path):
    sl, _, _ = _build(layout)
    shell = SparseLinear(32, 24, layout, sl.nnz, n=sl.n, m=sl.m)
    assert shell.nbytes == sl.nbytes and not torch.equal(shell.dense_weight(), sl.dense_weight())
    shell.load_state_dict(sl.state_dict())
    x = torch.randn(4, 32)
    with torch.no_grad():
        assert torch.equal(shell(x), sl(x)) and torch.equal(shell.mask(), sl.mask())
    save_model(sl, str(tmp_path / "m.safetensors"))
    again = SparseLinear(32, 24, layout, sl.nnz, n=sl.n, m=sl.m)
    load_model(again, str(tmp_path / "m.safetensors"))
    assert torch.equal(again.dense_weight(), sl.dense_weight())


def test_a_corrupt_or_mistyped_state_dict_is_refused():
    sl = _build("csr")[0]
    sd = sl.state_dict()
    bad = dict(sd, col_indices=torch.full_like(sd["col_indices"], 40))
    with pytest.raises(RuntimeError, match="invalid: csr: col_indices must lie in 0..31"):
        SparseLinear(32, 24, "csr", sl.nnz).load_state_dict(bad)
    with pytest.raises(RuntimeError, match="col_indices is stored as torch.int32 but this SparseLinear"):
        SparseLinear(32, 24, "csr", sl.nnz).load_state_dict(dict(sd, col_indices=sd["col_indices"].int()))
    with pytest.raises(RuntimeError, match="size mismatch"):
        SparseLinear(32, 24, "csr", sl.nnz + 1).load_state_dict(sd)


def test_half_casts_values_not_the_pattern():
    sl = _build("nm")[0]
    positions = sl.positions.clone()
    sl = sl.half()
    assert sl.values.dtype == torch.float16 and torch.equal(sl.positions, positions)
    assert sl.dense_weight().dtype == torch.float16


def test_from_linear_keeps_the_layer():
    lin = nn.Linear(32, 24)
    with torch.no_grad():
        lin.weight[lin.weight.abs() < 0.1] = 0
    sl = SparseLinear.from_linear(lin, layout="csr")
    assert torch.equal(sl.mask(), lin.weight != 0)
    x = torch.randn(2, 32)
    with torch.no_grad():
        torch.testing.assert_close(sl(x), lin(x))
    with pytest.raises(TypeError, match="expects an nn.Linear"):
        SparseLinear.from_linear(nn.Conv2d(1, 1, 1))


# ----------------------------------------------------------------------------- SparseConv2d

@pytest.mark.parametrize("layout", LAYOUTS)
def test_sparse_conv_equals_the_dense_conv_and_trains_on_its_pattern(layout):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1, stride=2, groups=2)  # matrix [16, 36]
    w = conv.weight.detach()
    mask = _nm_mask(w.reshape(16, -1)).reshape(w.shape) if layout == "nm" else w.abs() > 0.1
    sc = SparseConv2d.from_conv(conv, mask, layout, **LAYOUTS[layout])
    assert (sc.in_features, sc.out_features, sc.kernel) == (36, 16, "dense_rebuild")
    assert torch.equal(sc.mask(), mask.reshape(16, 36))
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        want = F.conv2d(x, torch.where(mask, w, 0.0), conv.bias, 2, 1, 1, 2)
        assert torch.equal(sc(x), want) and torch.equal(sc(x[0]), want[0])
    same = SparseConv2d.from_dense(w, conv.bias, mask=mask, stride=2, padding=1, groups=2, layout=layout,
                                   **LAYOUTS[layout])
    assert same.state_dict().keys() == sc.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), sc.state_dict().values()))
    shell = SparseConv2d(8, 16, 3, layout, sc.nnz, stride=2, padding=1, groups=2, **LAYOUTS[layout])
    shell.load_state_dict(sc.state_dict())
    with torch.no_grad():
        assert torch.equal(shell(x), want)
    pattern = sc.mask()
    sc(x).square().mean().backward()
    torch.optim.SGD(sc.parameters(), lr=1.0).step()
    assert torch.equal(sc.mask(), pattern) and bool((sc.dense_weight()[~pattern] == 0).all())
    with pytest.raises(ValueError, match="does not match in_channels=8"):
        sc(torch.randn(1, 3, 9, 9))


def test_sparse_conv_refuses_bad_geometry():
    with pytest.raises(ValueError, match="padding_mode 'reflect' is not supported"):
        SparseConv2d(4, 4, 3, "csr", 3, padding_mode="reflect")
    with pytest.raises(ValueError, match="divisible by groups=3"):
        SparseConv2d(4, 4, 3, "csr", 3, groups=3)
    with pytest.raises(TypeError, match="expects an nn.Conv2d"):
        SparseConv2d.from_conv(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"weight must be \[out, in/groups, kh, kw\], got \(4, 9\)"):
        SparseConv2d.from_dense(torch.randn(4, 9))
    with pytest.raises(ValueError, match=r"SparseConv2d.from_dense: .*not 2:4"):
        SparseConv2d.from_dense(torch.ones(4, 4, 1, 1), layout="nm", n=2, m=4)
