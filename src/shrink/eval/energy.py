"""An energy estimate for one forward pass, from bytes moved and multiply-accumulates.

    E = weight bytes read from DRAM x e_dram + sum over precisions of MACs x e_mac(precision)

One forward pass of the given input is run with hooks on every linear-like
layer (nn.Linear, transformers' Conv1D, nn.Conv2d and shrink's QuantLinear,
W8A8Linear, QuantConv2d, SparseLinear, SparseConv2d) to count its multiply-accumulates
(for a sparse layer, those its kernel runs: a CSR product skips the zeros, a dense
rebuild does not), and each layer's
stored weight bytes are read once from DRAM. The constants are per-operation
energies for a 45 nm process (M. Horowitz, "Computing's energy problem",
ISSCC 2014), the figures the compression literature uses: 640 pJ for a 32-bit
DRAM read, so 160 pJ a byte; a multiply plus an add of 4.6 pJ in fp32
(3.7 + 0.9), 1.5 pJ in fp16/bf16 (1.1 + 0.4) and 0.3 pJ for an int8 multiply
with a 32-bit integer add (0.2 + 0.1).

What it leaves out, on purpose: attention's score products and elementwise
work (not layers), activation traffic, caches and idle power. It is a
first-order comparison of two versions of one model - fewer bytes, cheaper
arithmetic - not a measurement of any device: its ratio is what the report's
E column shows.

Threads: the hooks count the calls of the thread that asked for the estimate only, so
estimates and ordinary forwards may run on one shared model at once.
"""
from __future__ import annotations

import threading
from typing import Any

import torch
from torch import nn

from shrink.modules import QuantLinear
from shrink.modules.quant_conv2d import QuantConv2d
from shrink.modules.sparse_conv2d import SparseConv2d
from shrink.modules.sparse_linear import SparseLinear
from shrink.modules.w8a8_linear import W8A8Linear
from shrink.surgery.capture import call_model

PJ_PER_DRAM_BYTE = 640.0 / 4
PJ_PER_MAC = {"fp32": 3.7 + 0.9, "fp16": 1.1 + 0.4, "int8": 0.2 + 0.1}
SOURCE = "M. Horowitz, Computing's energy problem (and what we can do about it), ISSCC 2014 (45 nm)"


def energy_estimate(model: nn.Module, batch: Any) -> dict:
    """{"joules", "memory_joules", "compute_joules", "weight_bytes", "macs": {precision: n},
    "layers", "constants", "derivation"} for one forward pass of `batch`."""
    counts: dict[str, int] = {}
    weight_bytes = [0]
    layers = [0]
    handles = []
    me = threading.get_ident()

    def hook(mod, args, out):
        if threading.get_ident() != me:   # another thread's call of a shared model: not this estimate's
            return
        macs, precision = _macs(mod, args[0], out)
        counts[precision] = counts.get(precision, 0) + macs
        weight_bytes[0] += _stored_bytes(mod)
        layers[0] += 1

    for mod in model.modules():
        if _counted(mod):
            handles.append(mod.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            call_model(model, batch)
    finally:
        for h in handles:
            h.remove()
    memory_pj = weight_bytes[0] * PJ_PER_DRAM_BYTE
    compute = {p: n * PJ_PER_MAC[p] for p, n in counts.items()}
    total_pj = memory_pj + sum(compute.values())
    terms = " + ".join(f"{n:,} MAC x {PJ_PER_MAC[p]:g} pJ ({p})" for p, n in sorted(counts.items()))
    return {
        "joules": total_pj * 1e-12, "memory_joules": memory_pj * 1e-12,
        "compute_joules": sum(compute.values()) * 1e-12, "weight_bytes": weight_bytes[0],
        "macs": dict(sorted(counts.items())), "layers": layers[0],
        "constants": {"pj_per_dram_byte": PJ_PER_DRAM_BYTE, "pj_per_mac": PJ_PER_MAC, "source": SOURCE},
        "derivation": (f"{weight_bytes[0]:,} weight bytes x {PJ_PER_DRAM_BYTE:g} pJ + {terms or '0 MAC'} "
                       f"= {total_pj * 1e-6:.4g} uJ over {layers[0]} linear-like layers, one forward pass"),
    }


def _counted(mod: nn.Module) -> bool:
    if isinstance(mod, (nn.Linear, nn.Conv2d, QuantLinear, QuantConv2d, W8A8Linear, SparseLinear, SparseConv2d)):
        return True
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf")  # transformers' GPT-2 Conv1D


def _macs(mod: nn.Module, x: torch.Tensor, out: torch.Tensor) -> tuple[int, str]:
    if isinstance(mod, SparseLinear):   # MACs the kernel runs: a CSR product skips the zeros, a rebuild does not
        rows = out.numel() // mod.out_features
        macs = rows * mod.nnz if mod.kernel.startswith("csr") else out.numel() * mod.in_features
        return macs, _float_precision(x.dtype)
    if isinstance(mod, (nn.Conv2d, QuantConv2d, SparseConv2d)):
        kh, kw = mod.kernel_size
        macs = out.numel() * (mod.in_channels // mod.groups) * kh * kw
        precision = _float_precision(mod.weight.dtype if isinstance(mod, nn.Conv2d) else x.dtype)
        return macs, precision
    if isinstance(mod, W8A8Linear):
        return out.numel() * mod.in_features, "int8"
    if isinstance(mod, QuantLinear):
        packed = mod.kernel_dtype is not None and x.device.type == mod.codes.device.type
        return out.numel() * mod.in_features, _float_precision(mod.kernel_dtype if packed else x.dtype)
    in_features = mod.weight.shape[0] if type(mod).__name__ == "Conv1D" else mod.in_features
    return out.numel() * in_features, _float_precision(mod.weight.dtype)


def _float_precision(dtype: torch.dtype) -> str:
    return "fp16" if dtype in (torch.float16, torch.bfloat16) else "fp32"


def _stored_bytes(mod: nn.Module) -> int:
    if isinstance(mod, (SparseLinear, SparseConv2d)):
        return mod.nbytes   # values, pattern and bias
    if isinstance(mod, (QuantLinear, QuantConv2d, W8A8Linear)):
        n = mod.nbytes
    else:
        n = mod.weight.numel() * mod.weight.element_size()
    bias = getattr(mod, "bias", None)
    if isinstance(bias, torch.Tensor):
        n += bias.numel() * bias.element_size()
    return n
