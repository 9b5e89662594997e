"""Pruning steps run end to end through shrink.compress on real data (the digits
classifier with its held-out accuracy) and a small Llama: exact sparsity, valid N:M
patterns, SparseGPT/Wanda below magnitude layer by layer, structured removal equal to
masking before any fine-tune, fine-tuning that recovers without reviving pruned weights,
iterative pruning and the lottery ticket with its control."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from shrink.algos.nm import check_nm
from shrink.modules import SparseLinear
from shrink.recipe import compress


@pytest.fixture(scope="module")
def digits():
    from shrink.eval.quality import accuracy_metric
    from shrink.models.digits import digits_data
    from shrink.models.io import load

    model = load("digits-mlp")
    split = digits_data()
    batches = [split.x_train[i:i + 64] for i in range(0, 512, 64)]
    return model, batches, accuracy_metric(split.x_test, split.y_test), split


@pytest.fixture(scope="module")
def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 64, (4, 32), generator=g)} for _ in range(4)]
    return model, batches


def _sparse_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}


def test_magnitude_layer_scope_prunes_exact_counts_and_stores_sparse(digits):
    model, batches, metric, _ = digits
    res = compress(model, [{"prune": {"method": "magnitude", "sparsity": 0.6}}], evaluate=metric,
                   measure_speed=False)
    sparse = _sparse_layers(res.model)
    assert set(sparse) == {"0", "2", "4"}
    orig = dict(model.named_modules())
    for name, mod in sparse.items():
        w = orig[name].weight.detach()
        dense = mod.dense_weight()
        assert int((dense == 0).sum()) == round(0.6 * w.numel())
        kept = dense != 0
        assert torch.equal(dense[kept], w[kept])                              # survivors untouched
        assert w[~kept].abs().max() <= w[kept].abs().min()                    # the smallest went
    m = res.metrics
    assert m["compressed"]["size_bytes"] < 0.6 * m["baseline"]["size_bytes"]
    # the stored model computes exactly what the masked dense model computes
    x = batches[0]
    h = x
    for i, layer in enumerate(model):
        h = nn.functional.linear(h, sparse[str(i)].dense_weight(), layer.bias) if str(i) in sparse else layer(h)
    torch.testing.assert_close(res.model(x), h, rtol=1e-5, atol=1e-5)


def test_global_scope_counts_over_all_layers(digits):
    model, _, _, _ = digits
    res = compress(model, [{"prune": {"method": "magnitude", "sparsity": 0.7, "scope": "global"}}],
                   measure_speed=False)
    sparse = _sparse_layers(res.model)
    total = sum(m.out_features * m.in_features for m in sparse.values())
    zeros = sum(int((m.dense_weight() == 0).sum()) for m in sparse.values())
    assert zeros == round(0.7 * total)
    levels = sorted(m.sparsity for m in sparse.values())
    assert levels[0] < levels[-1]                          # one threshold, unequal layers


def test_wanda_and_sparsegpt_beat_magnitude_per_layer_and_2of4_is_valid(llama):
    model, batches = llama
    for recipe in ([{"prune": {"method": "sparsegpt", "sparsity": 0.5}}],
                   [{"prune": {"method": "wanda", "pattern": "2:4"}}],
                   [{"prune": {"method": "sparsegpt", "pattern": "2:4"}}]):
        res = compress(model, recipe, calibration=batches, measure_speed=False)
        layers = res.steps[0].layers
        assert len(layers) == 14
        # error_rtn holds magnitude pruning's layer-output error at the same sparsity
        assert sum(l.error for l in layers) < sum(l.error_rtn for l in layers)
        for name, mod in _sparse_layers(res.model).items():
            mask = mod.dense_weight() != 0
            if "pattern" in recipe[0]["prune"]:
                assert check_nm(mask, 2, 4) and mod.layout == "nm"
            assert abs(mod.sparsity - 0.5) < 0.02


def test_sparsegpt_joint_quantization_keeps_zeros(llama):
    model, batches = llama
    res = compress(model, [{"prune": {"method": "sparsegpt", "sparsity": 0.5, "bits": 4, "group_size": 32}}],
                   calibration=batches, measure_speed=False)
    from shrink.modules import QuantLinear

    qls = [m for m in res.model.modules() if isinstance(m, QuantLinear)]
    assert len(qls) == 14
    for q in qls:
        w = q.dequantized_weight() if hasattr(q, "dequantized_weight") else q.to_qtensor().dequantize()
        assert 0.5 <= float((w == 0).float().mean()) < 0.6   # kept weights may round to 0 too


def test_prune_then_gptq_keeps_the_pattern(llama):
    model, batches = llama
    res = compress(model, [{"prune": {"method": "wanda", "sparsity": 0.5}}, {"gptq": {"bits": 4, "group_size": 32}}],
                   calibration=batches, measure_speed=False)
    layers = res.steps[1].layers
    assert len(layers) == 14 and all("held at zero" in l.note for l in layers)
    from shrink.modules import QuantLinear

    for q in (m for m in res.model.modules() if isinstance(m, QuantLinear)):
        w = q.to_qtensor().dequantize()
        assert float((w == 0).float().mean()) >= 0.5


def test_structured_neurons_equal_masking_then_finetune_recovers(digits):
    model, batches, metric, split = digits
    res = compress(model, [{"prune": {"method": "neurons", "sparsity": 0.75}}], evaluate=metric,
                   measure_speed=False)
    widths = [m.out_features for m in res.model if isinstance(m, nn.Linear)]
    assert widths == [32, 16, 10]
    # equal to the original with the removed neurons' consumer columns zeroed
    kept0 = _kept_rows(model[0].weight, res.model[0].weight)
    kept2 = _kept_rows(model[2].weight[:, kept0], res.model[2].weight)
    masked = [m for m in _copy(model)]
    with torch.no_grad():
        drop0 = torch.ones(128, dtype=torch.bool)
        drop0[kept0] = False
        masked[2].weight[:, drop0] = 0
        drop2 = torch.ones(64, dtype=torch.bool)
        drop2[kept2] = False
        masked[4].weight[:, drop2] = 0
    x = split.x_test[:64]
    torch.testing.assert_close(res.model(x), nn.Sequential(*masked)(x), rtol=1e-5, atol=1e-5)
    pruned_acc = res.metrics["compressed"]["quality"]["value"]
    tuned = compress(model, [{"prune": {"method": "neurons", "sparsity": 0.75}},
                             {"finetune": {"steps": 150, "lr": 3e-3}}], calibration=batches, evaluate=metric,
                     measure_speed=False)
    assert tuned.metrics["compressed"]["quality"]["value"] > pruned_acc
    assert tuned.metrics["compressed"]["params"] < 0.3 * tuned.metrics["baseline"]["params"]


def _copy(model):
    import copy

    return copy.deepcopy(model)


def _kept_rows(full: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    idx = [next(i for i in range(full.shape[0]) if torch.equal(full[i], row)) for row in pruned]
    assert idx == sorted(idx)
    return torch.tensor(idx)


def test_finetune_after_pruning_never_revives_a_weight(digits):
    model, batches, metric, _ = digits
    res = compress(model, [{"prune": {"method": "magnitude", "sparsity": 0.9}},
                           {"finetune": {"steps": 100, "lr": 3e-3}}], calibration=batches, evaluate=metric,
                   measure_speed=False)
    for mod in _sparse_layers(res.model).values():
        assert int((mod.dense_weight() == 0).sum()) == round(0.9 * mod.out_features * mod.in_features)
    one_shot = compress(model, [{"prune": {"method": "magnitude", "sparsity": 0.9}}], evaluate=metric,
                        measure_speed=False)
    assert res.metrics["compressed"]["quality"]["value"] > one_shot.metrics["compressed"]["quality"]["value"]


def test_iterative_pruning_reaches_the_target_through_its_schedule(digits):
    model, batches, metric, _ = digits
    res = compress(model, [{"iterative_prune": {"target": 0.8, "rounds": 3, "finetune": {"steps": 30, "lr": 2e-3}}}],
                   calibration=batches, evaluate=metric, measure_speed=False)
    rounds = res.steps[0].details["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    levels = [r["sparsity"] for r in rounds]
    assert levels == sorted(levels) and levels[-1] == pytest.approx(0.8, abs=1e-4)
    assert all("quality" in r for r in rounds)
    total = sum(m.out_features * m.in_features for m in _sparse_layers(res.model).values())
    zeros = sum(int((m.dense_weight() == 0).sum()) for m in _sparse_layers(res.model).values())
    assert zeros == round(0.8 * total)


def test_lottery_ticket_records_rounds_cost_and_control(digits):
    model, batches, metric, _ = digits
    res = compress(model, [{"lottery_ticket": {"target": 0.75, "per_round": 0.5, "steps": 40, "lr": 3e-3}}],
                   calibration=batches, evaluate=metric, measure_speed=False)
    d = res.steps[0].details
    assert [r["round"] for r in d["rounds"]] == [0, 1, 2]
    assert d["rounds"][-1]["sparsity"] == pytest.approx(0.75, abs=1e-4)
    assert d["training_steps"] == 40 * 3
    assert "quality" in d["control"] and d["control"]["training"]["steps"] == 40


def test_heads_on_llama_update_the_config(llama):
    model, batches = llama
    res = compress(model, [{"prune": {"method": "heads", "sparsity": 0.5}}], calibration=batches,
                   measure_speed=False)
    d = res.steps[0].details
    assert d["config"]["config_loadable"] is True
    assert res.model.config.num_key_value_heads == 1 and res.model.config.num_attention_heads == 2
    assert d["params_after"] < d["params_before"]
    out = res.model(**batches[0]).logits
    assert out.shape == (4, 32, 64) and torch.isfinite(out).all()


def test_layers_need_calibration_and_a_pattern_that_cannot_fit_is_named(digits):
    model, _, _, _ = digits
    with pytest.raises(ValueError, match="calibration"):
        compress(model, [{"prune": {"method": "layers", "sparsity": 0.5}}])
    odd = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match="0: pattern 2:4 needs in_features divisible by 4, got 10"):
        compress(odd, [{"prune": {"pattern": "2:4", "include": ["0"]}}], measure_speed=False)
    res = compress(odd, [{"prune": {"pattern": "2:4"}}], measure_speed=False)   # not named: skipped, said why
    assert [s["name"] for s in res.steps[0].skipped] == ["0"] and "divisible" in res.steps[0].skipped[0]["reason"]
    with pytest.raises(ValueError, match="removing every unit"):
        compress(odd, [{"prune": {"method": "neurons", "sparsity": 0.99}}], measure_speed=False)


def test_structurally_pruned_models_reload_bit_exactly(digits, llama, tmp_path):
    from shrink.models.compressed import load_compressed, save_compressed
    from shrink.models.io import load

    model, batches, _, split = digits
    res = compress(model, [{"prune": {"method": "neurons", "sparsity": 0.5, "include": ["0"]}},
                           {"prune": {"method": "wanda", "sparsity": 0.5}}], calibration=batches,
                   measure_speed=False)
    save_compressed(res.model, tmp_path / "mlp", base={"kind": "builtin", "name": "digits-mlp"})
    back = load_compressed(tmp_path / "mlp", build_builtin=load)
    x = split.x_test[:32]
    assert torch.equal(back(x), res.model(x))

    lm, lm_batches = llama   # non-uniform: one layer's MLP and all layers' KV groups, then 4-bit
    res = compress(lm, [{"prune": {"method": "heads", "sparsity": 0.5}},
                        {"prune": {"method": "neurons", "sparsity": 0.25, "include": ["model.layers.1.*"]}},
                        {"rtn": {"bits": 4, "group_size": 32}}], calibration=lm_batches, measure_speed=False)
    save_compressed(res.model, tmp_path / "lm", base={"kind": "hf"})
    back = load_compressed(tmp_path / "lm")
    assert back.model.layers[1].mlp.up_proj.out_features == 96
    assert back.model.layers[0].mlp.up_proj.out_features == 128
    assert torch.equal(back(**lm_batches[0]).logits, res.model(**lm_batches[0]).logits)
