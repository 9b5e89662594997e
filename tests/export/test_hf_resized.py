"""A model with heads and MLP neurons removed per layer, exported as a Hugging Face directory,
loads in plain transformers with trust_remote_code=True: the generated shrink_resized.py
rebuilds the recorded shapes, the outputs and the parameter count are the pruned model's."""
from __future__ import annotations

import ast
import json

import pytest
import torch

from shrink.export import hf_resized
from shrink.export.hf import verify_hf_dir, write_hf_dir
from shrink.surgery.heads import find_attention, remove_heads, update_config
from shrink.surgery.shapes import ATTRIBUTES
from shrink.surgery.shrink_dims import find_neuron_groups, remove_units

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

from tests_support import n_params, tiny_bert, tiny_gpt2, tiny_llama  # noqa: E402

IDS = torch.randint(2, 64, (2, 9), generator=torch.Generator().manual_seed(3))


@pytest.fixture(autouse=True)
def modules_cache(tmp_path, monkeypatch):
    """transformers copies remote code to HF_MODULES_CACHE (read once, at import): a tmp dir, not home."""
    import transformers.dynamic_module_utils as dmu

    cache = tmp_path / "hf_modules"
    monkeypatch.setenv("HF_MODULES_CACHE", str(cache))
    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(cache))
    return cache


def prune_heads(model):
    """A different number of heads (KV groups under GQA) in each layer."""
    for i, group in enumerate(find_attention(model)):
        remove_heads(model, group, list(range(group.units - 1 - i % group.units, group.units)))


def prune_neurons(model):
    """A different MLP width in each layer."""
    for i, g in enumerate(find_neuron_groups(model)):
        remove_units(model, g, torch.arange(0, g.width, i + 2))


def outputs(model):
    with torch.no_grad():
        out = model(input_ids=IDS, attention_mask=torch.ones_like(IDS))
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def export_and_load(model, tmp_path, causal):
    out = write_hf_dir(model, None, tmp_path / "hf")
    report = verify_hf_dir(out, model, IDS.tolist(), causal)
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    back = auto.from_pretrained(out, trust_remote_code=True, local_files_only=True).eval()
    return out, report, back


@pytest.mark.parametrize("build,causal,neurons", [(tiny_bert, False, False), (tiny_gpt2, True, True),
                                                   (tiny_llama, True, False)])
def test_pruned_model_loads_in_transformers_with_remote_code(build, causal, neurons, tmp_path):
    model = build()
    before = n_params(model)
    prune_heads(model)
    if neurons:
        prune_neurons(model)
    verdict = update_config(model)
    assert verdict["config_loadable"] is False and "trust_remote_code=True" in verdict["reason"]
    heads = [g.num_heads for g in find_attention(model)]
    assert len(set(heads)) > 1                         # counts differ by layer: no config can say it
    out, report, back = export_and_load(model, tmp_path, causal)
    assert report["passed"] and report["remote_code"] is True and report["shrink_imported"] is False
    assert report["vs_shrink_model"]["rel_rmse"] < 1e-5
    assert f"ShrinkResized{type(model).__name__}" in report["runtime"]
    assert type(back).__name__ == f"ShrinkResized{type(model).__name__}"
    assert n_params(back) == n_params(model) < before
    torch.testing.assert_close(outputs(back), outputs(model), rtol=1e-5, atol=1e-5)
    assert [g.num_heads for g in find_attention(back)] == heads
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["shrink_resized"]["format"] == "shrink-resized" and cfg["shrink_resized"]["modules"]
    assert set(cfg["auto_map"].values()) == {f"shrink_resized.ShrinkResized{type(model).__name__}"}
    assert "AutoModel" in cfg["auto_map"] and ("AutoModelForCausalLM" in cfg["auto_map"]) == causal


def test_generate_runs_on_the_loaded_causal_lm(tmp_path):
    model = tiny_llama()
    prune_heads(model)
    prune_neurons(model)
    _, _, back = export_and_load(model, tmp_path, causal=True)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=1)
    assert torch.equal(back.generate(IDS[:1], **kw), model.generate(IDS[:1], **kw))


def test_a_model_its_config_describes_is_written_as_before(tmp_path):
    model = tiny_llama()
    for g in find_neuron_groups(model):       # the same width everywhere: update_config can say it
        remove_units(model, g, torch.arange(0, g.width, 2))
    assert update_config(model)["config_loadable"] is True
    out = write_hf_dir(model, None, tmp_path / "hf")
    assert not (out / hf_resized.MODULE_FILE).exists()
    cfg = json.loads((out / "config.json").read_text())
    assert "auto_map" not in cfg and "shrink_resized" not in cfg and cfg["architectures"] == ["LlamaForCausalLM"]
    report = verify_hf_dir(out, model, IDS.tolist(), causal=True)
    assert report["passed"] and report["remote_code"] is False


def test_an_unknown_record_type_is_refused_when_loading(tmp_path):
    model = tiny_bert()
    prune_heads(model)
    out = write_hf_dir(model, None, tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    cfg["shrink_resized"]["modules"]["encoder.layer.0.intermediate.dense"] = {"type": "Conv3d", "in_channels": 4}
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="encoder.layer.0.intermediate.dense: module type 'Conv3d' is not one"):
        transformers.AutoModel.from_pretrained(out, trust_remote_code=True, local_files_only=True)
    cfg["shrink_resized"]["modules"].pop("encoder.layer.0.intermediate.dense")
    cfg["shrink_resized"]["attributes"]["encoder.layer.0.attention.self"]["dropout"] = 0.5
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="attribute 'dropout' is not one this file sets"):
        transformers.AutoModel.from_pretrained(out, trust_remote_code=True, local_files_only=True)


def test_a_record_the_generated_code_cannot_rebuild_is_refused_at_export(tmp_path, monkeypatch):
    model = tiny_bert()
    prune_heads(model)
    real = hf_resized.resized_modules

    def with_conv(m, fresh):
        desc = real(m, fresh)
        desc["modules"]["encoder.layer.0.output.dense"] = {"type": "Conv2d"}
        return desc

    monkeypatch.setattr(hf_resized, "resized_modules", with_conv)
    with pytest.raises(ValueError, match=r"encoder.layer.0.output.dense \(Conv2d\).*safetensors:packed"):
        write_hf_dir(model, None, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_generated_code_imports_only_torch_and_transformers_and_matches_shrink():
    code = hf_resized.modeling_code("GPT2LMHeadModel")
    tree = ast.parse(code)
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert {m.split(".")[0] for m in imported} == {"__future__", "torch", "transformers"}
    assert "class ShrinkResizedGPT2LMHeadModel(GPT2LMHeadModel):" in code and hf_resized.PLACEHOLDER not in code
    space: dict = {}
    exec(compile(code, "shrink_resized.py", "exec"), space)   # noqa: S102 - our own template
    assert space["ATTRIBUTES"] == ATTRIBUTES and space["MODULE_TYPES"] == hf_resized.MODULE_TYPES
    for bad in ("os; import shrink", "Conv1D", "NoSuchModel"):
        with pytest.raises(ValueError, match="not a transformers model class"):
            hf_resized.modeling_code(bad)


def test_export_of_a_head_pruned_run_dir(tmp_path):
    """The CLI path: compress (prune heads) -> shrink's dir -> export --format safetensors."""
    import shrink
    from shrink.export.run import export
    from shrink.models.compressed import save_compressed

    res = shrink.compress(shrink.load("tiny-gpt"), [{"prune": {"method": "heads", "sparsity": 0.25}}],
                          measure_speed=False)
    assert res.steps[0].details["config"]["config_loadable"] is False
    d = tmp_path / "run" / "model"
    save_compressed(res.model, d, base={"kind": "hf"}, extra={"source_model": "tiny-gpt"})
    rec = export(str(d), "safetensors", tmp_path / "hf", n_tokens=64)
    v = rec["verification"]
    assert rec["verified"] and v["remote_code"] is True and v["vs_shrink_model"]["rel_rmse"] < 1e-5
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    assert n_params(back) == n_params(res.model)
