"""Low-rank factorization (issue 7): size, parameters, quality and latency of the lowrank
step on the built-in pretrained models.

Run: .venv/bin/python bench/bench_lowrank.py [--sections minilm,tinygpt] [--threads 2]
     [--latency-rounds 3] [--finetune-steps 50]
Prints Markdown tables; docs/BENCHMARKS.md records a run.

Sections:
- minilm:  the pretrained all-MiniLM-L6-v2 (22.7M parameters, 37 Linear layers with the pooler) factorized
           at energy 0.5, 0.7, 0.8, 0.9, 0.95, 0.99 and at budgets keep 0.25 and 0.5; no
           fine-tune. Per setting: layers factorized (the rest would not shrink and stay
           dense), model bytes and parameters, embedding cosine to the original on 64
           held-out sentences (and top-1 neighbour agreement), latency of a batch of 8
           calibration sentences and of one: the fastest of 7 runs x --latency-rounds rounds,
           timed round-robin with the original (on a shared machine the minimum is the
           figure other processes disturb least).
- tinygpt: the built-in tiny-gpt (a small Llama trained on the standard library)
           at energy 0.8, 0.9, 0.95 and keep 0.5: held-out perplexity; for energy 0.9 and
           keep 0.5 also after a fine-tune of --finetune-steps steps (distillation from the
           original on the 64 calibration windows, the lowrank step's own finetune option).

Every run goes through shrink.recipe.compress on the models and metrics of
shrink.recipe.job.prepare; the spectra come from the step's own record
(details["lowrank"]).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from shrink.eval.latency import measure_latency  # noqa: E402
from shrink.recipe import compress  # noqa: E402
from shrink.recipe.job import prepare  # noqa: E402
from shrink.recipe.measure import measure  # noqa: E402
from shrink.recipe.records import model_nbytes, model_params  # noqa: E402

MINILM = [("energy", 0.5), ("energy", 0.7), ("energy", 0.8), ("energy", 0.9), ("energy", 0.95),
          ("energy", 0.99), ("keep", 0.25), ("keep", 0.5)]
TINYGPT = [("energy", 0.8), ("energy", 0.9), ("energy", 0.95), ("keep", 0.5)]
FINETUNED = [("energy", 0.9), ("keep", 0.5)]


def lowrank(model, crit, value, batches, metric, base, finetune_steps=None):
    step = {crit: value}
    if finetune_steps:
        step["finetune"] = {"steps": finetune_steps, "lr": 1e-4}
    t = time.perf_counter()
    res = compress(model, [{"lowrank": step}], calibration=batches, evaluate=metric, measure_speed=False,
                   baseline=base)
    return res, time.perf_counter() - t


def timings(models: dict, probes: dict, rounds: int) -> dict:
    acc = {m: {p: [] for p in probes} for m in models}
    for _ in range(rounds):
        for name, model in models.items():
            for p, batch in probes.items():
                acc[name][p].append(measure_latency(model, batch, warmup=2, runs=7)["min_ms"])
    # the minimum: on a shared machine other processes only ever add time, so it is the least disturbed
    return {m: {p: min(v) for p, v in d.items()} for m, d in acc.items()}


def first_rows(batch: dict, n: int) -> dict:
    return {k: v[:n] for k, v in batch.items()}


def spectrum_summary(details: dict) -> str:
    """How flat the spectra are: the median over layers of the rank fraction 90% energy needs."""
    fr = []
    for e in details["layers"]:
        ranks, energy = e["ranks"], e["energy"]
        r90 = next((r for r, v in zip(ranks, energy) if v >= 0.9), ranks[-1])
        fr.append(r90 / e["max_rank"])
    return f"{statistics.median(fr):.2f}"


def minilm(rounds: int) -> None:
    p = prepare("minilm")
    base_bytes, base_params = model_nbytes(p.model), model_params(p.model)
    base = measure(p.model, p.metric, None)
    base_q = base["quality"]
    rows, models = [], {"original": p.model}
    for crit, value in MINILM:
        res, secs = lowrank(p.model, crit, value, p.batches, p.metric, base)
        d = res.steps[0].details["lowrank"]
        q = res.metrics["compressed"]["quality"]
        label = f"{crit} {value:g}"
        models[label] = res.model
        rows.append((label, d, res.model, q, secs))
    probes = {"batch 8": first_rows(p.batches[0], 8), "batch 1": first_rows(p.batches[0], 1)}
    lat = timings(models, probes, rounds)
    print(f"\n### minilm (baseline: {base_bytes:,} bytes, {base_params:,} params, cosine {base_q['value']:.4f}, "
          f"batch-8 {lat['original']['batch 8']:.2f} ms, batch-1 {lat['original']['batch 1']:.2f} ms)\n")
    print(f"Median rank fraction for 90% energy over the {len(rows[0][1]['layers'])} Linear layers: "
          f"{spectrum_summary(rows[0][1])}\n")
    print("| setting | layers factorized | bytes | params | size vs original | embedding cosine | top-1 neighbour "
          "| batch-8 ms (x orig) | batch-1 ms (x orig) | step s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, d, model, q, secs in rows:
        b, n = model_nbytes(model), model_params(model)
        l8, l1 = lat[label]["batch 8"], lat[label]["batch 1"]
        print(f"| {label} | {d['factorized']}/{len(d['layers'])} | {b:,} | {n:,} | {b / base_bytes:.3f} | "
              f"{q['value']:.4f} | {q.get('top1_neighbour_agreement', float('nan')):.3f} | "
              f"{l8:.2f} ({lat['original']['batch 8'] / l8:.2f}x) | {l1:.2f} ({lat['original']['batch 1'] / l1:.2f}x) "
              f"| {secs:.1f} |")


def tinygpt(steps: int) -> None:
    p = prepare("tiny-gpt")
    base_bytes = model_nbytes(p.model)
    base = measure(p.model, p.metric, None)
    print(f"\n### tiny-gpt (baseline: {base_bytes:,} bytes, perplexity {base['quality']['value']:.2f})\n")
    print(f"| setting | layers factorized | bytes | size vs original | perplexity | perplexity after {steps} "
          "fine-tune steps | fine-tune s |")
    print("|---|---|---|---|---|---|---|")
    spectra = None
    for crit, value in TINYGPT:
        res, _ = lowrank(p.model, crit, value, p.batches, p.metric, base)
        d = res.steps[0].details["lowrank"]
        spectra = spectra or spectrum_summary(d)
        after, secs = "\u2014", "\u2014"
        if (crit, value) in FINETUNED:   # the metric once, after (compress would also measure before)
            ft, t = lowrank(p.model, crit, value, p.batches, None, base, finetune_steps=steps)
            after, secs = f"{p.metric(ft.model)['value']:.2f}", f"{t:.1f}"
        b = model_nbytes(res.model)
        print(f"| {crit} {value:g} | {d['factorized']}/{len(d['layers'])} | {b:,} | {b / base_bytes:.3f} | "
              f"{res.metrics['compressed']['quality']['value']:.2f} | {after} | {secs} |")
    print(f"\nMedian rank fraction for 90% energy over tiny-gpt's Linear layers: {spectra}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default="minilm,tinygpt")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--latency-rounds", type=int, default=3)
    ap.add_argument("--finetune-steps", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} threads, "
          f"load average {os.getloadavg()[0]:.1f}")
    sections = args.sections.split(",")
    if "minilm" in sections:
        minilm(args.latency_rounds)
    if "tinygpt" in sections:
        tinygpt(args.finetune_steps)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s, load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
