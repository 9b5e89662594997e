"""Observers: calibration statistics -> ranges -> the parameters quantize() uses."""
from __future__ import annotations

import pytest
import torch

from shrink.observe import MinMaxObserver, MovingAverageMinMaxObserver, MSEObserver, PercentileObserver
from shrink.quant import QuantSpec, dequantize, quantize

ASYM = QuantSpec(bits=8, symmetric=False, granularity="tensor")


def batches(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 16, 32, generator=g) * (1 + i) for i in range(n)]


def test_minmax_observer_matches_global_extremes_and_quantize():
    xs = batches()
    obs = MinMaxObserver(ASYM)
    for x in xs:
        assert obs(x) is x  # passes the batch through unchanged
    allx = torch.cat([x.reshape(-1) for x in xs])
    lo, hi = obs.range()
    assert lo.item() == pytest.approx(min(allx.min().item(), 0.0))
    assert hi.item() == pytest.approx(max(allx.max().item(), 0.0))
    # the same parameters quantize() derives from the concatenated data
    s, z = obs.qparams()
    ref = quantize(allx, ASYM)
    assert torch.equal(s, ref.scale) and torch.equal(z, ref.zero_point)


def test_per_channel_observer_on_last_axis():
    spec = QuantSpec(bits=8, axis=-1)
    obs = MinMaxObserver(spec)
    xs = batches(3)
    for x in xs:
        obs(x)
    s, z = obs.qparams()
    assert z is None and s.shape == (32,)
    absmax = torch.stack([x.abs().amax(dim=(0, 1)) for x in xs]).amax(0)
    # scale is absmax/127 rounded *up* to fp16
    assert torch.all(s.float() >= absmax / 127)
    assert torch.all(s.float() <= (absmax / 127) * (1 + 2 ** -10))


def test_moving_average_follows_formula():
    obs = MovingAverageMinMaxObserver(ASYM, momentum=0.25)
    xs = batches(4)
    lo = hi = None
    for x in xs:
        obs(x)
        bl, bh = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
        lo = bl if lo is None else lo + 0.25 * (bl - lo)
        hi = bh if hi is None else hi + 0.25 * (bh - hi)
    rlo, rhi = obs.range()
    assert rlo.item() == pytest.approx(lo, rel=1e-6)
    assert rhi.item() == pytest.approx(hi, rel=1e-6)
    # an outlier batch widens a min/max observer for good, the moving average only a little
    mm = MinMaxObserver(ASYM)
    for x in xs:
        mm(x)
    spike = torch.zeros(4, 16, 32)
    spike[0, 0, 0] = 1000.0
    mm(spike)
    obs(spike)
    assert mm.range()[1].item() == 1000.0
    assert obs.range()[1].item() < 0.75 * hi + 0.25 * 1000.0 + 1e-3


def test_percentile_observer_matches_numpy_per_batch_average():
    np = pytest.importorskip("numpy")
    obs = PercentileObserver(ASYM, percentile=99.0)
    xs = batches(3)
    for x in xs:
        obs(x)
    his = [np.percentile(x.numpy().ravel(), 99.0) for x in xs]
    los = [np.percentile(x.numpy().ravel(), 1.0) for x in xs]
    lo, hi = obs.range()
    assert hi.item() == pytest.approx(sum(his) / 3, rel=1e-5)
    assert lo.item() == pytest.approx(sum(los) / 3, rel=1e-5)


def test_mse_observer_error_not_above_minmax():
    g = torch.Generator().manual_seed(1)
    # heavy tails: a Student-t-like sample, where clipping pays
    xs = [torch.randn(2048, generator=g) / torch.rand(2048, generator=g).clamp(min=0.05).sqrt() for _ in range(3)]
    spec = QuantSpec(bits=4, symmetric=False, granularity="tensor")
    errs = {}
    for cls in (MinMaxObserver, MSEObserver):
        obs = cls(spec)
        for x in xs:
            obs(x)
        s, z = obs.qparams()
        errs[cls.__name__] = sum(((dequantize(quantize(x, spec, scale=s, zero_point=z)) - x) ** 2).sum().item() for x in xs)
    assert errs["MSEObserver"] < errs["MinMaxObserver"]


@pytest.mark.parametrize("cls", [MinMaxObserver, MovingAverageMinMaxObserver, PercentileObserver, MSEObserver])
def test_bad_input_is_refused_clearly(cls):
    obs = cls(ASYM)
    with pytest.raises(ValueError, match="no batches"):
        obs.qparams()
    x = torch.ones(3, 4)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"\(1, 2\)"):
        obs(x)
    with pytest.raises(ValueError, match="group"):
        cls(QuantSpec(bits=4, granularity="group", group_size=8))
    chan = cls(QuantSpec(bits=8, axis=-1))
    chan(torch.randn(2, 8))
    with pytest.raises(ValueError, match="channels"):
        chan(torch.randn(2, 9))


def test_observer_does_not_modify_input():
    x = torch.randn(8, 8)
    before = x.clone()
    obs = MSEObserver(QuantSpec(bits=4, granularity="tensor"))
    obs(x)
    obs.qparams()
    assert torch.equal(x, before)
