"""The shared training loop: deterministic under a seed, resumable to the same bytes,
early stopping that keeps the best weights, mixed precision with fp32 master weights, and
dynamic loss scaling that skips bad steps and backs off."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shrink.data.labeled import Labeled, rebatch, split_batch
from shrink.train.amp import LossScaler, scaler_for
from shrink.train.engine import TrainOptions, train
from shrink.train.loop import finetune


def _data(n=192, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g)
    w = torch.randn(12, 3, generator=g)
    y = (x @ w).argmax(-1)
    return [Labeled(x[i:i + 32], y[i:i + 32]) for i in range(0, n, 32)]


def _model(seed=0, dropout=0.1):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Dropout(dropout), nn.Linear(24, 3))


def _ce(model, batch):
    x, y = split_batch(batch)
    return F.cross_entropy(model(x), y)


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.state_dict().values()])


def test_same_seed_same_weights_and_other_seed_differs():
    data = _data()
    a, b, c = _model(), _model(), _model()
    train(a, data, _ce, TrainOptions(steps=30, lr=1e-2, seed=1))
    train(b, data, _ce, TrainOptions(steps=30, lr=1e-2, seed=1))
    train(c, data, _ce, TrainOptions(steps=30, lr=1e-2, seed=2))
    assert torch.equal(_flat(a), _flat(b))
    assert not torch.equal(_flat(a), _flat(c))
    state = torch.get_rng_state()
    train(_model(), data, _ce, TrainOptions(steps=3, lr=1e-2, seed=1))
    assert torch.equal(state, torch.get_rng_state())   # the caller's generator is left as it was


def test_resume_from_a_checkpoint_gives_the_same_bytes(tmp_path):
    data = _data()
    opts = dict(steps=40, lr=1e-2, seed=3, checkpoint_every=7)
    straight = _model()
    rec_a = train(straight, data, _ce, TrainOptions(**opts, checkpoint=str(tmp_path / "a.pt")))

    ckpt = tmp_path / "b.pt"
    killed = _model()
    calls = []

    def die(step, model):
        calls.append(step)
        if step == 23:    # after the checkpoint at step 21, before the next one
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(killed, data, _ce, TrainOptions(**opts, checkpoint=str(ckpt)), callback=die)
    assert torch.load(ckpt, weights_only=True)["step"] == 21
    resumed = _model(seed=5)   # a fresh process: different initial weights, different RNG state
    torch.manual_seed(12345)
    rec_b = train(resumed, data, _ce, TrainOptions(**opts, checkpoint=str(ckpt), resume=True))
    assert rec_b.resumed_from == 21
    assert torch.equal(_flat(straight), _flat(resumed))
    assert rec_a.losses == rec_b.losses


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    data = _data()
    ckpt = str(tmp_path / "c.pt")
    train(_model(), data, _ce, TrainOptions(steps=5, lr=1e-2, checkpoint=ckpt))
    with pytest.raises(ValueError, match="different run"):
        train(_model(), data, _ce, TrainOptions(steps=9, lr=1e-2, checkpoint=ckpt, resume=True))


def test_epochs_count_passes_over_the_batches():
    data = _data()   # 6 batches
    rec = train(_model(), data, _ce, TrainOptions(epochs=2.5, lr=1e-2))
    assert rec.steps == 15 and len(rec.losses) == 15


def test_early_stop_restores_the_best_evaluated_weights():
    data = _data()
    model = _model()
    scores = iter([0.5, 0.9, 0.8, 0.7, 0.6, 0.95])
    snapshots = {}

    def evaluate(m):
        snapshots[len(snapshots) + 1] = _flat(m).clone()
        return {"value": next(scores), "higher_is_better": True}

    rec = train(model, data, _ce, TrainOptions(steps=60, lr=1e-2, eval_every=5, patience=3), evaluate=evaluate)
    assert rec.stopped_early and len(rec.losses) == 25    # evaluations at 5..25; best at 10, three worse after
    assert rec.best_step == 10
    assert torch.equal(_flat(model), snapshots[2])


def test_lower_is_better_metrics_are_minimised():
    data = _data()
    vals = iter([3.0, 2.0, 2.5, 2.6])
    rec = train(_model(), data, _ce, TrainOptions(steps=20, lr=1e-2, eval_every=5, patience=2),
                evaluate=lambda m: {"value": next(vals), "higher_is_better": False})
    assert rec.best_step == 10 and rec.stopped_early


def test_bf16_autocast_keeps_fp32_master_weights_and_learns():
    data = _data()
    model = _model(dropout=0.0)
    with torch.no_grad():
        before = sum(float(_ce(model, b)) for b in data)
    rec = train(model, data, _ce, TrainOptions(steps=60, lr=1e-2, precision="bf16"))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert rec.precision == "bf16" and rec.skipped_steps == 0
    with torch.no_grad():
        assert sum(float(_ce(model, b)) for b in data) < 0.7 * before


def test_fp16_loss_scaling_skips_overflowing_steps_and_backs_off():
    data = _data()
    model = _model(dropout=0.0)
    ref = [p.detach().clone() for p in model.parameters()]
    calls = [0]

    def loss(m, batch):
        calls[0] += 1
        value = _ce(m, batch)
        return value * float("inf") if calls[0] <= 2 else value   # two overflowing steps first

    rec = train(model, data, loss, TrainOptions(steps=2, lr=1e-2, precision="fp16"))
    assert rec.skipped_steps == 2
    assert all(torch.equal(p, r) for p, r in zip(model.parameters(), ref))   # nothing applied
    rec = train(model, data, loss, TrainOptions(steps=10, lr=1e-2, precision="fp16"))
    assert rec.skipped_steps == 0
    assert not all(torch.equal(p, r) for p, r in zip(model.parameters(), ref))


def test_loss_scaler_rules():
    s = LossScaler(init_scale=1024.0, growth_interval=3)
    p = nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([2048.0, 1024.0, 0.0])
    assert s.unscale([p]) and torch.equal(p.grad, torch.tensor([2.0, 1.0, 0.0]))   # divided by the scale
    s.update(False)
    s.update(False)
    assert s.scale_value == 1024.0
    s.update(False)
    assert s.scale_value == 2048.0 and s.clean_steps == 0          # grown after 3 clean steps
    p.grad = torch.tensor([1.0, float("nan"), 0.0])
    assert not s.unscale([p])
    s.update(True)
    assert s.scale_value == 1024.0 and s.skipped == 1            # backed off by half
    assert float(s.scale(torch.tensor(2.0))) == 2048.0
    off = scaler_for("bf16")
    assert not off.enabled and float(off.scale(torch.tensor(3.0))) == 3.0
    with pytest.raises(ValueError, match="backoff"):
        LossScaler(backoff=1.5)


def test_options_validate():
    with pytest.raises(ValueError, match="steps or epochs"):
        TrainOptions()
    with pytest.raises(ValueError, match="steps or epochs"):
        TrainOptions(steps=3, epochs=1)
    with pytest.raises(ValueError, match="precision"):
        TrainOptions(steps=3, precision="fp8")
    with pytest.raises(ValueError, match="resume needs"):
        TrainOptions(steps=3, resume=True)
    with pytest.raises(ValueError, match="no trainable"):
        m = _model()
        for p in m.parameters():
            p.requires_grad_(False)
        train(m, _data(), _ce, TrainOptions(steps=2))


def test_finetune_with_labels_uses_cross_entropy():
    data = _data()
    model = _model(dropout=0.0)
    rec = finetune(model, data, epochs=10, lr=1e-2)
    assert rec.loss == "ce"
    acc = sum(int((model(b.inputs).argmax(-1) == b.labels).sum()) for b in data) / 192
    assert acc > 0.8


def test_rebatch_keeps_every_sample_in_order():
    data = _data()
    out = rebatch(data, 50)
    assert [len(b.labels) for b in out] == [50, 50, 50, 42]
    assert torch.equal(torch.cat([b.inputs for b in out]), torch.cat([b.inputs for b in data]))
    d = rebatch([{"input_ids": torch.arange(6).view(3, 2)}, {"input_ids": torch.arange(4).view(2, 2)}], 4)
    assert [b["input_ids"].shape[0] for b in d] == [4, 1]
    with pytest.raises(ValueError, match="batch_size"):
        rebatch(data, 0)
    with pytest.raises(ValueError, match="different sequence shapes"):
        rebatch([{"input_ids": torch.zeros(2, 5, dtype=torch.long)}, {"input_ids": torch.zeros(2, 7, dtype=torch.long)}], 3)
    assert math.isclose(1.0, 1.0)
