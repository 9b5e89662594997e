"""conv_patches: im2col rows that make a Conv2d a Linear, in weight_view()'s column order.

The defining identity, checked in float64 over stride/padding/dilation/padding
modes: conv(x) - bias == (patches @ weight_view().T) reshaped to
[N, out_h, out_w, out] and permuted to [N, out, out_h, out_w]. And its point:
the Hessian of the patches gives a conv's layer error exactly, as it does a
Linear's.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import shrink
from shrink.models.digits import digits_data
from shrink.observe import HessianObserver
from shrink.surgery import conv_patches, select_modules


def _as_conv_output(patch_out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[N*L, out] -> [N, out, out_h, out_w] shaped like the conv's output."""
    n, c, h, w = like.shape
    return patch_out.reshape(n, h, w, c).permute(0, 3, 1, 2)


def _no_bias(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        y = conv(x)
    return y if conv.bias is None else y - conv.bias.reshape(-1, 1, 1)


GEOMETRIES = {
    "plain": dict(),
    "padding1": dict(padding=1),
    "stride2": dict(stride=2, padding=1),
    "asym": dict(stride=(2, 1), padding=(2, 0), dilation=(1, 2)),
    "same-dilated": dict(padding="same", dilation=2),
    "valid": dict(padding="valid"),
    "reflect": dict(padding=(1, 2), padding_mode="reflect"),
    "replicate-same": dict(padding="same", padding_mode="replicate"),
    "circular": dict(padding=1, padding_mode="circular", stride=2),
}


@pytest.mark.parametrize("geometry", GEOMETRIES.values(), ids=GEOMETRIES.keys())
@pytest.mark.parametrize("kernel_size", [3, (2, 3), 1])
def test_patches_times_weight_view_is_the_conv(geometry, kernel_size):
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 7, kernel_size, bias=True, **geometry).double()
    x = torch.randn(3, 5, 10, 9, dtype=torch.float64)
    target = select_modules(nn.Sequential(conv)).targets[0]
    p = conv_patches(x, conv)
    y = _no_bias(conv, x)
    assert p.shape == (3 * y.shape[2] * y.shape[3], target.in_features) and p.dtype == torch.float64
    got = _as_conv_output(p @ target.weight_view().detach().T, y)
    torch.testing.assert_close(got, y, rtol=1e-12, atol=1e-12)
    # unbatched input: the same rows as a batch of one
    assert torch.equal(conv_patches(x[0], conv), conv_patches(x[:1], conv))


def test_grouped_conv_needs_a_group_and_each_group_is_its_rows():
    torch.manual_seed(1)
    conv = nn.Conv2d(6, 9, 3, padding=1, groups=3, bias=False).double()
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    y = _no_bias(conv, x)
    w = conv.weight.detach().reshape(9, -1)  # weight_view(): [out, in/groups*kh*kw] = [9, 18]
    for g in range(3):
        p = conv_patches(x, conv, group=g)
        assert p.shape == (2 * 49, 18)
        rows = slice(3 * g, 3 * g + 3)
        torch.testing.assert_close(_as_conv_output(p @ w[rows].T, y[:, rows]), y[:, rows], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="groups=3.*pass group=g"):
        conv_patches(x, conv)
    with pytest.raises(ValueError, match=r"group must be an integer in \[0, 3\)"):
        conv_patches(x, conv, group=3)
    with pytest.raises(ValueError, match="conv has groups=1"):
        conv_patches(x[:, :2], nn.Conv2d(2, 2, 3), group=1)


def test_patch_hessian_gives_the_conv_layer_error_on_real_data():
    """On digits-cnn's second conv and its real inputs: for any weight change dW,
    sum over outputs of (conv_dW(x))^2 / n == tr(dW H dW^T) / 2 with H from the
    patches (n = number of patches): the identity GPTQ relies on."""
    model = shrink.load("digits-cnn").double()
    conv = model[4]
    with torch.no_grad():
        x = model[:4](digits_data().x_test[:100].double())
    obs = HessianObserver(conv.weight[0].numel())
    p = conv_patches(x, conv)
    obs.observe(p)
    h = obs.hessian()
    torch.testing.assert_close(h, 2.0 * p.T @ p / p.shape[0], rtol=1e-12, atol=1e-12)
    dw = torch.randn(conv.weight.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 1e-2
    with torch.no_grad():
        err = torch.nn.functional.conv2d(x, dw, None, conv.stride, conv.padding)
    dw2 = dw.reshape(conv.out_channels, -1)
    torch.testing.assert_close(err.pow(2).sum() / p.shape[0], torch.trace(dw2 @ h @ dw2.T) / 2, rtol=1e-10, atol=0)


def test_bad_inputs_are_refused():
    conv = nn.Conv2d(4, 4, 3)
    with pytest.raises(TypeError, match="expects an nn.Conv2d"):
        conv_patches(torch.randn(1, 4, 5, 5), nn.Linear(4, 4))
    with pytest.raises(TypeError, match="floating-point"):
        conv_patches(torch.ones(1, 4, 5, 5, dtype=torch.int64), conv)
    with pytest.raises(ValueError, match=r"shape \(1, 3, 5, 5\) does not match in_channels=4"):
        conv_patches(torch.randn(1, 3, 5, 5), conv)
    with pytest.raises(ValueError, match="does not match in_channels"):
        conv_patches(torch.randn(4, 25), conv)
