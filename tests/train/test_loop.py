"""The fine-tuning loop: it lowers the loss it reports, keeps pruned weights at zero, and
distills from a teacher without labels."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from shrink.train.loop import distill_loss, finetune, lm_loss


def _digits_like(seed=0, n=256):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    return [x[i:i + 32] for i in range(0, n, 32)]


def _mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def test_distill_moves_student_towards_teacher():
    batches = _digits_like()
    teacher, student = _mlp(0).eval(), _mlp(1)

    def gap():
        with torch.no_grad():
            return sum(float(distill_loss(student(b), teacher(b))) for b in batches)

    before = gap()
    rec = finetune(student, batches, steps=150, lr=1e-2, loss="distill", teacher=teacher)
    assert rec.loss == "distill" and len(rec.losses) == 150
    assert gap() < 0.3 * before
    d = rec.to_dict()
    assert d["loss_last"] < d["loss_first"]


def test_masks_hold_pruned_weights_at_zero():
    batches = _digits_like()
    teacher, student = _mlp(0).eval(), _mlp(1)
    w = student[0].weight
    mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(3)) > 0.5
    with torch.no_grad():
        w.mul_(mask)
    finetune(student, batches, steps=20, lr=1e-2, loss="distill", teacher=teacher, masks={w: mask})
    assert torch.all(w[~mask] == 0)
    assert torch.count_nonzero(w[mask]) == int(mask.sum())   # the survivors trained, none died


def test_lm_loss_matches_cross_entropy_in_float64():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    ids = torch.randint(0, 7, (2, 5), generator=g)
    ref = -torch.log_softmax(logits.double(), -1)[:, :-1].gather(-1, ids[:, 1:, None]).mean()
    assert float(lm_loss(logits, ids)) == pytest.approx(float(ref), rel=1e-6)


def test_lm_finetune_on_a_tiny_llama_lowers_the_loss():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    seq = torch.arange(16) % 8                  # a pattern the model can learn
    batches = [{"input_ids": seq.repeat(4, 1)}]
    rec = finetune(model, batches, steps=60, lr=5e-3)
    assert rec.loss == "lm"
    assert rec.losses[-1] < 0.5 * rec.losses[0]
    assert not model.training


@pytest.mark.parametrize("kw, msg", [({"steps": 0}, "steps"), ({"steps": 3, "lr": -1.0}, "lr"),
                                     ({"steps": 3, "loss": "mse"}, "loss must be"),
                                     ({"steps": 3, "loss": "distill"}, "teacher")])
def test_bad_options_are_refused(kw, msg):
    with pytest.raises(ValueError, match=msg):
        finetune(_mlp(0), _digits_like(), **kw)
