"""Target devices as data: memory, memory bandwidth and peak throughput per number format.

Conventions, so that every entry means the same thing:
- memory_bytes is the memory a model can live in (GPU memory; unified or system
  RAM; SRAM on a microcontroller), its marketed capacity read as binary units
  (a "24 GB" card has 24 GiB, as DRAM is sized); drivers and the OS take some.
- bandwidth_bytes_per_s is the vendor's peak, decimal (1 GB/s = 10^9 B/s).
- peak_flops are dense figures (structured sparsity's 2x is never counted), in
  operations per second, for the formats the hardware runs natively: "fp32"
  (CUDA/vector cores, not TF32), "tf32", "fp16", "bf16", "fp8", "int8", "int4".
  GeForce figures are with FP32 accumulation. Formats a device lacks are absent.
- Where the seeds round a number differently the datasheet wins; notes say so.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from .lookup import build_index, find
from .numbers import parse_bytes, parse_rate

FORMATS = ("fp32", "tf32", "fp16", "bf16", "fp8", "int8", "int4")
TIERS = ("server", "desktop", "edge", "mobile", "mcu", "custom")
KiB, MiB, GiB = 2**10, 2**20, 2**30
T, G = 1e12, 1e9


@dataclass(frozen=True)
class Device:
    """One target. memory_bytes or bandwidth may be None only for a custom device given one of them."""
    name: str
    tier: str
    memory_bytes: int | None
    bandwidth_bytes_per_s: float | None
    peak_flops: Mapping[str, float] = field(default_factory=dict, hash=False)
    storage_bytes: int | None = None   # read-only memory weights can execute from (MCU flash)
    source: str = ""
    notes: str = ""

    def __post_init__(self) -> None:
        if self.tier not in TIERS:
            raise ValueError(f"device {self.name!r}: tier {self.tier!r} is not one of {', '.join(TIERS)}")
        if self.memory_bytes is None and self.bandwidth_bytes_per_s is None:
            raise ValueError(f"device {self.name!r}: give its memory, its bandwidth, or both")
        for what, value in (("memory_bytes", self.memory_bytes), ("storage_bytes", self.storage_bytes)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"device {self.name!r}: {what} must be a positive integer, got {value!r}")
        bw = self.bandwidth_bytes_per_s
        if bw is not None and (isinstance(bw, bool) or not isinstance(bw, (int, float)) or not 0 < bw < float("inf")):
            raise ValueError(f"device {self.name!r}: bandwidth must be a positive number, got {bw!r}")
        peaks = dict(self.peak_flops)
        for fmt, value in peaks.items():
            if fmt not in FORMATS:
                raise ValueError(f"device {self.name!r}: peak format {fmt!r} is not one of {', '.join(FORMATS)}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"device {self.name!r}: peak {fmt} must be a positive number, got {value!r}")
        object.__setattr__(self, "peak_flops", MappingProxyType({k: float(v) for k, v in peaks.items()}))

    def peak(self, fmt: str) -> float | None:
        """Peak ops/s for a format name as plan spells it (fp8-e4m3 -> fp8, int4-g128 -> int4); None if absent."""
        base = re.sub(r"-g\d+$", "", fmt.lower())
        base = "fp8" if base.startswith("fp8") else base
        return self.peak_flops.get(base)

    def ridge_point(self, fmt: str) -> float | None:
        """Roofline ridge in FLOP per byte (peak / bandwidth): below it a kernel is bandwidth-bound."""
        peak = self.peak(fmt)
        if peak is None or self.bandwidth_bytes_per_s is None:
            return None
        return peak / self.bandwidth_bytes_per_s

    def to_json(self) -> dict:
        """The `device` object of `plan --json`."""
        return {"name": self.name, "memory_bytes": self.memory_bytes,
                "bandwidth_bytes_per_s": self.bandwidth_bytes_per_s, "peak_flops": dict(self.peak_flops)}


def _d(name, tier, memory, bandwidth, peaks, source, notes="", storage=None) -> Device:
    return Device(name=name, tier=tier, memory_bytes=memory, bandwidth_bytes_per_s=bandwidth,
                  peak_flops=peaks, storage_bytes=storage, source=source, notes=notes)


_A100 = {"fp32": 19.5 * T, "tf32": 156 * T, "fp16": 312 * T, "bf16": 312 * T, "int8": 624 * T, "int4": 1248 * T}
_A100_SRC = ("NVIDIA A100 datasheet (SXM4): FP32 19.5, TF32 156, FP16/BF16 312 TFLOPS, INT8 624 TOPS "
             "dense; INT4 1,248 TOPS from the A100 whitepaper")
_HOPPER = {"fp32": 67 * T, "tf32": 494.7 * T, "fp16": 989.4 * T, "bf16": 989.4 * T,
           "fp8": 1978.9 * T, "int8": 1978.9 * T}
_HOPPER_SRC = ("FP32 67, TF32 494.7, FP16/BF16 989.4, FP8 1,978.9 TFLOPS, INT8 1,978.9 TOPS dense "
               "(the datasheet's 989/1,979/3,958 include sparsity; Hopper whitepaper)")
_PHONE = {"fp32": 2.77 * T, "fp16": 5.5 * T}
_MCU = {"fp32": 0.96 * G, "int8": 1.92 * G}
_ORIN_NX = {"fp32": 1.88 * T, "fp16": 15 * T, "bf16": 15 * T, "int8": 30 * T}

DEVICES: dict[str, Device] = {d.name: d for d in (
    _d("a100-40gb", "server", 40 * GiB, 1555 * G, _A100, _A100_SRC + "; 40 GB HBM2 at 1,555 GB/s",
       "SXM4 part"),
    _d("a100-80gb", "server", 80 * GiB, 2039 * G, _A100, _A100_SRC + "; 80 GB HBM2e at 2,039 GB/s",
       "SXM4 part (PCIe: 1,935 GB/s). Seed 000 rounds it to 2 TB/s and calls TF32's 156 TFLOPS 'FP32'; "
       "true FP32 is 19.5"),
    _d("h100", "server", 80 * GiB, 3350 * G, _HOPPER, "NVIDIA H100 datasheet (SXM5 80 GB HBM3, 3.35 TB/s); "
       + _HOPPER_SRC, "SXM5 part. Seed 000 rounds to 990 TFLOPS BF16 and calls TF32's 495 'FP32'; "
       "FP8 1,979 as in the seed. No INT4 tensor cores on Hopper"),
    _d("h200", "server", 141 * GiB, 4800 * G, _HOPPER, "NVIDIA H200 datasheet (SXM, 141 GB HBM3e, 4.8 TB/s); "
       "compute as H100 SXM: " + _HOPPER_SRC),
    _d("l4", "server", 24 * GiB, 300 * G,
       {"fp32": 30.3 * T, "tf32": 60 * T, "fp16": 121 * T, "bf16": 121 * T, "fp8": 242.5 * T, "int8": 242.5 * T},
       "NVIDIA L4 datasheet: 24 GB GDDR6, 300 GB/s; FP32 30.3; TF32 120, FP16/BF16 242, FP8 485 TFLOPS, "
       "INT8 485 TOPS with sparsity, halved here"),
    _d("t4", "server", 16 * GiB, 320 * G, {"fp32": 8.1 * T, "fp16": 65 * T, "int8": 130 * T, "int4": 260 * T},
       "NVIDIA T4 datasheet: 16 GB GDDR6, 320 GB/s; FP32 8.1, FP16 65 TFLOPS, INT8 130, INT4 260 TOPS",
       "Turing: no BF16, TF32 or FP8"),
    _d("rtx-3090", "desktop", 24 * GiB, 936.2 * G,
       {"fp32": 35.6 * T, "tf32": 35.6 * T, "fp16": 71 * T, "bf16": 71 * T, "int8": 284 * T, "int4": 568 * T},
       "NVIDIA Ampere GA102 whitepaper, RTX 3090: 24 GB GDDR6X, 936 GB/s; dense tensor figures",
       "FP16 with FP32 accumulate; 142 TFLOPS with FP16 accumulate"),
    _d("rtx-4090", "desktop", 24 * GiB, 1008 * G,
       {"fp32": 82.6 * T, "tf32": 82.6 * T, "fp16": 165.2 * T, "bf16": 165.2 * T, "fp8": 330.3 * T,
        "int8": 660.6 * T, "int4": 1321.2 * T},
       "NVIDIA Ada Lovelace whitepaper, RTX 4090: 24 GB GDDR6X, 1,008 GB/s; dense tensor figures "
       "(330.4 FP16 is with sparsity)",
       "FP16/FP8 with FP32 accumulate; FP16 accumulate doubles them (330.3 / 660.6)"),
    _d("apple-m2-max", "desktop", 96 * GiB, 400 * G, {"fp32": 13.6 * T, "fp16": 13.6 * T},
       "Apple M2 Max (38-core GPU, up to 96 GB unified memory, 400 GB/s)",
       "Apple publishes no FLOPS: GPU estimate 4,864 ALUs x 2 x 1.398 GHz; FP16 runs at the FP32 rate. "
       "The 15.8 TOPS Neural Engine is not counted"),
    _d("apple-m3-max", "desktop", 128 * GiB, 400 * G, {"fp32": 14.3 * T, "fp16": 14.3 * T},
       "Apple M3 Max (16-core CPU / 40-core GPU, up to 128 GB unified memory, 400 GB/s)",
       "Apple publishes no FLOPS: GPU estimate 5,120 ALUs x 2 x ~1.4 GHz (third-party figures range to "
       "16.4 TFLOPS); the 14-core/30-core M3 Max has 300 GB/s; the 18 TOPS Neural Engine is not counted"),
    _d("phone", "mobile", 12 * GiB, 76.8 * G, _PHONE,
       "assumed: a Snapdragon 8 Gen 3 flagship phone (e.g. Galaxy S24 Ultra): 12 GB LPDDR5X-9600, "
       "64-bit bus = 76.8 GB/s",
       "the OS and other apps keep several GB; GPU peaks are estimates (Adreno 750, ~1,536 ALUs at "
       "903 MHz, FP16 at twice FP32); Qualcomm publishes no Hexagon NPU TOPS for it"),
    _d("raspberry-pi-5", "edge", 8 * GiB, 17.07 * G, {"fp32": 153.6 * G, "fp16": 307.2 * G, "int8": 614.4 * G},
       "Raspberry Pi 5, 8 GB LPDDR4X-4267 on a 32-bit bus = 17.07 GB/s",
       "CPU only (4x Cortex-A76 at 2.4 GHz): theoretical NEON peaks, 2 x 128-bit FMA pipes per core, "
       "INT8 via SDOT; 4 GB and 16 GB versions exist"),
    _d("jetson-orin", "edge", 64 * GiB, 204.8 * G,
       {"fp32": 5.3 * T, "tf32": 21.3 * T, "fp16": 42.5 * T, "bf16": 42.5 * T, "int8": 85 * T},
       "NVIDIA Jetson AGX Orin 64GB: 64 GB LPDDR5, 204.8 GB/s; GPU 2,048 CUDA cores (5.3 TFLOPS FP32), "
       "64 tensor cores (170 INT8 TOPS with sparsity)",
       "GPU dense figures (sparse / 2); the two DLAs add 105 sparse INT8 TOPS (275 TOPS in all)"),
    _d("microcontroller", "mcu", 1 * MiB, 1.92 * G, _MCU,
       "assumed: an STM32H743-class Cortex-M7 at 480 MHz with 1 MB SRAM and 2 MB flash",
       "memory is SRAM; weights may execute from the 2 MB flash (storage_bytes). Estimates: bandwidth "
       "= 64-bit AXI at 240 MHz; FP32 1 FMA per cycle; INT8 2 MACs per cycle (SMLAD)", storage=2 * MiB),
    # seed 004's platform tiers: memory from the seed, speed from a named representative
    _d("server", "server", 80 * GiB, 2039 * G, _A100,
       "seed 004: Server tier, 80 GB (decision tree; range 80-512 GB RAM)",
       "bandwidth and peaks are the a100-80gb's (seed 004 gives memory only); its '350GB' headline is "
       "GPT-3's FP16 size, not the tier's memory"),
    _d("edge", "edge", 16 * GiB, 102.4 * G, _ORIN_NX,
       "seed 004: Edge tier, 16 GB (range 4-16 GB RAM)",
       "bandwidth and peaks of a 16 GB edge box, the Jetson Orin NX 16GB (102.4 GB/s, 100 sparse INT8 "
       "TOPS with its DLAs); GPU dense figures derived (sparse / 2, 1,024 cores at 918 MHz)"),
    _d("mobile", "mobile", 4 * GiB, 76.8 * G, _PHONE,
       "seed 004: Mobile tier, 4 GB (range 2-4 GB RAM)",
       "the memory one app can count on; bandwidth and peaks are the `phone` entry's (estimates)"),
    _d("mcu", "mcu", 512 * KiB, 1.92 * G, _MCU,
       "seed 004: MCU tier, 512 KB (range 256 KB - 2 MB)",
       "the seed's decision tree says '512MB', a slip for its hierarchy's 512KB; bandwidth and peaks "
       "are the `microcontroller` entry's (estimates)"),
)}

ALIASES: dict[str, str] = {
    "a100": "a100-80gb", "a100-40g": "a100-40gb", "a100-sxm4-40gb": "a100-40gb",
    "a100-80g": "a100-80gb", "a100-sxm4-80gb": "a100-80gb",
    "h100-sxm": "h100", "h100-sxm5": "h100", "h100-80gb": "h100", "h100-sxm5-80gb": "h100",
    "h200-sxm": "h200", "h200-141gb": "h200",
    "nvidia-l4": "l4", "tesla-t4": "t4", "nvidia-t4": "t4",
    "3090": "rtx-3090", "geforce-rtx-3090": "rtx-3090", "4090": "rtx-4090", "geforce-rtx-4090": "rtx-4090",
    "m2-max": "apple-m2-max", "macbook-pro-m2-max": "apple-m2-max",
    "m3-max": "apple-m3-max", "macbook-pro-m3-max": "apple-m3-max",
    "smartphone": "phone", "android": "phone", "snapdragon-8-gen-3": "phone", "sd8gen3": "phone",
    "rpi5": "raspberry-pi-5", "pi5": "raspberry-pi-5", "raspberry-pi": "raspberry-pi-5",
    "jetson": "jetson-orin", "jetson-agx-orin": "jetson-orin", "agx-orin": "jetson-orin",
    "orin": "jetson-orin", "jetson-agx-orin-64gb": "jetson-orin",
    "stm32h7": "microcontroller", "stm32h743": "microcontroller", "cortex-m7": "microcontroller",
    "mcu-tier": "mcu", "server-tier": "server", "edge-tier": "edge", "mobile-tier": "mobile",
}

_INDEX = build_index(DEVICES, ALIASES)


def get_device(name: str) -> Device:
    """The device called `name` (any spelling or alias); ValueError naming the closest otherwise."""
    return DEVICES[find("device", name, _INDEX, DEVICES)]


def custom_device(memory: object = None, bandwidth: object = None, name: str = "custom",
                  base: Device | str | None = None) -> Device:
    """A device from --memory / --bandwidth ("24GB", "8GiB", "1TB/s", or numbers of bytes).

    With `base`, the given figures replace that device's (its peaks are kept);
    without, the device has only what was given (no peaks).
    """
    if memory is None and bandwidth is None:
        raise ValueError("a custom device needs --memory, --bandwidth or both (e.g. --memory 24GB --bandwidth 1TB/s)")
    mem = None if memory is None else parse_bytes(memory, "memory")
    bw = None if bandwidth is None else parse_rate(bandwidth, "bandwidth")
    if base is not None:
        dev = get_device(base) if isinstance(base, str) else base
        return dataclasses.replace(
            dev, name=name if name != "custom" else f"{dev.name} (custom)",
            memory_bytes=dev.memory_bytes if mem is None else mem,
            bandwidth_bytes_per_s=dev.bandwidth_bytes_per_s if bw is None else bw,
            notes=(dev.notes + "; " if dev.notes else "") + "memory/bandwidth overridden by the user")
    return Device(name=name, tier="custom", memory_bytes=mem, bandwidth_bytes_per_s=bw,
                  source="given by the user")
