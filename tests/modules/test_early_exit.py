"""EarlyExitModel: threshold >= 1 is the base model bit for bit, threshold 0 leaves at the
first head, batched exits equal each row run alone and a direct per-row reference, the
exit statistics and MAC counts against hand counts, the heads' 2x2 pooling against a
float64 computation, and clear errors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from shrink.models.digits import digits_cnn, digits_mlp
from shrink.modules import EarlyExitModel, ExitHead
from shrink.modules.early_exit import ExitView, exit_width, sequential_layers, stage_ends


def _model(kind: str, threshold: float = 0.5, seed: int = 0) -> EarlyExitModel:
    torch.manual_seed(seed)
    base = digits_mlp() if kind == "mlp" else digits_cnn()
    for m in base.modules():   # non-trivial BatchNorm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    base.eval()
    heads = []
    for e in (0, 1):
        width, pool = exit_width(base, e)
        heads.append(ExitHead(width, 10, pool))
    with torch.no_grad():   # sharper heads: confidences spread over about (0.5, 1)
        for h, scale in zip(heads, (8.0, 8.0) if kind == "mlp" else (24.0, 40.0)):
            h.linear.weight.mul_(scale)
    return EarlyExitModel(base, (0, 1), heads, threshold).eval()


def _x(n: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 64, generator=torch.Generator().manual_seed(seed))


def test_layers_and_stages_of_the_digits_models():
    mlp, cnn = digits_mlp(), digits_cnn()
    assert sequential_layers(mlp) == [0, 2, 4] and stage_ends(mlp, (0, 1)) == [2, 4]
    # Unflatten, Conv, BN, ReLU, Conv, BN, ReLU, MaxPool, Flatten, Linear
    assert sequential_layers(cnn) == [1, 4, 9] and stage_ends(cnn, (0, 1)) == [4, 7]
    assert exit_width(mlp, 0) == (128, "flatten") and exit_width(cnn, 1) == (4 * 32, "avg2x2")


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("threshold", [1.0, 1.5])
def test_threshold_one_or_more_is_the_base_model_exactly(kind, threshold):
    ee = _model(kind, threshold)
    x = _x()
    with torch.no_grad():
        ref, ref1 = ee.base(x), ee.base(x[:1])
        with ee.recording() as st:
            got = ee(x)
            one = ee(x[:1])
    assert torch.equal(got, ref) and torch.equal(one, ref1)
    assert st.counts == [0, 0, 65] and st.depth_fraction() == 1.0


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_threshold_zero_exits_everything_at_the_first_head(kind):
    ee = _model(kind, 0.0)
    x = _x()
    with torch.no_grad():
        ref = ee.heads[0](ee.base[:stage_ends(ee.base, (0,))[0]](x))
        with ee.recording() as st:
            got = ee(x)
    assert torch.equal(got, ref)
    assert st.counts == [64, 0, 0] and st.fractions() == [1.0, 0.0, 0.0]
    assert st.mean_stages() == 1.0 and st.mean_layers() == 1.0 and st.depth_fraction() == pytest.approx(1 / 3)


def _mixed_threshold(conf: torch.Tensor) -> float:
    """A threshold at which rows leave at every exit and at the final head, far (> 1e-5) from
    every confidence, so float rounding cannot move a row across it."""
    v = conf.flatten().sort().values
    for k in range(len(v) - 1):
        t = float((v[k] + v[k + 1]) / 2)
        if v[k + 1] - v[k] < 2e-5:
            continue
        leave0 = conf[0] >= t
        leave1 = ~leave0 & (conf[1] >= t)
        if 0 < int(leave0.sum()) and 0 < int(leave1.sum()) and int((~leave0 & ~leave1).sum()) > 0:
            return t
    raise AssertionError("no threshold mixes the exits")


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_batched_exits_equal_each_row_alone_and_the_direct_reference(kind):
    ee = _model(kind)
    x = _x(96)
    with torch.no_grad():
        outs = ee.forward_all(x)
        conf = torch.stack([o.softmax(-1).amax(-1) for o in outs[:-1]])   # [exits, N]
        t = _mixed_threshold(conf)
        ee.threshold = t
        # reference: the first exit whose confidence reaches t, else the final head
        first = [next((j for j in range(2) if conf[j, i] >= t), 2) for i in range(len(x))]
        ref = torch.stack([outs[j][i] for i, j in enumerate(first)])
        with ee.recording() as st:
            batched = ee(x)
        alone = torch.cat([ee(x[i:i + 1]) for i in range(len(x))])
    counts = [first.count(j) for j in range(3)]
    assert all(c > 0 for c in counts), counts   # the test exercises every leaving point
    assert st.counts == counts and st.calls == 1
    torch.testing.assert_close(batched, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(batched.argmax(-1), ref.argmax(-1))
    layers = sum((j + 1) * c for j, c in enumerate(counts)) / len(x)
    assert st.mean_layers() == pytest.approx(layers) and st.depth_fraction() == pytest.approx(layers / 3)


def test_training_mode_runs_full_depth_and_forward_all_gives_every_output():
    ee = _model("mlp", 0.0).train()
    x = _x(8)
    assert torch.equal(ee(x), ee.base(x))
    outs = ee.forward_all(x)
    assert [tuple(o.shape) for o in outs] == [(8, 10)] * 3
    torch.testing.assert_close(outs[0], ee.heads[0](ee.base[:2](x)))
    torch.testing.assert_close(outs[1], ee.heads[1](ee.base[:4](x)))
    torch.testing.assert_close(outs[2], ee.base(x))
    ee.eval()
    for j in range(3):
        torch.testing.assert_close(ExitView(ee, j)(x), ee.forward_all(x)[j])


def test_avg2x2_pooling_against_float64():
    head = ExitHead(4 * 3, 5, "avg2x2").double()
    h = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    quads = h.reshape(2, 3, 2, 4, 2, 4).mean(dim=(3, 5))   # [N, C, 2, 2]
    ref = quads.flatten(1) @ head.linear.weight.T + head.linear.bias
    torch.testing.assert_close(head(h), ref)
    with pytest.raises(ValueError, match=r"takes \[N, C, H, W\]"):
        head(torch.randn(2, 12, dtype=torch.float64))


def test_mac_counts_and_compute_fraction_against_hand_counts():
    ee = _model("mlp", 0.0)
    macs_at, base = ee.exit_macs(_x(4))
    # stages: 64*128, 128*64, 64*10; heads: 128*10, 64*10
    assert base == 64 * 128 + 128 * 64 + 64 * 10
    assert macs_at == (64 * 128 + 1280, 64 * 128 + 128 * 64 + 1280 + 640, base + 1280 + 640)
    with ee.recording((macs_at, base)) as st:
        ee(_x(10))
    assert st.compute_fraction() == pytest.approx(macs_at[0] / base)
    ee.threshold = 1.0
    with ee.recording((macs_at, base)) as st:   # the base alone: no head cost
        ee(_x(10))
    assert st.compute_fraction() == 1.0
    cnn = _model("cnn")
    macs_cnn, base_cnn = cnn.exit_macs(_x(2))
    conv1, conv2, fc = 64 * 16 * 9, 64 * 32 * 16 * 9, 512 * 10
    assert base_cnn == conv1 + conv2 + fc and macs_cnn[0] == conv1 + 64 * 10


def test_shell_rebuilds_and_checks_the_heads():
    ee = _model("cnn", 0.7)
    desc = ee.describe()
    assert desc == {"exits": [0, 1], "threshold": 0.7, "layers": 3,
                    "heads": [{"in_features": 64, "classes": 10, "pool": "avg2x2"},
                              {"in_features": 128, "classes": 10, "pool": "avg2x2"}]}
    shell = EarlyExitModel.shell(digits_cnn(), desc)
    shell.load_state_dict(ee.state_dict())
    shell.eval()
    x = _x(32)
    assert torch.equal(shell(x), ee(x))
    bad = {**desc, "heads": [{"in_features": 16, "classes": 10, "pool": "avg2x2"}, desc["heads"][1]]}
    with pytest.raises(ValueError, match="exit head 0 takes 16 features"):
        EarlyExitModel.shell(digits_cnn(), bad)
    with pytest.raises(ValueError, match="bad early_exit entry"):
        EarlyExitModel.shell(digits_cnn(), {"exits": [0]})


def test_clear_errors():
    with pytest.raises(ValueError, match=r"early_exit supports nn.Sequential classifiers \(digits-mlp, digits-cnn\); "
                                         r"Linear: not an nn.Sequential"):
        EarlyExitModel(nn.Linear(4, 2), (0,), [ExitHead(4, 2)])
    with pytest.raises(ValueError, match=r"give layer indices in 0..1 \(the model has 3 layers; layer 2 is the final"):
        EarlyExitModel(digits_mlp(), (2,), [ExitHead(64, 10)])
    with pytest.raises(ValueError, match="2 exits but 1 heads"):
        EarlyExitModel(digits_mlp(), (0, 1), [ExitHead(128, 10)])
    ee = _model("mlp")
    with pytest.raises(ValueError, match="threshold must be a number >= 0"):
        ee.threshold = -0.1
    with pytest.raises(ValueError, match="1 layer"):
        EarlyExitModel(nn.Sequential(nn.Linear(4, 2), nn.ReLU()), (0,), [ExitHead(2, 2)])
