"""Sparse + quantized convolutions on digits-cnn: stored bytes and accuracy, sparse codes against dense codes.

Run: .venv/bin/python bench/bench_sparse_conv_quant.py
Prints one Markdown table. For each recipe: the bytes the two conv layers store (weights only,
from the step's layer records; 144 + 4608 = 4752 weights), those bytes a weight, the model's
size_bytes, the saved model.safetensors, and the held-out accuracy (450 images). A pruned-then-
quantized row is followed by "same codes dense": the identical codes stored in QuantConv2d /
QuantLinear (zero codes where pruned), whose outputs must equal the sparse model's bit for bit
("outputs equal" column). Deterministic: no timings.
"""
from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path

import torch

import shrink
from shrink.models.compressed import save_compressed
from shrink.models.digits import accuracy, digits_data
from shrink.modules import SparseQuantConv2d, SparseQuantLinear
from shrink.recipe import compress
from shrink.recipe.records import model_nbytes
from shrink.surgery import replace_module

CONVS = ("1", "4")
PRUNE = {"prune": {"method": "magnitude", "sparsity": 0.5}}
RECIPES = {
    "float": [],
    "prune50 (fp32 values + bitmask)": [PRUNE],
    "int8-channel": [{"rtn": {"bits": 8, "group_size": None}}],
    "prune50 + int8-channel": [PRUNE, {"rtn": {"bits": 8, "group_size": None}}],
    "int4-channel": [{"rtn": {"bits": 4, "group_size": None}}],
    "prune50 + int4-channel": [PRUNE, {"rtn": {"bits": 4, "group_size": None}}],
    "2:4 + int4-channel": [{"prune": {"method": "magnitude", "pattern": "2:4"}}, {"rtn": {"bits": 4, "group_size": None}}],
    "prune50 + gptq int4-channel": [PRUNE, {"gptq": {"bits": 4, "group_size": None}}],
}


def dense_codes(model: torch.nn.Module) -> torch.nn.Module:
    """The same codes stored dense (zero codes where pruned)."""
    out = copy.deepcopy(model)   # every other layer as it is
    for name, mod in model.named_modules():
        if isinstance(mod, (SparseQuantConv2d, SparseQuantLinear)):
            replace_module(out, name, mod.dense_codes())
    return out.eval()


def conv_bytes(model: torch.nn.Module) -> tuple[int, str]:
    """Weight bytes of the two convs as stored (no bias), and their types."""
    total, kinds = 0, []
    for name in CONVS:
        mod = model.get_submodule(name)
        kinds.append(type(mod).__name__)
        if hasattr(mod, "nbytes"):
            b = mod.bias
            has_bias = type(mod).__name__ == "SparseConv2d" and b is not None   # its nbytes counts the bias
            total += mod.nbytes - (b.numel() * b.element_size() if has_bias else 0)
        else:
            total += mod.weight.numel() * mod.weight.element_size()
    return total, "/".join(sorted(set(kinds)))


def saved_bytes(model: torch.nn.Module) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = save_compressed(model, Path(tmp) / "m", base={"kind": "builtin", "name": "digits-cnn"})
        return (out / "model.safetensors").stat().st_size


def main() -> int:
    model = shrink.load("digits-cnn")
    split = digits_data()
    calib = [split.x_train[i:i + 128] for i in range(0, 512, 128)]
    weights = sum(model.get_submodule(n).weight.numel() for n in CONVS)
    print(f"digits-cnn, conv weights {weights}; torch {torch.__version__}\n")
    print("| recipe | conv layers | conv bytes | B/weight | size_bytes | model.safetensors | accuracy | outputs equal |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")

    def row(name, m, equal=""):
        cb, kinds = conv_bytes(m)
        acc = accuracy(m, split.x_test, split.y_test)
        print(f"| {name} | {kinds} | {cb:,} | {cb / weights:.3f} | {model_nbytes(m):,} | {saved_bytes(m):,} | "
              f"{acc:.4f} | {equal} |", flush=True)

    for name, recipe in RECIPES.items():
        m = compress(model, recipe, calibration=calib, measure_speed=False).model if recipe else model
        row(name, m)
        if any(isinstance(x, SparseQuantConv2d) for x in m.modules()):
            same = dense_codes(m)
            with torch.no_grad():
                equal = torch.equal(m(split.x_test), same(split.x_test))
            row("  same codes dense", same, "yes" if equal else "NO")
    return 0


if __name__ == "__main__":
    sys.exit(main())
