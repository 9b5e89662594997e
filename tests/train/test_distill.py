"""Students built from the teacher (width, layers) and the distillation loop on classifiers,
encoders and causal LMs; bad input gets clear errors."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from shrink.algos.kd import hidden_loss, kd_loss
from shrink.data.labeled import Labeled
from shrink.train.distill import distill, make_distill_loss, setup
from shrink.train.engine import TrainOptions
from shrink.train.loop import lm_loss
from shrink.train.students import build_student, default_layer_map, layer_taps, n_params, sequential_blocks
from tests_support import tiny_bert, tiny_gpt2, tiny_llama


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 5)).eval()


def _cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(12 * 16, 5)).eval()


def _labeled(n_in=16, n=4, rows=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Labeled(torch.rand(rows, n_in, generator=g), torch.randint(0, 5, (rows,), generator=g)) for _ in range(n)]


def test_width_student_keeps_the_largest_units_with_their_weights():
    t = _mlp()
    s = build_student(t, {"width": 0.5})
    assert [m.out_features for m in s.model if isinstance(m, nn.Linear)] == [16, 12, 5]
    w = t[0].weight.detach()
    # unit score = l2 norm of its producer row + l2 norm of its consumer column; the kept ones are the top 16
    score = w.norm(dim=1) + t[2].weight.detach().norm(dim=0)
    top = torch.sort(torch.topk(score, 16).indices).values
    torch.testing.assert_close(s.kept[0], top)
    torch.testing.assert_close(s.model[0].weight, w[top])
    torch.testing.assert_close(s.model[2].weight[:, :], t[2].weight[s.kept[1]][:, top])
    assert s.layer_map == [0, 1]
    assert n_params(s.model) < n_params(t)
    x = torch.rand(3, 16)
    assert s.model(x).shape == t(x).shape
    assert s.model is not t and t[0].weight.shape == (32, 16)   # the teacher is untouched


def test_layer_student_of_a_sequential_rewires_and_records():
    t = _mlp()
    blocks, head = sequential_blocks(t)
    assert blocks == [[0, 1], [2, 3]] and head == 4
    s = build_student(t, {"layers": [0]})
    assert isinstance(s.model[2], nn.Identity) and isinstance(s.model[3], nn.Identity)
    assert s.reinitialized == ["4"] and s.model[4].in_features == 32
    torch.testing.assert_close(s.model[0].weight, t[0].weight)
    s1 = build_student(t, {"layers": [1]})   # the kept layer now reads the input
    assert s1.reinitialized == ["2"] and s1.model[2].in_features == 16
    torch.testing.assert_close(s1.model[4].weight, t[4].weight)
    c = build_student(_cnn(), {"layers": [0]})   # conv -> flatten -> linear: 8 channels x 16 positions
    assert c.reinitialized == ["9"] and c.model[9].in_features == 8 * 16
    assert c.model(torch.rand(2, 64)).shape == (2, 5)


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama, tiny_bert])
def test_transformer_students(make):
    t = make()
    s = build_student(t, {"layers": [0, 2]})
    assert len(layer_taps(s.model)) == 2 and s.layer_map == [0, 2]
    assert s.model.config.num_hidden_layers == 2 and s.config["config_loadable"]
    assert t.config.num_hidden_layers == 3
    w = build_student(t, {"width": 0.5})
    key = "n_inner" if hasattr(w.model.config, "n_inner") else "intermediate_size"
    width = getattr(t.config, key) or 4 * t.config.hidden_size   # GPT-2: n_inner None means 4 x n_embd
    assert getattr(w.model.config, key) == width // 2 and w.config["config_loadable"]
    # the student's layers are the teacher's layers 0 and 2, weights and all
    t_layers, s_layers = layer_taps(t), layer_taps(s.model)
    for j, i in enumerate([0, 2]):
        ts, ss = t_layers[i].state_dict(), s_layers[j].state_dict()
        assert ts.keys() == ss.keys() and all(torch.equal(ts[k], ss[k]) for k in ts)
    ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        a, b = s.model(input_ids=ids), t(input_ids=ids)
    key = "logits" if hasattr(a, "logits") else "last_hidden_state"
    assert getattr(a, key).shape == getattr(b, key).shape


def test_default_layer_map():
    assert default_layer_map(3, 3) == [0, 1, 2]
    assert default_layer_map(3, 6) == [1, 3, 5]
    assert default_layer_map(2, 3) == [1, 2]


def test_classifier_loss_is_kd_plus_hidden_terms():
    t, s = _mlp(0), build_student(_mlp(0), {"width": 0.5})
    batch = _labeled()[0]
    cfg = setup(s.model, t, batch, temperature=3.0, alpha=0.4, hidden_loss="mse", hidden_weight=0.5)
    assert cfg.kind == "classifier" and cfg.layer_map == (0, 1)
    from shrink.train.distill import _Catch
    st, tt = _Catch(layer_taps(s.model)), _Catch(layer_taps(t))
    got = make_distill_loss(t, cfg, st, tt, s.kept)(s.model, batch).detach()
    st.close(), tt.close()
    x, y = batch
    h_t1, h_s1 = t[1](t[0](x)), s.model[1](s.model[0](x))
    h_t2, h_s2 = t[3](t[2](h_t1)), s.model[3](s.model[2](h_s1))
    hid = (hidden_loss(h_s1, h_t1[:, s.kept[0]], "mse") + hidden_loss(h_s2, h_t2[:, s.kept[1]], "mse")) / 2
    want = kd_loss(s.model(x), t(x), y, 3.0, 0.4) + 0.5 * hid
    assert float(got) == pytest.approx(float(want), rel=1e-5)


def test_distill_trains_a_classifier_student_and_leaves_the_teacher():
    t = _mlp(0)
    before = copy.deepcopy(t.state_dict())
    s = build_student(t, {"width": 0.25})
    batches = [Labeled(x, t(x).argmax(-1).detach()) for x, _ in _labeled(n=8)]
    rec = distill(s.model, t, batches, TrainOptions(steps=40, lr=1e-2), temperature=2.0, alpha=0.5,
                  hidden_loss="cosine", kept=s.kept)
    assert rec.loss == "distill" and len(rec.losses) == 40
    assert sum(rec.losses[-8:]) / 8 < 0.75 * sum(rec.losses[:8]) / 8
    assert all(torch.equal(before[k], v) for k, v in t.state_dict().items())
    assert not s.model.training and not t.training


def test_causal_lm_hard_term_is_lm_loss():
    t = tiny_gpt2()
    s = build_student(t, {"layers": [0, 2]})
    ids = torch.randint(0, 64, (2, 9))
    am = torch.ones_like(ids)
    am[1, 6:] = 0
    batch = {"input_ids": ids, "attention_mask": am}
    cfg = setup(s.model, t, batch, alpha=0.0)
    assert cfg.kind == "causal" and cfg.alpha == 0.0
    got = make_distill_loss(t, cfg)(s.model, batch)
    with torch.no_grad():
        want = lm_loss(s.model(**batch).logits, ids, am)
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    assert setup(s.model, t, batch).alpha == 0.5   # alpha null: hard labels exist
    rec = distill(s.model, t, [batch], TrainOptions(steps=3, lr=1e-3), hidden_loss="mse", layer_map=s.layer_map)
    assert len(rec.losses) == 3


def test_encoder_embedding_distillation_improves_fidelity():
    t = tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    s = build_student(t, {"layers": [0, 2]})
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(2, 64, (8, 10), generator=g),
                "attention_mask": torch.ones(8, 10, dtype=torch.long)} for _ in range(4)]
    cfg = setup(s.model, t, batches[0])
    assert cfg.kind == "encoder" and cfg.alpha == 1.0

    def error(m):   # the pooled embeddings' squared distance to the teacher's
        with torch.no_grad():
            a, b = m(**batches[0]).last_hidden_state.mean(1), t(**batches[0]).last_hidden_state.mean(1)
        return float(((a - b) ** 2).sum(-1).mean())

    e0 = error(s.model)
    rec = distill(s.model, t, batches, TrainOptions(steps=30, lr=3e-4), hidden_loss="mse", layer_map=s.layer_map)
    assert error(s.model) < 0.2 * e0
    assert sum(rec.losses[-5:]) < sum(rec.losses[:5])


def test_bad_input():
    t = _mlp()
    batches = _labeled()
    wrong = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match=r"student's output has shape \[32, 3\] but the teacher's has \[32, 5\]"):
        distill(wrong, t, batches, TrainOptions(steps=1))
    s = build_student(t, {"width": 0.5}).model
    with pytest.raises(ValueError, match="no labels"):
        distill(s, t, [b.inputs for b in batches], TrainOptions(steps=1), alpha=0.5)
    with pytest.raises(ValueError, match="temperature must be a positive"):
        distill(s, t, batches, TrainOptions(steps=1), temperature=0)
    with pytest.raises(ValueError, match="hard labels"):
        distill(build_student(tiny_bert(), {"layers": [0]}).model, tiny_bert(),
                [{"input_ids": torch.randint(0, 64, (2, 5))}], TrainOptions(steps=1), alpha=0.5)
    with pytest.raises(ValueError, match=r"out of range: the teacher's .* has 2 layers"):
        build_student(t, {"layers": [0, 5]})
    with pytest.raises(ValueError, match="keep every layer"):
        build_student(t, {"layers": [0, 1]})
    with pytest.raises(ValueError, match=r"teacher layer 0: hidden_loss: the student's hidden states have shape"):
        distill(build_student(t, {"layers": [1]}).model, t, batches, TrainOptions(steps=1), hidden_loss="mse",
                layer_map=[0])
    with pytest.raises(ValueError, match="layer_map"):
        distill(s, t, batches, TrainOptions(steps=1), hidden_loss="mse", layer_map=[0, 7])
    with pytest.raises(ValueError, match="student is the teacher"):
        distill(t, t, batches, TrainOptions(steps=1))


def test_teacher_cache_changes_nothing(monkeypatch):
    """Epochs after the first reuse the frozen teacher's outputs: the same weights as recomputing them."""
    import shrink.train.distill as d

    t = _mlp(0)
    batches = _labeled(n=3)
    runs = []
    for limit in (0, d.TEACHER_CACHE_BYTES):
        monkeypatch.setattr(d, "TEACHER_CACHE_BYTES", limit)
        s = build_student(t, {"width": 0.5})
        calls = []
        h = t[0].register_forward_hook(lambda *a: calls.append(1))
        distill(s.model, t, batches, TrainOptions(steps=9, lr=1e-2), hidden_loss="mse", kept=s.kept)
        h.remove()
        runs.append((s.model.state_dict(), len(calls)))
    assert all(torch.equal(v, runs[1][0][k]) for k, v in runs[0][0].items())
    assert runs[1][1] < runs[0][1]   # fewer teacher forwards with the cache
