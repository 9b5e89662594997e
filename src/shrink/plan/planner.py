"""The plan: for each number format, what the model stores, whether it fits with its
KV cache, and how fast decoding can possibly be, each figure with its arithmetic."""
from __future__ import annotations

from dataclasses import dataclass, field

from shrink.calc import decode_flops_per_token, kv_cache_bytes, ridge_point

from .devices import Device, custom_device, get_device
from .jobmem import JobShape, job_memory
from .formats import DEFAULT_FORMATS, KV_BYTES, FormatInfo, arch_weight_bytes, count_weight_bytes, format_info
from .model import ModelInfo, resolve_model
from .numbers import parse_count

RESERVE = 0.10          # of device memory, for the runtime (CUDA context, allocator slack)
ACT_BUFFERS = 2         # live fp16 [batch, context, hidden] buffers during prefill, besides the MLP's


@dataclass(frozen=True)
class FormatPlan:
    name: str
    bits_per_weight: float
    weight_bytes: int
    kv_cache_bytes: int
    total_bytes: int
    fits: bool | None
    decode_tokens_per_s_bound: float | None
    compression_vs_fp16: float
    bound: str | None                 # "memory" | "compute" at the chosen batch
    intensity: float | None           # FLOP per byte of one decode step
    ridge: float | None               # the device's ridge point for this format's compute

    def to_json(self) -> dict:
        return {"name": self.name, "bits_per_weight": self.bits_per_weight,
                "weight_bytes": self.weight_bytes, "kv_cache_bytes": self.kv_cache_bytes,
                "total_bytes": self.total_bytes, "fits": self.fits,
                "decode_tokens_per_s_bound": self.decode_tokens_per_s_bound,
                "compression_vs_fp16": self.compression_vs_fp16,
                "roofline": None if self.bound is None else
                {"bound": self.bound, "intensity_flop_per_byte": self.intensity,
                 "ridge_flop_per_byte": self.ridge}}


@dataclass(frozen=True)
class Plan:
    model: ModelInfo
    device: Device | None
    context: int
    batch: int
    kv_format: str
    activation_bytes: int
    usable_bytes: int | None
    formats: list[FormatPlan]
    recommendation: dict | None
    derivations: dict[str, str] = field(default_factory=dict)
    # every format evaluated: the listed ones plus the defaults the recommendation reasons about
    candidates: list[FormatPlan] = field(default_factory=list)
    # peak memory of a compression job, in memory and streamed (plan/jobmem.py); None without an arch
    job_memory: dict | None = None

    def format(self, name: str) -> FormatPlan:
        """A listed format's figures (KeyError for one not asked for)."""
        for f in self.formats:
            if f.name == name:
                return f
        raise KeyError(name)

    def candidate(self, name: str) -> FormatPlan:
        """Any evaluated format, listed or not."""
        for f in self.candidates:
            if f.name == name:
                return f
        raise KeyError(name)

    def to_json(self) -> dict:
        return {"model": {"name": self.model.name, "params": self.model.params},
                "device": None if self.device is None else self.device.to_json(),
                "context": self.context, "batch": self.batch, "kv_format": self.kv_format,
                "formats": [f.to_json() for f in self.formats],
                "recommendation": self.recommendation,
                "derivations": dict(self.derivations),
                "job_memory": self.job_memory}


def build_plan(model=None, *, params=None, device: str | Device | None = None, memory=None,
               bandwidth=None, context=None, batch=1, kv_format: str = "fp16",
               formats=None, max_drop: float = 1.0, can_train: bool = False, job: JobShape | None = None) -> Plan:
    """job: the compression job whose peak memory `job_memory` predicts (default w4-gptq on
    job.prepare's calibration: 64 x 128 tokens)."""
    from .recommend import recommend

    info = resolve_model(model, params)
    dev = _device(device, memory, bandwidth)
    arch = info.arch
    ctx = parse_count(context, "--context") if context is not None else (
        min(arch.max_context, 4096) if arch is not None and arch.max_context else 2048)
    b = parse_count(batch, "--batch")
    kvf = kv_format.lower()
    if kvf not in KV_BYTES:
        raise ValueError(f"--kv-format {kv_format!r} is not one of {', '.join(KV_BYTES)}")
    if isinstance(formats, str):
        formats = [formats]
    names = list(dict.fromkeys(f.lower() for f in (formats or DEFAULT_FORMATS)))
    # fp16 is the baseline for compression; the defaults are what the recommendation weighs
    names_all = list(dict.fromkeys(names + ["fp16"] + list(DEFAULT_FORMATS)))
    infos = [format_info(n) for n in names_all]
    d: dict[str, str] = {}
    _derive_params(info, d)

    kv = _kv_bytes(info, ctx, b, kvf, d)
    act = _activation_bytes(info, ctx, b, d)
    usable = None
    if dev is not None and dev.memory_bytes is not None:
        usable = int(dev.memory_bytes * (1 - RESERVE))
        d["usable_bytes"] = (f"{_gbi(dev.memory_bytes)} on {dev.name} x (1 - {RESERVE:.0%} runtime reserve) "
                             f"= {_gbi(usable)}")
    scratch: dict[str, str] = {}  # derivations of formats not listed are not shown
    weights = {f.name: _weight_bytes(info, f, d if f.name in names else scratch) for f in infos}
    fp16_bytes = weights["fp16"]
    every = [_format_plan(info, f, weights[f.name], fp16_bytes, kv, act, usable, dev, b,
                          d if f.name in names else scratch) for f in infos]
    plans = [f for f in every if f.name in names]
    jobs = None if arch is None else job_memory(arch, job or JobShape(), d)
    plan = Plan(info, dev, ctx, b, kvf, act, usable, plans, None, d, every, jobs)
    rec = recommend(plan, max_drop=max_drop, can_train=can_train)
    return Plan(info, dev, ctx, b, kvf, act, usable, plans, rec, d, every, jobs)


def _device(device, memory, bandwidth) -> Device | None:
    if memory is not None or bandwidth is not None:
        return custom_device(memory=memory, bandwidth=bandwidth, base=device)
    if device is None:
        return None
    return device if isinstance(device, Device) else get_device(device)


def _derive_params(info: ModelInfo, d: dict) -> None:
    a = info.arch
    if a is None:
        d["params"] = f"{info.params:,} (given with --params; no architecture, so no per-channel metadata or KV cache)"
        return
    lin = a.linear_params()
    d["params"] = (f"linear weights {lin:,} + embeddings {a.embedding_params():,} + norms, biases and "
                   f"position tables {a.other_params():,} = {info.params:,} ({info.source})")


def _kv_bytes(info: ModelInfo, ctx: int, b: int, kvf: str, d: dict) -> int:
    a = info.arch
    if a is None:
        d["kv_cache_bytes"] = "needs the architecture (layers, KV heads, head size): give a preset or config.json"
        return 0
    if not a.is_decoder:
        d["kv_cache_bytes"] = f"0: {a.name} is an encoder ({a.family}); it keeps no KV cache"
        return 0
    e = KV_BYTES[kvf]
    kv = int(kv_cache_bytes(a.num_layers, a.num_kv_heads, a.head_dim, ctx, b, e))
    gqa = f" (grouped-query: {a.num_kv_heads} KV heads for {a.num_heads} query heads)" \
        if a.num_kv_heads != a.num_heads else ""
    d["kv_cache_bytes"] = (f"2 (K and V) x {a.num_layers} layers x {a.num_kv_heads} KV heads x {a.head_dim} "
                           f"head dim x {ctx:,} context x {b} batch x {e:g} B ({kvf}) = {kv:,} B = {_gbi(kv)}{gqa}")
    return kv


def _activation_bytes(info: ModelInfo, ctx: int, b: int, d: dict) -> int:
    a = info.arch
    if a is None:
        d["activation_bytes"] = "needs the architecture; counted as 0"
        return 0
    width = ACT_BUFFERS * a.hidden_size + a.intermediate_size
    act = b * ctx * width * 2
    d["activation_bytes"] = (f"prefill working set, fp16, attention computed in tiles (no [context x context] "
                             f"matrix): {b} batch x {ctx:,} context x ({ACT_BUFFERS} x {a.hidden_size} hidden + "
                             f"{a.intermediate_size} MLP) x 2 B = {_gb(act)}")
    return act


def _weight_bytes(info: ModelInfo, f: FormatInfo, d: dict) -> int:
    key = f"weight_bytes[{f.name}]"
    meta = "" if not f.has_scale else (
        f"; metadata: one fp16 scale{' and one fp16 zero-point' if not f.symmetric else ''} per "
        + (f"group of {f.group_size}" if f.granularity == "group" else f.granularity))
    if info.arch is None:
        w = count_weight_bytes(info.params, f)
        extra = " (+ per-channel scales, which need the shapes)" if f.has_scale and f.granularity == "channel" else ""
        grp = (f" + ceil({info.params:,} / {f.group_size}) groups x {(1 if f.symmetric else 2) * 2} B"
               if f.has_scale and f.granularity == "group" else "")
        d[key] = f"{info.params:,} params x {f.bits} bits / 8{grp} = {w:,} B = {_gbi(w)}{extra}{meta}"
        return w
    w, parts = arch_weight_bytes(info.arch, f)
    d[key] = (f"linear weights {parts['linears']:,} B + embeddings {parts['embeddings']:,} B (both {f.name}) + "
              f"norms/biases/positions {parts['other']:,} B ({f.side_bits}-bit) = {w:,} B = {_gbi(w)}{meta}")
    return w


def _format_plan(info, f: FormatInfo, w: int, fp16: int, kv: int, act: int, usable, dev, b, d) -> FormatPlan:
    n = f.name
    bpw = 8 * w / info.params
    d[f"bits_per_weight[{n}]"] = f"8 x {w:,} B / {info.params:,} params = {bpw:.3f}"
    total = w + kv + act
    d[f"total_bytes[{n}]"] = f"weights {_gb(w)} + KV cache {_gb(kv)} + activations {_gb(act)} = {_gb(total)}"
    comp = fp16 / w
    d[f"compression_vs_fp16[{n}]"] = f"{fp16:,} B (fp16) / {w:,} B = {comp:.2f}x"
    fits = None
    if usable is not None:
        fits = total <= usable
        d[f"fits[{n}]"] = (f"{_gb(total)} {'<=' if fits else '>'} {_gb(usable)} usable: "
                           + ("fits" if fits else f"short by {_gb(total - usable)}"))
    tps = bound = intensity = ridge = None
    if dev is not None and dev.bandwidth_bytes_per_s is not None:
        bw = dev.bandwidth_bytes_per_s
        step = w + kv
        mem_tps = b * bw / step
        flops_tok = decode_flops_per_token(info.params)
        intensity = b * flops_tok / step
        # weight-only formats run their matmuls in fp16; a device without fp16 units in fp32
        peak = next((p for p in (dev.peak(c) for c in (f.compute, "fp16", "bf16", "fp32")) if p), None)
        line = (f"each decode step reads the weights once and the KV cache once ({_gb(w)} + {_gb(kv)}) "
                f"and yields {b} token(s): {b} x {bw / 1e9:,.1f} GB/s / {_gb(step)} = {mem_tps:,.1f} tokens/s")
        tps = mem_tps
        if peak is not None:
            ridge = ridge_point(peak, bw)
            comp_tps = peak / flops_tok
            bound = "memory" if intensity < ridge else "compute"
            tps = min(mem_tps, comp_tps)
            d[f"roofline[{n}]"] = (f"intensity = {b} x 2 x {info.params:,} FLOP / {step:,} B = {intensity:,.2f} FLOP/B; "
                                   f"ridge = {peak / 1e12:,.1f} TFLOP/s ({f.compute}) / {bw / 1e9:,.1f} GB/s = "
                                   f"{ridge:,.1f} FLOP/B -> {bound}-bound")
            line += (f"; compute allows {peak / 1e12:,.1f} TFLOP/s / (2 x {info.params:,}) = {comp_tps:,.1f}; "
                     f"bound = min = {tps:,.1f} tokens/s")
        d[f"decode_tokens_per_s_bound[{n}]"] = line
    return FormatPlan(n, bpw, w, kv, total, fits, tps, comp, bound, intensity, ridge)


def _gb(n: float) -> str:
    return f"{n / 1e9:,.2f} GB"


def _gbi(n: float) -> str:
    return f"{n / 1e9:,.2f} GB = {n / 2**30:,.2f} GiB"
