"""QuantSpec: defaults, self-validation naming the field, API names."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from shrink.formats import FLOAT_FORMATS, NF4, CodebookFormat, IntFormat
from shrink.quant import QuantSpec, fake_quantize, quantize


def test_defaults():
    s = QuantSpec()
    assert (s.bits, s.symmetric, s.granularity, s.group_size, s.axis, s.format) == (8, True, "channel", None, 0, "int")
    assert s.scale_dtype == torch.float16 and not s.full_range and s.codebook is None
    assert s.has_scale and not s.has_zero_point


@pytest.mark.parametrize(
    "fmt,bits", [("nf4", 4), ("fp8-e4m3", 8), ("fp8-e5m2", 8), ("fp16", 16), ("bf16", 16), ("fp32", 32)]
)
def test_bits_are_implied_by_the_format(fmt, bits):
    assert QuantSpec(format=fmt).bits == bits
    assert QuantSpec(format=fmt, bits=bits).bits == bits
    with pytest.raises(ValueError, match="QuantSpec.bits"):
        QuantSpec(format=fmt, bits=bits // 2)


@pytest.mark.parametrize("n,bits", [(2, 1), (3, 2), (4, 2), (16, 4), (17, 5), (256, 8)])
def test_codebook_bits_follow_the_table_size(n, bits):
    s = QuantSpec(format="codebook", granularity="tensor", codebook=tuple(range(n)))
    assert s.bits == bits
    assert s.codebook == tuple(float(v) for v in range(n))
    assert isinstance(s.grid(), CodebookFormat) and s.grid().values.numel() == n


# ------------------------------------------------------- validation errors


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(bits=0), "QuantSpec.bits"),
        (dict(bits=9), "QuantSpec.bits"),
        (dict(bits=-4), "QuantSpec.bits"),
        (dict(bits=16), "QuantSpec.bits"),
        (dict(bits=4.0), "QuantSpec.bits"),
        (dict(bits="8"), "QuantSpec.bits"),
        (dict(bits=True), "QuantSpec.bits"),
        (dict(bits=1, symmetric=True), "QuantSpec.bits"),
        (dict(granularity="group", group_size=0), "QuantSpec.group_size"),
        (dict(granularity="group", group_size=-128), "QuantSpec.group_size"),
        (dict(granularity="group"), "QuantSpec.group_size"),
        (dict(granularity="group", group_size=64.0), "QuantSpec.group_size"),
        (dict(granularity="group", group_size=True), "QuantSpec.group_size"),
        (dict(granularity="channel", group_size=128), "QuantSpec.group_size"),
        (dict(granularity="row"), "QuantSpec.granularity"),
        (dict(granularity="Tensor"), "QuantSpec.granularity"),
        (dict(format="int5"), "QuantSpec.format"),
        (dict(format="fp4"), "QuantSpec.format"),
        (dict(format="nf4", symmetric=False), "QuantSpec.symmetric"),
        (dict(format="fp8-e4m3", symmetric=False), "QuantSpec.symmetric"),
        (dict(symmetric=False, full_range=True), "QuantSpec.full_range"),
        (dict(format="nf4", full_range=True), "QuantSpec.full_range"),
        (dict(scale_dtype=torch.int32), "QuantSpec.scale_dtype"),
        (dict(axis="0"), "QuantSpec.axis"),
        (dict(axis=1.0), "QuantSpec.axis"),
        (dict(axis=True), "QuantSpec.axis"),
        (dict(format="codebook", granularity="tensor"), "QuantSpec.codebook"),
        (dict(format="codebook", granularity="tensor", codebook=tuple(range(257))), "QuantSpec.codebook"),
        (dict(codebook=(0.0, 1.0)), "QuantSpec.codebook"),
        (dict(format="codebook", codebook=(0.0, 1.0)), "granularity='tensor'"),
    ],
)
def test_invalid_specs_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace("(", r"\(").replace(".", r"\.")):
        QuantSpec(**kwargs)


@pytest.mark.parametrize("bits", range(1, 9))
def test_every_integer_width_1_to_8_is_accepted_asymmetric(bits):
    assert QuantSpec(bits=bits, symmetric=False).grid() == IntFormat(bits, signed=False)


def test_one_bit_symmetric_is_allowed_with_full_range():
    assert QuantSpec(bits=1, full_range=True).grid() == IntFormat(1, full_range=True)


@pytest.mark.parametrize("axis", [2, -3, 5])
def test_axis_out_of_range_is_refused_at_quantize_time(axis):
    spec = QuantSpec(axis=axis)  # the spec alone cannot know the rank
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match=rf"QuantSpec\.axis={axis}.*\(4, 6\)"):
        quantize(x, spec)
    with pytest.raises(ValueError, match=rf"QuantSpec\.axis={axis}"):
        fake_quantize(x, spec)
    with pytest.raises(ValueError, match="QuantSpec.axis"):
        quantize(x, spec.with_(granularity="group", group_size=2))


def test_per_tensor_ignores_the_axis():
    x = torch.randn(4, 6)
    assert quantize(x, QuantSpec(granularity="tensor", axis=7)).scale.shape == ()


# ---------------------------------------------------------- immutability


def test_spec_is_frozen_and_with_revalidates():
    s = QuantSpec(bits=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.bits = 8  # type: ignore[misc]
    t = s.with_(granularity="group", group_size=32)
    assert (t.granularity, t.group_size, t.bits) == ("group", 32, 4)
    assert (s.granularity, s.group_size) == ("channel", None)
    with pytest.raises(ValueError, match="QuantSpec.bits"):
        s.with_(bits=9)


def test_equal_specs_are_equal_and_hashable():
    assert QuantSpec.from_name("int8") == QuantSpec(bits=8)
    assert hash(QuantSpec.from_name("int4-g128")) == hash(
        QuantSpec(bits=4, symmetric=False, granularity="group", group_size=128)
    )
    assert QuantSpec(bits=4) != QuantSpec(bits=4, symmetric=False)


# ------------------------------------------------------------ grid, flags


def test_grid_and_flags():
    assert QuantSpec(bits=4).grid() == IntFormat(4, signed=True)
    assert QuantSpec(bits=4, symmetric=False).grid() == IntFormat(4, signed=False)
    assert QuantSpec(bits=8, full_range=True).grid() == IntFormat(8, full_range=True)
    assert QuantSpec(format="nf4").grid() is NF4
    for name, fmt in FLOAT_FORMATS.items():
        assert QuantSpec(format=name, granularity="tensor").grid() is fmt
    assert QuantSpec(bits=4, symmetric=False).has_zero_point
    assert not QuantSpec(format="nf4").has_zero_point
    assert QuantSpec(format="fp8-e4m3").has_scale and QuantSpec(format="nf4").has_scale
    assert not QuantSpec(format="fp16", granularity="tensor").has_scale
    assert not QuantSpec(format="codebook", granularity="tensor", codebook=(0.0, 1.0)).has_scale


# -------------------------------------------------------------- from_name

API_NAMES = {
    # name: (format, bits, symmetric, granularity, group_size)
    "fp32": ("fp32", 32, True, "tensor", None),
    "fp16": ("fp16", 16, True, "tensor", None),
    "bf16": ("bf16", 16, True, "tensor", None),
    "fp8-e4m3": ("fp8-e4m3", 8, True, "channel", None),
    "fp8-e5m2": ("fp8-e5m2", 8, True, "channel", None),
    "int8": ("int", 8, True, "channel", None),
    "int4": ("int", 4, True, "channel", None),
    "int3": ("int", 3, True, "channel", None),
    "int2": ("int", 2, True, "channel", None),
    "nf4": ("nf4", 4, True, "channel", None),
    "int4-g128": ("int", 4, False, "group", 128),
}


@pytest.mark.parametrize("name", list(API_NAMES))
def test_from_name_for_every_api_name(name):
    s = QuantSpec.from_name(name)
    assert (s.format, s.bits, s.symmetric, s.granularity, s.group_size) == API_NAMES[name]
    assert s.axis == 0 and s.scale_dtype == torch.float16
    # every API name quantizes a weight matrix
    w = torch.randn(8, 256)
    qt = quantize(w, s)
    assert qt.int_codes().shape == w.shape


def test_from_name_group_suffixes_case_whitespace_and_overrides():
    s = QuantSpec.from_name("nf4-g64")
    assert (s.format, s.granularity, s.group_size, s.symmetric) == ("nf4", "group", 64, True)
    assert QuantSpec.from_name("int8-g32") == QuantSpec(bits=8, symmetric=False, granularity="group", group_size=32)
    assert QuantSpec.from_name("fp8-e4m3-g128").granularity == "group"
    assert QuantSpec.from_name("  INT4-G128 ") == QuantSpec.from_name("int4-g128")
    assert QuantSpec.from_name("int4", axis=1).axis == 1
    assert QuantSpec.from_name("int4-g128", scale_dtype=torch.float32).scale_dtype == torch.float32


@pytest.mark.parametrize(
    "name",
    ["", "int", "int0", "int9", "int16", "uint8", "fp8", "fp8-e3m4", "nf3", "nf8", "fp64", "float16",
     "int4g128", "int4-g", "int4-128", "int4-g-1", "int4_g128", "q4_0", "int4-g128-g64", "gptq"],
)
def test_from_name_rejects_unknown_names(name):
    with pytest.raises(ValueError, match="unknown format name"):
        QuantSpec.from_name(name)


@pytest.mark.parametrize("name", ["fp16-g128", "bf16-g64", "fp32-g32"])
def test_from_name_rejects_groups_on_unscaled_formats(name):
    with pytest.raises(ValueError, match="no group size"):
        QuantSpec.from_name(name)


def test_from_name_zero_group_size_names_the_field():
    with pytest.raises(ValueError, match="QuantSpec.group_size"):
        QuantSpec.from_name("int4-g0")


def test_from_name_override_is_validated():
    with pytest.raises(ValueError, match="QuantSpec.symmetric"):
        QuantSpec.from_name("nf4", symmetric=False)
