"""A hand-made result.json with every section the report draws (the new
`figures`, `plan`, `roofline` and search keys included). Imported by the
report tests (tests/report is on sys.path while they run)."""
from __future__ import annotations

import math

KINDS = {"layer-error", "layer-sqnr", "weight-hist", "staircase", "sensitivity", "svd-energy",
         "memory-fit", "roofline", "pareto"}
EVIL = "<script>alert('x')</script>"


def _metric(size, q, lat, joules):
    return {"size_bytes": size, "params": 1000, "latency_ms": lat,
            "quality": {"name": "accuracy", "value": q, "higher_is_better": True},
            "latency": {"latency_ms": lat, "batch1": {"median_ms": lat, "runs": 7, "warmup": 2, "batch_size": 1},
                        "batched": {"median_ms": 2 * lat, "runs": 7, "warmup": 2, "batch_size": 8},
                        "threads": 2, "device": "cpu"},
            "energy": {"joules": joules, "derivation": f"{size:,} weight bytes x 160 pJ = {joules} J",
                       "constants": {"source": "Horowitz, ISSCC 2014"}}}


def _layer(name, error, error_rtn, sqnr):
    return {"name": name, "shape": [64, 32], "format": "int4-g32", "bytes_fp32": 8192, "bytes_stored": 1152,
            "error": error, "error_rtn": error_rtn, "sqnr_db": sqnr, "seconds": 0.01, "kernel": "reference",
            "note": "output error on calibration data"}


def _hist(lo, hi, counts):
    n = len(counts)
    return {"edges": [lo + (hi - lo) * i / n for i in range(n + 1)], "counts": counts}


def make_full_result() -> dict:
    bell = [round(1000 * math.exp(-((i - 15.5) / 6) ** 2)) for i in range(32)]
    grid = [-0.3 + 0.04 * i for i in range(16)]
    w = [-0.3 + 0.6 * i / 63 for i in range(64)]
    return {
        "model": "toy <model> & co",
        "recipe": [{"gptq": {"bits": 4, "group_size": 32}}, {"prune": {"method": "magnitude", "sparsity": 0.5}}],
        "seconds": 3.5, "seed": 0,
        "baseline": _metric(40000, 0.97, 0.05, 2e-5),
        "compressed": _metric(8000, 0.95, 0.04, 4e-6),
        "size_reduction": 5.0, "ratios": {"R": 5.0, "A": 0.9794, "L": 1.25, "E": None},
        "steps": [
            {"index": 1, "step": {"gptq": {"bits": 4, "group_size": 32}}, "seconds": 0.5,
             "layers": [_layer("fc1", 0.02, 0.05, 20.0), _layer(EVIL, 0.01, 0.03, 24.0),
                        _layer("fc3", 0.04, 0.06, 18.5)],
             "skipped": [{"name": "head", "reason": "output head; pass include_head=True"}]},
            {"index": 2, "step": {"prune": {"method": "magnitude", "sparsity": 0.5}}, "seconds": 0.1,
             "layers": [_layer("fc1", 0.1, None, 9.0), _layer("fc3", 0.2, None, 7.5)], "skipped": []},
        ],
        "figures": {
            "weights": [
                {"layer": "fc1", "step": 1, "format": "int4-g32", "hist": _hist(-0.32, 0.32, bell),
                 "hist_after": _hist(-0.32, 0.32, [c if i % 2 else 0 for i, c in enumerate(bell)]),
                 "grid": grid, "thresholds": []},
                {"layer": "fc3", "step": 2, "format": "sparse", "hist": _hist(-0.32, 0.32, bell),
                 "hist_after": None, "grid": None, "thresholds": [0.05]},
            ],
            "staircase": {"layer": "fc1", "format": "int4-g32", "w": w,
                          "w_hat": [min(grid, key=lambda g: abs(g - x)) for x in w]},
            "sensitivity": [{"layer": "fc1", "errors": {"2": 0.5, "3": 0.1, "4": 0.02, "8": 1e-4}, "bits": 4},
                            {"layer": "fc3", "errors": {"2": 0.9, "3": 0.3, "4": 0.05, "8": 2e-4}, "bits": 8}],
            "svd": [{"layer": "fc1", "energy": [1 - 0.8 ** (r + 1) for r in range(32)], "rank": 8},
                    {"layer": "fc3", "energy": [1 - 0.9 ** (r + 1) for r in range(32)], "rank": 16}],
        },
        "plan": {
            "model": {"name": "7B parameters", "params": 7_000_000_000},
            "device": {"name": "rtx-4090", "memory_bytes": 25769803776, "bandwidth_bytes_per_s": 1.008e12,
                       "peak_flops": {"fp16": 1.652e14, "int8": 6.606e14}},
            "context": 4096, "batch": 1,
            "formats": [
                {"name": "fp16", "bits_per_weight": 16.0, "weight_bytes": 14_000_000_000,
                 "kv_cache_bytes": 2_000_000_000, "total_bytes": 16_500_000_000, "fits": True,
                 "decode_tokens_per_s_bound": 63.0, "compression_vs_fp16": 1.0},
                {"name": "fp32", "bits_per_weight": 32.0, "weight_bytes": 28_000_000_000,
                 "kv_cache_bytes": 2_000_000_000, "total_bytes": 30_000_000_000, "fits": False,
                 "decode_tokens_per_s_bound": 33.6, "compression_vs_fp16": 0.5},
                {"name": "int4-g128", "bits_per_weight": 4.25, "weight_bytes": 3_718_750_000,
                 "kv_cache_bytes": 2_000_000_000, "total_bytes": 5_718_750_000, "fits": True,
                 "decode_tokens_per_s_bound": 176.0, "compression_vs_fp16": 3.76},
            ],
            "recommendation": {"format": "int8", "recipe": "int8", "why": ["it fits <easily>"]},
            "derivations": {"usable_bytes": "25.77 GB = 24.00 GiB on rtx-4090 x (1 - 10% runtime reserve) "
                                            "= 23.19 GB = 21.60 GiB"},
        },
        "roofline": {"device": "rtx-4090", "bandwidth_bytes_per_s": 1.008e12,
                     "peak_flops": {"fp16": 1.652e14, "bf16": 1.652e14, "int8": 6.606e14},
                     "points": [{"label": "decode batch 1", "intensity": 1.0, "flops_per_s": 1.0e12},
                                {"label": "prefill 512", "intensity": 300.0, "flops_per_s": 1.2e14}]},
        "constraints": {"max_size_bytes": 12000, "max_drop": 3.0, "min_quality": None, "device": None,
                        "quality_name": "accuracy", "higher_is_better": True},
        "candidates": [
            {"name": "int8", "recipe": [{"rtn": {"bits": 8}}], "size_bytes": 12000,
             "quality": {"name": "accuracy", "value": 0.968}, "latency_ms": 0.05, "on_front": True,
             "feasible": True, "stage": "full"},
            {"name": "w4-gptq", "recipe": [{"gptq": {"bits": 4}}], "size_bytes": 8000,
             "quality": {"name": "accuracy", "value": 0.95}, "latency_ms": 0.04, "on_front": True,
             "feasible": True, "stage": "full"},
            {"name": "w4-rtn", "recipe": [{"rtn": {"bits": 4}}], "size_bytes": 8000,
             "quality": {"name": "accuracy", "value": 0.93}, "latency_ms": 0.04, "on_front": False,
             "feasible": False, "stage": "proxy"},
            {"name": "w2-rtn", "recipe": [{"rtn": {"bits": 2}}], "size_bytes": 5000,
             "quality": {"name": "accuracy", "value": 0.6}, "latency_ms": None, "on_front": True,
             "feasible": False, "stage": "proxy"},
            {"name": "broken", "recipe": [], "size_bytes": 7000, "quality": None, "latency_ms": None,
             "on_front": False, "feasible": False, "stage": "proxy"},
        ],
        "chosen": None,
    }
