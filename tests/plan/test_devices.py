"""The device table: sane, documented, findable; custom devices validated."""
from __future__ import annotations

import dataclasses
import json

import pytest

from shrink.plan.devices import ALIASES, DEVICES, FORMATS, GiB, KiB, Device, custom_device, get_device
from shrink.plan.lookup import key

REQUIRED = ["a100-40gb", "a100-80gb", "h100", "h200", "l4", "t4", "rtx-3090", "rtx-4090", "apple-m2-max",
            "apple-m3-max", "phone", "raspberry-pi-5", "jetson-orin", "microcontroller",
            "server", "edge", "mobile", "mcu"]


def test_table_has_every_required_device():
    assert set(REQUIRED) <= set(DEVICES)


@pytest.mark.parametrize("name", sorted(DEVICES))
def test_every_entry_is_complete_and_plausible(name):
    d = DEVICES[name]
    assert d.name == name and d.source
    assert isinstance(d.memory_bytes, int) and d.memory_bytes > 0
    assert d.bandwidth_bytes_per_s > 0
    assert d.peak_flops and set(d.peak_flops) <= set(FORMATS)
    p = d.peak_flops
    # lower precision never runs slower than higher on the same hardware
    for low, high in (("fp16", "fp32"), ("bf16", "fp32"), ("fp8", "fp16"), ("int8", "fp16"), ("int4", "int8")):
        if low in p and high in p:
            assert p[low] >= p[high], (name, low, high)
    json.dumps(d.to_json())  # plan --json can carry it


@pytest.mark.parametrize("name, memory_gib, bandwidth, fp16", [
    ("a100-80gb", 80, 2039e9, 312e12),
    ("a100-40gb", 40, 1555e9, 312e12),
    ("h100", 80, 3.35e12, 989.4e12),
    ("h200", 141, 4.8e12, 989.4e12),
    ("rtx-4090", 24, 1008e9, 165.2e12),   # dense; 330 is with sparsity
    ("rtx-3090", 24, 936.2e9, 71e12),
    ("l4", 24, 300e9, 121e12),
    ("t4", 16, 320e9, 65e12),
])
def test_datasheet_numbers(name, memory_gib, bandwidth, fp16):
    d = get_device(name)
    assert d.memory_bytes == memory_gib * GiB
    assert d.bandwidth_bytes_per_s == pytest.approx(bandwidth)
    assert d.peak_flops["fp16"] == pytest.approx(fp16)


def test_h100_fp8_and_what_hardware_lacks():
    assert get_device("h100").peak_flops["fp8"] == pytest.approx(1978.9e12)
    assert "fp8" not in get_device("a100-80gb").peak_flops      # Ampere has no FP8
    assert "bf16" not in get_device("t4").peak_flops            # nor Turing BF16
    assert "int4" not in get_device("h100").peak_flops          # Hopper dropped INT4


def test_seed_000_arithmetic_within_rounding():
    a100 = get_device("a100")
    # Exercise 0.4: 14 GB of FP16 weights at "2 TB/s" take 7.0 ms
    assert 14e9 / a100.bandwidth_bytes_per_s * 1e3 == pytest.approx(7.0, rel=0.03)
    # "312 TFLOPS / 2 TB/s = 156 FLOP/byte"
    assert a100.ridge_point("fp16") == pytest.approx(156, rel=0.03)
    # Chapter 8: A100 FP16 is 2x its (TF32) "FP32"; H100 FP8 1,979
    assert a100.peak_flops["fp16"] / a100.peak_flops["tf32"] == 2
    assert get_device("h100").peak("fp8-e4m3") == pytest.approx(1979e12, rel=1e-3)


def test_seed_004_tiers():
    assert get_device("server").memory_bytes == 80 * GiB
    assert get_device("edge").memory_bytes == 16 * GiB
    assert get_device("mobile").memory_bytes == 4 * GiB
    assert get_device("mcu").memory_bytes == 512 * KiB
    tiers = [get_device(n) for n in ("server", "edge", "mobile", "mcu")]
    assert [d.tier for d in tiers] == ["server", "edge", "mobile", "mcu"]
    sizes = [d.memory_bytes for d in tiers]
    assert sizes == sorted(sizes, reverse=True)
    assert all("seed 004" in d.source for d in tiers)


def test_microcontroller_states_its_assumption():
    mcu = get_device("microcontroller")
    assert mcu.memory_bytes == 2**20 and mcu.storage_bytes == 2 * 2**20
    assert "STM32H7" in mcu.source
    assert "Snapdragon 8 Gen 3" in get_device("phone").source


def test_peak_accepts_plan_format_names():
    d = get_device("rtx-4090")
    assert d.peak("int4-g128") == d.peak_flops["int4"]
    assert d.peak("fp8-e5m2") == d.peak_flops["fp8"]
    assert d.peak("nf4") is None


@pytest.mark.parametrize("spelling, name", [
    ("RTX 4090", "rtx-4090"), ("rtx4090", "rtx-4090"), ("4090", "rtx-4090"), ("NVIDIA/H100-SXM5", "h100"),
    ("A100", "a100-80gb"), ("a100_40gb", "a100-40gb"), ("Jetson AGX Orin", "jetson-orin"), ("rpi5", "raspberry-pi-5"),
    ("M3-Max", "apple-m3-max"), ("stm32h7", "microcontroller"), ("Server", "server"), ("MCU", "mcu"),
])
def test_lookup_any_spelling(spelling, name):
    assert get_device(spelling) is DEVICES[name]


def test_spellings_do_not_collide():
    keys = [key(n) for n in DEVICES]
    assert len(keys) == len(set(keys))
    for alias, target in ALIASES.items():
        assert get_device(alias) is DEVICES[target], alias


@pytest.mark.parametrize("typo, near", [("rtx-4080", "rtx-4090"), ("h10", "h100"), ("jetson-nano", "jetson-orin"),
                                        ("raspberry-pi-4", "raspberry-pi-5"), ("apple-m4-max", "apple-m3-max")])
def test_unknown_device_suggests(typo, near):
    with pytest.raises(ValueError) as e:
        get_device(typo)
    msg = str(e.value)
    assert msg.startswith(f"unknown device {typo!r}; closest: ") and near in msg and "\n" not in msg


def test_custom_device():
    d = custom_device(memory="24GB", bandwidth="1TB/s")
    assert (d.name, d.tier, d.memory_bytes, d.bandwidth_bytes_per_s) == ("custom", "custom", 24 * 10**9, 1e12)
    assert dict(d.peak_flops) == {}
    assert custom_device(memory="8GiB").bandwidth_bytes_per_s is None
    assert custom_device(bandwidth=100e9, name="box").memory_bytes is None
    over = custom_device(memory="20GiB", base="rtx-4090")
    assert over.memory_bytes == 20 * GiB and over.bandwidth_bytes_per_s == 1008e9
    assert over.peak_flops == get_device("rtx-4090").peak_flops and over.name == "rtx-4090 (custom)"


@pytest.mark.parametrize("kwargs, words", [
    ({}, "needs --memory, --bandwidth or both"),
    ({"memory": "0"}, "memory must be positive"),
    ({"memory": "-8GB"}, "memory must be positive"),
    ({"memory": "lots"}, "memory: 'lots' is not a number"),
    ({"bandwidth": 0}, "bandwidth must be positive"),
    ({"bandwidth": "fast"}, "bandwidth: 'fast' is not a number"),
    ({"memory": "8GB", "bandwidth": "-1TB/s"}, "bandwidth must be positive"),
    ({"memory": "8GB", "base": "rtx-9090"}, "unknown device 'rtx-9090'"),
])
def test_custom_device_errors(kwargs, words):
    with pytest.raises(ValueError, match=words) as e:
        custom_device(**kwargs)
    assert "\n" not in str(e.value)


def test_device_validates_itself_and_is_frozen():
    d = get_device("t4")
    with pytest.raises(ValueError, match="peak format 'fp64'"):
        dataclasses.replace(d, peak_flops={"fp64": 1e12})
    with pytest.raises(ValueError, match="peak fp16 must be a positive number"):
        dataclasses.replace(d, peak_flops={"fp16": 0})
    with pytest.raises(ValueError, match="tier"):
        dataclasses.replace(d, tier="cloud")
    with pytest.raises(ValueError, match="memory_bytes"):
        dataclasses.replace(d, memory_bytes=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.memory_bytes = 1
    with pytest.raises(TypeError):
        d.peak_flops["fp16"] = 1.0
    assert hash(d) == hash(get_device("t4"))
    assert isinstance(d, Device)
