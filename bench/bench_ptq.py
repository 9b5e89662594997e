"""PTQ quality and time on the built-in models: each recipe side by side in one run.

Run: .venv/bin/python bench/bench_ptq.py [--model minilm] [--model tiny-gpt] [--recipe ...]
Prints a Markdown table: quality before/after, size, mean per-layer output error
relative to round-to-nearest, and wall time. docs/BENCHMARKS.md records a run.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from shrink.recipe import compress  # noqa: E402
from shrink.recipe.job import prepare  # noqa: E402

RECIPES = ["int8", "w8a8-smoothquant", "w4-rtn", "w4-gptq", "w4-gptq-act", "w4-awq", "mixed-4.5", "kmeans16",
           "w3-rtn", "w3-gptq", "w2-rtn-g64", "w2-gptq-g64"]
# recipes that are not built-in names, as step lists
EXTRA = {
    "w4-gptq-act": [{"gptq": {"act_order": True}}],
    "w3-rtn": [{"rtn": {"bits": 3}}],
    "w2-rtn-g64": [{"rtn": {"bits": 2, "group_size": 64}}],
    "w2-gptq-g64": [{"gptq": {"bits": 2, "group_size": 64}}],
    "w4-gptq-static": [{"gptq": {"static_groups": True}}],
    "w4-gptq-seq": [{"gptq": {"true_sequential": True}}],
    "w4-gptq-seq-static": [{"gptq": {"true_sequential": True, "static_groups": True}}],
    "w3-gptq-static": [{"gptq": {"bits": 3, "static_groups": True}}],
    "w3-gptq-seq-static": [{"gptq": {"bits": 3, "true_sequential": True, "static_groups": True}}],
}


def describe(batches) -> str:
    """What the calibration is: token windows, sentences (with their real tokens) or images."""
    if not batches:
        return "no calibration data"
    first = batches[0]
    if isinstance(first, dict) and "attention_mask" in first:
        rows = sum(b["input_ids"].shape[0] for b in batches)
        real = sum(int(b["attention_mask"].sum()) for b in batches)
        return f"calibration: {rows} sentences, {real} tokens"
    if isinstance(first, dict):
        ids = [b["input_ids"] for b in batches]
        return f"calibration: {sum(i.shape[0] for i in ids)} x {ids[0].shape[1]} tokens"
    return f"calibration: {sum(b.shape[0] for b in batches)} inputs"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", action="append", help="built-in model(s) (default: minilm and tiny-gpt)")
    ap.add_argument("--recipe", action="append", help=f"recipe(s) (default: {' '.join(RECIPES)})")
    ap.add_argument("--samples", type=int, default=64, help="calibration sequences")
    ap.add_argument("--seq-len", type=int, default=128)
    args = ap.parse_args()
    for name in args.model or ["minilm", "tiny-gpt"]:
        model, batches, metric, _, _ = prepare(name, n_samples=args.samples, seq_len=args.seq_len)
        print(f"\n### {name}: {describe(batches)}\n")
        print("| recipe | quality before | after | size MB before | after | error vs RTN (mean per layer) | seconds |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for recipe in args.recipe or RECIPES:
            t = time.perf_counter()
            res = compress(model, EXTRA.get(recipe, recipe), calibration=batches, evaluate=metric,
                           measure_speed=False)
            secs = time.perf_counter() - t
            b, c = res.metrics["baseline"], res.metrics["compressed"]
            layers = [l for s in res.steps for l in s.layers if l.error_rtn]
            ratio = f"{sum(l.error / l.error_rtn for l in layers) / len(layers):.3f}" if layers else "-"
            q = b["quality"]["name"]
            print(f"| {recipe} | {q} {b['quality']['value']:.4f} | {c['quality']['value']:.4f} | "
                  f"{b['size_bytes'] / 1e6:.2f} | {c['size_bytes'] / 1e6:.2f} | {ratio} | {secs:.1f} |", flush=True)


if __name__ == "__main__":
    main()
