"""Early exit on the built-in classifiers (issue 7, seed 004's trade-off curve).

Run: .venv/bin/python bench/bench_early_exit.py [--models digits-mlp,digits-cnn] [--epochs 10]
     [--latency-rows 128] [--repeats 5] [--threads 1]
Prints Markdown tables; docs/BENCHMARKS.md records a run.

For each model and each exit placement (every layer but the last: the default; and one
exit after the first layer): exit heads attached to the trained built-in model, trained
--epochs passes over the labeled training split (1,347 images, batches of 64; the base
frozen, lr 1e-2, shrink's engine), then per confidence threshold on the held-out split
(450 images): accuracy, where the samples left, mean layers run, the compute fraction
(multiply-accumulates per sample, exit heads included, over the base model's) and the
batch-1 latency (mean ms per image over the first --latency-rows test images run one at a
time, median of --repeats passes). The base model's accuracy and batch-1 latency, measured
the same way before and after each table, are the reference.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import time

import torch

from shrink.recipe.job import prepare
from shrink.train.early_exit import attach_exits, batch1_latency_ms, exit_accuracies, tradeoff, train_exits
from shrink.train.engine import TrainOptions

THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


def _pct(v: float) -> str:
    return f"{100 * v:.1f}"


def run_model(name: str, args) -> None:
    from shrink.models.digits import digits_data

    p = prepare(name)
    d = digits_data()
    base = p.model.eval()
    x, y = d.x_test, d.y_test
    with torch.no_grad():
        base_acc = float((base(x).argmax(-1) == y).double().mean())
    n_layers = None
    for label, exits in (("default exits (every layer but the last)", None), ("one exit, after layer 0", [0])):
        ee = attach_exits(copy.deepcopy(base), exits, seed=0)
        n_layers = ee.n_layers
        t0 = time.perf_counter()
        tr = train_exits(ee, p.train, TrainOptions(epochs=args.epochs, lr=1e-2, seed=0))
        secs = time.perf_counter() - t0
        accs = exit_accuracies(ee, x, y)
        lat0 = batch1_latency_ms(base, x[:args.latency_rows], repeats=args.repeats)
        rows = tradeoff(ee, x, y, THRESHOLDS, latency_rows=args.latency_rows, repeats=args.repeats)
        lat1 = batch1_latency_ms(base, x[:args.latency_rows], repeats=args.repeats)
        lat_base = (lat0 + lat1) / 2
        print(f"\n### {name}: {label}, exits after layers {list(ee.exits)} of {n_layers}\n")
        print(f"Heads trained {tr.steps} steps in {secs:.1f} s (loss {tr.losses[0]:.3f} -> "
              f"{sum(tr.losses[-10:]) / len(tr.losses[-10:]):.3f}); each exit alone: "
              + ", ".join(f"exit {e} {_pct(a)}%" for e, a in zip(ee.exits, accs))
              + f", final head {_pct(accs[-1])}%.")
        print(f"Base model: accuracy {_pct(base_acc)}%, batch-1 {lat_base:.3f} ms/image "
              f"(before {lat0:.3f}, after {lat1:.3f}).\n")
        print("| threshold | accuracy % | leaving at each exit, final last (%) | mean layers | compute % "
              "| batch-1 ms | latency vs base |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['threshold']:g} | {_pct(r['accuracy'])} | {' / '.join(_pct(f) for f in r['fractions'])} "
                  f"| {r['mean_layers']:.2f} | {_pct(r['compute_fraction'])} | {r['latency_ms']:.3f} "
                  f"| {r['latency_ms'] / lat_base:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="digits-mlp,digits-cnn")
    ap.add_argument("--epochs", type=float, default=10)
    ap.add_argument("--latency-rows", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    print(f"python {platform.python_version()}, torch {torch.__version__}, {args.threads} thread(s), "
          f"load average {os.getloadavg()[0]:.1f} at start")
    for name in args.models.split(","):
        run_model(name.strip(), args)
    print(f"\nTotal {time.perf_counter() - t0:.0f} s; load average {os.getloadavg()[0]:.1f} at the end.")


if __name__ == "__main__":
    main()
