"""Early-exit training: attaching seeded heads, the joint loss against a direct computation
(cross-entropy with labels, T^2 KL from the final head without), a frozen base that stays
bit-exact (BatchNorm statistics included), train_base moving the base, and the trade-off
table against a direct per-row reference."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shrink.data.labeled import labeled_batches
from shrink.models.digits import digits_cnn, digits_data, digits_mlp
from shrink.modules import EarlyExitModel
from shrink.train.early_exit import attach_exits, batch1_latency_ms, exit_accuracies, exit_loss, tradeoff, train_exits
from shrink.train.engine import TrainOptions


@pytest.fixture(scope="module")
def data():
    d = digits_data()
    return d


def _labeled(d, n=256, bs=64):
    return labeled_batches(d.x_train[:n], d.y_train[:n], bs)


def _trained_base(kind: str) -> nn.Sequential:
    """The built-in trained classifier (cached on disk after its first use)."""
    import shrink

    return shrink.load(f"digits-{kind}")


def test_attach_defaults_seeds_and_errors():
    a = attach_exits(digits_mlp(), seed=3)
    b = attach_exits(digits_mlp(), seed=3)
    c = attach_exits(digits_mlp(), seed=4)
    assert isinstance(a, EarlyExitModel) and a.exits == (0, 1) and a.threshold == 0.9
    assert torch.equal(a.heads[0].linear.weight, b.heads[0].linear.weight)
    assert not torch.equal(a.heads[0].linear.weight, c.heads[0].linear.weight)
    assert [tuple(h.linear.weight.shape) for h in a.heads] == [(10, 128), (10, 64)]
    cnn = attach_exits(digits_cnn(), exits=[1])
    assert cnn.exits == (1,) and cnn.heads[0].linear.in_features == 4 * 32
    with pytest.raises(ValueError, match="already has exit heads"):
        attach_exits(a)
    with pytest.raises(ValueError, match=r"early_exit supports nn.Sequential classifiers"):
        attach_exits(nn.Linear(64, 10))
    with pytest.raises(ValueError, match=r"layer indices in 0..1"):
        attach_exits(digits_mlp(), exits=[5])


def test_loss_with_labels_is_the_mean_cross_entropy_of_the_exits(data):
    torch.manual_seed(0)
    ee = attach_exits(digits_mlp()).train()
    batch = _labeled(data)[0]
    x, y = batch
    outs = [o.double() for o in ee.forward_all(x)]
    ce = [F.cross_entropy(o, y).item() for o in outs]
    assert exit_loss()(ee, batch).item() == pytest.approx((ce[0] + ce[1]) / 2, rel=1e-5)
    assert exit_loss(train_base=True)(ee, batch).item() == pytest.approx(sum(ce) / 3, rel=1e-5)
    assert exit_loss(weights=[3, 1])(ee, batch).item() == pytest.approx(0.75 * ce[0] + 0.25 * ce[1], rel=1e-5)
    with pytest.raises(ValueError, match="weights must be 2 non-negative numbers"):
        exit_loss(weights=[1, 1, 1])(ee, batch)


def test_loss_without_labels_distills_the_final_head(data):
    ee = attach_exits(_trained_base("mlp")).train()   # confident final logits: a KL far from 0
    x = data.x_train[:32]
    outs = [o.detach().double() for o in ee.forward_all(x)]
    t = 2.0

    def kl(s, teacher):   # T^2 KL(softmax(teacher / T) || softmax(s / T)), mean over rows
        p = F.log_softmax(teacher / t, -1)
        q = F.log_softmax(s / t, -1)
        return float((p.exp() * (p - q)).sum(-1).mean()) * t * t

    want = (kl(outs[0], outs[2]) + kl(outs[1], outs[2])) / 2
    assert want > 0.1
    assert exit_loss(temperature=t)(ee, x).item() == pytest.approx(want, rel=1e-5)
    loss = exit_loss()(ee, x)
    loss.backward()   # the final head is the teacher: it gets no gradient from this loss
    assert ee.base[4].weight.grad is None or float(ee.base[4].weight.grad.abs().max()) == 0.0
    with pytest.raises(ValueError, match="temperature"):
        exit_loss(temperature=0)


def test_frozen_base_stays_bit_exact_and_the_heads_learn(data):
    base = _trained_base("cnn")
    state = {k: v.clone() for k, v in base.state_dict().items()}   # BatchNorm statistics included
    ee = attach_exits(base)
    heads0 = [h.linear.weight.clone() for h in ee.heads]
    before = exit_accuracies(ee, data.x_test, data.y_test)
    tr = train_exits(ee, _labeled(data, 512), TrainOptions(steps=40, lr=1e-2))
    after = exit_accuracies(ee, data.x_test, data.y_test)
    for k, v in ee.base.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(p.requires_grad for p in ee.base.parameters()) and not ee.base_frozen and not ee.training
    assert all(not torch.equal(h.linear.weight, w) for h, w in zip(ee.heads, heads0))
    assert after[-1] == before[-1] > 0.95
    assert after[0] > before[0] + 0.2 and after[1] > before[1] + 0.2
    assert tr.loss == "early_exit" and len(tr.losses) == 40
    assert sum(tr.losses[-5:]) < sum(tr.losses[:5])


def test_train_base_moves_the_base(data):
    ee = attach_exits(_trained_base("mlp"))
    w0 = ee.base[0].weight.clone()
    train_exits(ee, _labeled(data), TrainOptions(steps=5, lr=1e-3), train_base=True)
    assert not torch.equal(ee.base[0].weight, w0)
    ee2 = attach_exits(_trained_base("mlp"))
    unlabeled = [b.inputs for b in _labeled(data)]
    tr = train_exits(ee2, unlabeled, TrainOptions(steps=5, lr=1e-3), train_base=True)   # teacher: a copy
    assert all(math.isfinite(v) for v in tr.losses) and not torch.equal(ee2.base[0].weight, w0)


def test_tradeoff_against_a_direct_per_row_reference(data):
    ee = attach_exits(_trained_base("mlp"))
    train_exits(ee, _labeled(data, 512), TrainOptions(steps=30, lr=1e-2))
    x, y = data.x_test[:200], data.y_test[:200]
    rows = tradeoff(ee, x, y, thresholds=(0.5, 0.9, 1.0), latency_rows=8, repeats=1)
    assert ee.threshold == 0.9
    with torch.no_grad():
        outs = ee.forward_all(x)
        base_acc = float((ee.base(x).argmax(-1) == y).double().mean())
    conf = [o.softmax(-1).amax(-1) for o in outs[:-1]]
    for r in rows:
        t = r["threshold"]
        first = [next((j for j in range(2) if t < 1 and conf[j][i] >= t), 2) for i in range(len(x))]
        pred = torch.stack([outs[j][i] for i, j in enumerate(first)]).argmax(-1)
        assert r["accuracy"] == pytest.approx(float((pred == y).double().mean()))
        assert r["counts"] == [first.count(j) for j in range(3)] and r["samples"] == 200
        assert sum(r["fractions"]) == pytest.approx(1.0)
        assert r["mean_layers"] == pytest.approx(sum(j + 1 for j in first) / 200)
        assert r["latency_ms"] > 0 and 0 < r["compute_fraction"] <= 1.2
    assert rows[-1]["accuracy"] == pytest.approx(base_acc) and rows[-1]["compute_fraction"] == 1.0
    assert rows[0]["mean_layers"] < rows[1]["mean_layers"] < 3.0
    assert batch1_latency_ms(ee.base, x[:4], repeats=1) > 0
