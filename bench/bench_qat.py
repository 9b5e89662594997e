"""Quantization-aware training on the digits classifiers (issue 7): does QAT recover the
accuracy that post-training quantization lost?

Run: .venv/bin/python bench/bench_qat.py [--models digits-mlp,digits-cnn] [--steps 200]
     [--formats int4-g128,int2-channel] [--lr 1e-3] [--threads 2] [--quick] [--losses]
Prints Markdown tables; docs/BENCHMARKS.md records a run.

For each model and weight format (int4-g128 asymmetric: the recipe default, where PTQ is
nearly lossless on these models; int2 per channel symmetric, i.e. ternary weights, where
PTQ loses; int2-g128 asymmetric with --formats) it measures held-out accuracy (450 test images:
one image is 0.22 points) of
  - the float model,
  - PTQ: rtn and gptq (calibration: the job's 256 training images),
  - qat: fake-quantized weights, min/max ranges frozen after 10% of the steps,
  - qat+lsq: the same with learned step sizes,
  - gptq+qat: QAT starting from the GPTQ result (its codes and scales),
and, at int4 only, qat with int4 activations (act_bits 4): accuracy with the activations
fake-quantized (the training forward) and as converted (weight-only QuantLinear, float
activations). Every QAT run: the recipe step's loss auto (0.5 CE + 0.5 distillation from
the float model), --steps AdamW steps of 64 labeled training images at --lr, seed 0.
Everything runs through shrink.recipe.compress on the data and metric of
shrink.recipe.job.prepare. --quick: 20 steps (a smoke test, not figures to record).
--losses: instead, plain QAT at each format with each loss (ce: labels only; distill: the
float model only; ce+distill: what loss auto picks for labeled data).
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

from shrink.recipe import compress
from shrink.recipe.job import prepare

FORMATS = {
    "int4-g128": {"bits": 4, "group_size": 128, "symmetric": False},
    "int2-channel": {"bits": 2, "group_size": None, "symmetric": True},
    "int2-g128": {"bits": 2, "group_size": 128, "symmetric": False},
}


def _acc(res) -> float:
    return 100.0 * res.metrics["compressed"]["quality"]["value"]


def _train_seconds(res) -> float:
    return res.steps[-1].details["training"]["seconds"]


def run_model(name: str, steps: int, lr: float, formats: list[str]) -> list[dict]:
    prep = prepare(name)
    rows = []
    for fmt in formats:
        q = FORMATS[fmt]
        def run(recipe):
            return compress(prep.model, recipe, calibration=prep.batches, evaluate=prep.metric,
                            train_data=prep.train, measure_speed=False)

        qat = {**q, "steps": steps, "lr": lr}
        rtn = run([{"rtn": q}])
        base = 100.0 * rtn.metrics["baseline"]["quality"]["value"]
        gptq = run([{"gptq": q}])
        plain = run([{"qat": qat}])
        lsq = run([{"qat": {**qat, "lsq": True}}])
        from_gptq = run([{"gptq": q}, {"qat": qat}])
        row = {"model": name, "format": fmt, "float": base, "rtn": _acc(rtn), "gptq": _acc(gptq),
               "qat": _acc(plain), "qat+lsq": _acc(lsq), "gptq+qat": _acc(from_gptq),
               "s_qat": _train_seconds(plain), "s_lsq": _train_seconds(lsq), "s_gptq_qat": _train_seconds(from_gptq)}
        if fmt == "int4-g128":
            act = run([{"qat": {**qat, "act_bits": 4}}])
            d = act.steps[0].details
            row["a4_fake"] = 100.0 * d["quality_fake_quant_activations"]["value"]
            row["a4_converted"] = _acc(act)
        rows.append(row)
    return rows


def compare_losses(name: str, steps: int, lr: float, formats: list[str]) -> list[dict]:
    prep = prepare(name)
    rows = []
    for fmt in formats:
        row = {"model": name, "format": fmt}
        for loss in ("ce", "distill", "ce+distill"):
            res = compress(prep.model, [{"qat": {**FORMATS[fmt], "steps": steps, "lr": lr, "loss": loss}}],
                           calibration=prep.batches, evaluate=prep.metric, train_data=prep.train, measure_speed=False)
            row[loss] = _acc(res)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="digits-mlp,digits-cnn")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--formats", default="int4-g128,int2-channel", help=", ".join(FORMATS))
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--losses", action="store_true", help="compare the QAT losses instead")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    steps = 20 if args.quick else args.steps
    formats = [f.strip() for f in args.formats.split(",")]
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        ap.error(f"unknown formats {bad}; choose from {', '.join(FORMATS)}")
    t0 = time.perf_counter()
    if args.losses:
        rows = [r for name in args.models.split(",") for r in compare_losses(name.strip(), steps, args.lr, formats)]
        print(f"QAT {steps} steps at lr {args.lr:g}, by loss; accuracy in % on 450 held-out digits\n")
        print("| model | weights | ce | distill | ce+distill |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['model']} | {r['format']} | {r['ce']:.2f} | {r['distill']:.2f} | {r['ce+distill']:.2f} |")
        print(f"\ntotal {time.perf_counter() - t0:.0f} s")
        return
    rows = []
    for name in args.models.split(","):
        rows += run_model(name.strip(), steps, args.lr, formats)
    print(f"torch {torch.__version__}, {platform.machine()}, {args.threads} threads; QAT {steps} steps at lr "
          f"{args.lr:g}; accuracy in % on 450 held-out digits\n")
    print("| model | weights | float | rtn | gptq | qat | qat+lsq | gptq+qat | train s (qat / lsq / gptq+qat) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['format']} | {r['float']:.2f} | {r['rtn']:.2f} | {r['gptq']:.2f} | "
              f"{r['qat']:.2f} | {r['qat+lsq']:.2f} | {r['gptq+qat']:.2f} | "
              f"{r['s_qat']:.1f} / {r['s_lsq']:.1f} / {r['s_gptq_qat']:.1f} |")
    print("\nint4-g128 weights with int4 activations (act_bits 4, per tensor, EMA min/max frozen after 10%):\n")
    print("| model | fake-quantized activations (training forward) | converted (weight-only, float activations) |")
    print("|---|---|---|")
    for r in rows:
        if "a4_fake" in r:
            print(f"| {r['model']} | {r['a4_fake']:.2f} | {r['a4_converted']:.2f} |")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
