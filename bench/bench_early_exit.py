"""Early exit on the built-in classifiers (issue 7, seed 004's trade-off curve).

Run: .venv/bin/python bench/bench_early_exit.py [--models digits-mlp,digits-cnn] [--epochs 10]
     [--latency-rows 64] [--repeats 30] [--threads 1]
Prints Markdown tables; docs/BENCHMARKS.md records a run.

For each model and each exit placement (every layer but the last: the default; and one
exit after the first layer): exit heads attached to the trained built-in model, trained
--epochs passes over the labeled training split (1,347 images, batches of 64; the base
frozen, lr 1e-2, shrink's engine), then per confidence threshold on the held-out split
(450 images): accuracy, where the samples left, mean layers run, the compute fraction
(multiply-accumulates per sample, exit heads included, over the base model's) and the
batch-1 latency (mean ms per image over the first --latency-rows test images run one at a
time, median of --repeats passes), timed pass by pass alternately with the base model on
the same images, as CPU time of the timing thread (time.thread_time, one torch thread: the
shared machine's other processes do not count); "latency vs base" is the median of the
per-pass ratios.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time

import torch

from shrink.recipe.job import prepare
from shrink.train.early_exit import attach_exits, exit_accuracies, tradeoff, train_exits
from shrink.train.engine import TrainOptions

THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


@torch.inference_mode()
def paired(base, ee, x, repeats: int) -> tuple[float, float, float]:
    """(base ms/image, early-exit ms/image, median ratio): the two timed alternately, pass by
    pass over the same rows, in CPU time of this thread (time.thread_time; torch runs one
    intra-op thread here): on a shared, loaded machine wall time mostly measures the other
    processes."""
    rows = [x[i:i + 1] for i in range(x.shape[0])]
    for r in rows[:4]:
        base(r)
        ee(r)
    tb, te = [], []
    for _ in range(repeats):
        for m, out in ((base, tb), (ee, te)):
            t0 = time.thread_time()
            for r in rows:
                m(r)
            out.append((time.thread_time() - t0) * 1e3 / len(rows))
    return statistics.median(tb), statistics.median(te), statistics.median(e / b for b, e in zip(tb, te))


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
        rows = tradeoff(ee, x, y, THRESHOLDS, latency_rows=0)
        for r in rows:
            ee.threshold = r["threshold"]
            r["base_ms"], r["latency_ms"], r["ratio"] = paired(base, ee, x[:args.latency_rows], args.repeats)
        lat_base = statistics.median(r["base_ms"] for r in rows)
        print(f"\n### {name}: {label}, exits after layers {list(ee.exits)} of {n_layers}\n")
        print(f"Heads trained {tr.steps} steps in {secs:.1f} s (loss {tr.losses[0]:.3f} -> "
              f"{sum(tr.losses[-10:]) / len(tr.losses[-10:]):.3f}); each exit alone: "
              + ", ".join(f"exit {e} {_pct(a)}%" for e, a in zip(ee.exits, accs))
              + f", final head {_pct(accs[-1])}%.")
        print(f"Base model: accuracy {_pct(base_acc)}%, batch-1 {lat_base:.3f} ms/image (CPU time, median over the "
              "tables' paired runs).\n")
        print("| threshold | accuracy % | leaving at each exit, final last (%) | mean layers | compute % "
              "| batch-1 ms | latency vs base |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['threshold']:g} | {_pct(r['accuracy'])} | {' / '.join(_pct(f) for f in r['fractions'])} "
                  f"| {r['mean_layers']:.2f} | {_pct(r['compute_fraction'])} | {r['latency_ms']:.3f} "
                  f"| {r['ratio']:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="digits-mlp,digits-cnn")
    ap.add_argument("--epochs", type=float, default=10)
    ap.add_argument("--latency-rows", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=30)
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
