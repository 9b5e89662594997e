"""Stored bytes of a whole model in a number format, by the API's rule: codes
bit-packed densely plus fp16 scales (and zero-points) per tensor, channel or
group. Weight matrices (linears, embeddings, an untied head) take the format;
norms, biases and position tables stay 16-bit (32-bit for fp32)."""
from __future__ import annotations

from dataclasses import dataclass

from shrink.calc import quantized_matrix_bytes
from shrink.quant import QuantSpec

from .arch import Arch

# What a format computes in (weight-only formats dequantize to fp16 before the matmul).
_COMPUTE = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16", "fp8-e4m3": "fp8", "fp8-e5m2": "fp8",
            "int8": "int8"}
KV_BYTES = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "fp8": 1.0, "fp8-e4m3": 1.0, "fp8-e5m2": 1.0,
            "int8": 1.0, "int4": 0.5}
DEFAULT_FORMATS = ("fp32", "fp16", "bf16", "fp8-e4m3", "int8", "int4-g128", "nf4-g64",
                   "int3-g128", "int2-g64")


@dataclass(frozen=True)
class FormatInfo:
    name: str
    spec: QuantSpec
    bits: int
    has_scale: bool
    granularity: str
    group_size: int | None
    symmetric: bool
    compute: str          # the device peak that runs its matmuls

    @property
    def side_bits(self) -> int:
        """Bits of tensors that stay unquantized (norms, biases, position tables)."""
        return 32 if self.name == "fp32" else 16


def format_info(name: str) -> FormatInfo:
    spec = QuantSpec.from_name(name)
    base = name.lower().split("-g")[0]
    return FormatInfo(name=name.lower(), spec=spec, bits=spec.bits, has_scale=spec.has_scale,
                      granularity=spec.granularity, group_size=spec.group_size,
                      symmetric=not spec.has_zero_point, compute=_COMPUTE.get(base, "fp16"))


def matrix_bytes(rows: int, cols: int, f: FormatInfo) -> int:
    if not f.has_scale:
        return (rows * cols * f.bits + 7) // 8
    return quantized_matrix_bytes(rows, cols, f.bits, f.granularity, f.group_size, f.symmetric)


def arch_weight_bytes(arch: Arch, f: FormatInfo) -> tuple[int, dict[str, int]]:
    """Exact stored bytes of the model, and the parts: linears, embeddings, the rest."""
    linears = sum(matrix_bytes(s.out_features, s.in_features, f) * s.count for s in arch.linear_shapes())
    emb = matrix_bytes(arch.vocab_size, arch.hidden_size, f)  # tied heads share it
    other = (arch.other_params() * f.side_bits + 7) // 8
    return linears + emb + other, {"linears": linears, "embeddings": emb, "other": other}


def count_weight_bytes(params: int, f: FormatInfo) -> int:
    """Without an architecture: codes for every parameter, plus group metadata where the
    group size fixes it (per-channel metadata needs the shapes and is left out)."""
    codes = (params * f.bits + 7) // 8
    if f.has_scale and f.granularity == "group":
        groups = -(-params // f.group_size)
        return codes + groups * (1 if f.symmetric else 2) * 2
    return codes
