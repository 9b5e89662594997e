"""The report's plot data recorded by compress: histograms, grids, the staircase,
mixed-precision sensitivities, the plan and the roofline, checked against the model."""
from __future__ import annotations

import torch
from torch import nn

from shrink.modules.input_scaled import InputScaled
from shrink.modules.quant_linear import QuantLinear
from shrink.quant import QuantSpec, dequantize, quantize
from shrink.recipe import compress
from shrink.recipe.figures import _layer_view, plan_section


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(256, 96), nn.ReLU(), nn.Linear(96, 32), nn.ReLU(), nn.Linear(32, 10))
    with torch.no_grad():
        m[0].weight[3, 17] = 0.9  # one outlier: its group has the widest grid
    return m


def test_rtn_figures_match_the_installed_codes():
    model = _mlp()
    res = compress(model, "w4-rtn", measure_speed=False)
    fig = res.to_json()["figures"]
    names = [w["layer"] for w in fig["weights"]]
    assert names[0] == "0" and names[-1] == "4" and len(names) == len(set(names)) <= 4
    for w in fig["weights"]:
        lin = model.get_submodule(w["layer"])
        assert sum(w["hist"]["counts"]) == lin.weight.numel() == sum(w["hist_after"]["counts"])
        assert len(w["hist"]["edges"]) == len(w["hist"]["counts"]) + 1
        assert len(w["grid"]) == 16  # int4: 16 levels in the widest group
    first = fig["weights"][0]
    # the outlier's group: every rounded value of that group is on its grid, and 0.9 is inside it
    qt = res.model.get_submodule("0").to_qtensor()
    w_hat = dequantize(qt)[3, 0:128]
    grid = torch.tensor(first["grid"])
    assert all(torch.isclose(grid, v, atol=1e-6).any() for v in w_hat)
    assert min(first["grid"]) < 0 and abs(max(first["grid"]) - 0.9) < 0.01  # the max is on the grid (fp16 scale)
    st = fig["staircase"]
    assert st["layer"] == "0" and st["row"] == 3 and st["columns"] == [0, 128]
    ws, wh = torch.tensor(st["w"]), torch.tensor(st["w_hat"])
    assert torch.all(ws[1:] >= ws[:-1]) and torch.all(wh[1:] >= wh[:-1])  # RTN is monotone: a staircase
    assert torch.equal(torch.sort(wh).values, torch.sort(w_hat).values.float())
    assert fig["sensitivity"] is None


def test_input_scaled_layer_is_shown_in_original_units():
    torch.manual_seed(1)
    w = torch.randn(16, 64)
    c = torch.rand(64) + 0.5
    spec = QuantSpec(bits=8, symmetric=True, granularity="channel")
    layer = InputScaled(QuantLinear.from_qtensor(quantize(w / c, spec)), c)
    orig = nn.Linear(64, 16, bias=False)
    with torch.no_grad():
        orig.weight.copy_(w)
    w0, w_hat, w_q, w_hat_q, grid_of, group = _layer_view(orig, layer)
    assert torch.equal(w0, w) and torch.allclose(w_q, w / c)
    assert torch.allclose(w_hat, w, atol=float((w / c).abs().max() / 127 * c.max()))  # int8: within one step
    assert group == 64 and len(grid_of(0, 0)) == 255


def test_mixed_precision_records_its_sensitivities():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    batches = [{"input_ids": torch.randint(0, 128, (4, 32))} for _ in range(2)]
    res = compress(model, [{"mixed_precision": {"bits_per_weight": 4.5, "group_size": 32}}],
                   calibration=batches, measure_speed=False)
    sens = res.to_json()["figures"]["sensitivity"]
    layers = res.steps[0].layers
    assert {s["layer"] for s in sens} == {l.name for l in layers}
    for s in sens:
        e = [s["errors"][str(b)] for b in (2, 3, 4, 8)]
        assert e[0] > e[1] > e[2] > e[3] >= 0
        rec = next(l for l in layers if l.name == s["layer"])
        assert rec.format.startswith(f"int{s['bits']}")


def test_plan_and_roofline_for_a_device():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    n = sum(p.numel() for p in model.parameters())
    measured = {"baseline": {"size_bytes": 4 * n, "params": n}, "compressed": {"size_bytes": n // 2, "params": n}}
    plan, roof = plan_section(model, n, "rtx-4090", measured)
    assert plan["device"]["name"] == "rtx-4090" and plan["model"]["params"] == n
    assert all(f["kv_cache_bytes"] > 0 for f in plan["formats"])  # the architecture was read: a KV cache
    bw = roof["bandwidth_bytes_per_s"]
    base = next(p for p in roof["points"] if p["label"] == "baseline")
    assert abs(base["intensity"] - 0.5) < 1e-12  # 2 FLOP per param / 4 bytes per param
    assert base["flops_per_s"] == bw * 0.5       # far below the ridge: memory-bound
    comp = next(p for p in roof["points"] if p["label"] == "compressed")
    assert comp["intensity"] > base["intensity"]
    plan2, roof2 = plan_section(nn.Linear(4, 4), 20, None, measured)
    assert plan2["device"] is None and roof2 is None and plan2["model"]["params"] == 20
