"""Knowledge distillation on the built-in models (issue 7): students built from the teacher.

Run: .venv/bin/python bench/bench_distill.py [--sections digits,minilm] [--seeds 3]
     [--steps 1000] [--lr 0.01] [--minilm-steps 60] [--threads 2] [--quick]
Prints Markdown tables; docs/BENCHMARKS.md records a run.

- digits: digits-mlp and digits-cnn, a {width: 0.25} student (>= 6x fewer parameters: every
  hidden layer narrowed to a quarter, the units with the largest weight norms kept with
  their weights). The same student trained the same steps four ways: distilled (alpha 0.5,
  T 4) or on hard labels alone (alpha 0), each from the teacher's weights (the recipe step,
  shrink.compress) and from a fresh random initialization (shrink.train.distill.distill on a
  re-initialized copy). Accuracy on the held-out split (450 images), mean and spread over
  --seeds seeds (the seed orders the batches and draws the fresh initialization).
- minilm: a 3-layer student keeping layers 0, 2, 4 of the 6 (every other), distilled on
  embeddings (1 - cosine of the mean-pooled embeddings) plus the cosine hidden-state loss
  over the layer map (student layer j <- teacher layer 0, 2, 4), on the job's calibration
  sentences (512 from the standard-library corpus). Embedding fidelity against the teacher
  on 64 held-out sentences (shrink's embedding_metric: mean cosine, top-1 neighbour
  agreement) before and after, and latency of a 32-sentence batch (median of 7 runs,
  teacher and student alternated over 5 rounds).

--quick cuts every training run to a tenth (a smoke test, not figures to record).
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from shrink.eval.latency import measure_latency  # noqa: E402
from shrink.recipe import compress  # noqa: E402
from shrink.recipe.job import prepare  # noqa: E402
from shrink.recipe.train_steps import Distill  # noqa: E402
from shrink.train.distill import distill  # noqa: E402
from shrink.train.engine import TrainOptions  # noqa: E402
from shrink.train.students import build_student, n_params  # noqa: E402

SECTIONS = ("digits", "minilm")
LOADS: list[float] = []


def _fresh(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    m = copy.deepcopy(model)
    torch.manual_seed(1000 + seed)
    for mod in m.modules():
        if hasattr(mod, "reset_parameters") and mod is not m:
            mod.reset_parameters()
    return m


def digits(name: str, width: float, steps: int, seeds: int, lr: float, temperature: float) -> list[str]:
    p = prepare(name)
    teacher, metric = p.model, p.metric
    t_acc = metric(teacher)["value"]
    rows, times = {}, {}
    student0 = build_student(teacher, {"width": width})
    for variant in ("distilled, teacher init", "hard labels, teacher init", "distilled, fresh init",
                    "hard labels, fresh init"):
        alpha = 0.5 if variant.startswith("distilled") else 0.0
        accs = []
        t0 = time.perf_counter()
        for seed in range(seeds):
            if "teacher init" in variant:
                res = compress(teacher, [Distill(student={"width": width}, temperature=temperature, alpha=alpha,
                                                 steps=steps, lr=lr)], train_data=p.train, evaluate=metric,
                               measure_speed=False, seed=seed)
                accs.append(res.metrics["compressed"]["quality"]["value"])
            else:
                s = _fresh(student0.model, seed)
                distill(s, teacher, p.train, TrainOptions(steps=steps, lr=lr, seed=seed), temperature=temperature,
                        alpha=alpha)
                accs.append(metric(s)["value"])
            LOADS.append(os.getloadavg()[0])
        rows[variant] = accs
        times[variant] = (time.perf_counter() - t0) / seeds
    ps, pt = n_params(student0.model), n_params(teacher)
    out = [f"\n**{name}**: teacher {pt:,} parameters, accuracy {100 * t_acc:.2f}%; student {{width: {width:g}}} "
           f"{ps:,} parameters ({pt / ps:.1f}x fewer); {steps} steps (batch 64, lr {lr:g}, T {temperature:g}), "
           f"{seeds} seeds\n",
           "| student training | accuracy (mean) | min .. max | vs teacher | s per run |", "|---|---|---|---|---|"]
    for v, accs in rows.items():
        m = statistics.mean(accs)
        out.append(f"| {v} | {100 * m:.2f}% | {100 * min(accs):.2f} .. {100 * max(accs):.2f} | "
                   f"{100 * (m - t_acc):+.2f} pt | {times[v]:.1f} |")
    return out


def minilm(steps: int, lr: float, rounds: int) -> list[str]:
    p = prepare("minilm")
    teacher, metric = p.model, p.metric
    layers = [0, 2, 4]
    s = build_student(teacher, {"layers": layers})
    before = metric(s.model)
    t0 = time.perf_counter()
    res = compress(teacher, [Distill(student={"layers": layers}, hidden_loss="cosine", steps=steps, lr=lr)],
                   calibration=p.batches, evaluate=metric, measure_speed=False)
    secs = time.perf_counter() - t0
    LOADS.append(os.getloadavg()[0])
    after = res.metrics["compressed"]["quality"]
    det = res.steps[0].details
    batch = {k: v[:32] for k, v in p.batches[len(p.batches) // 2].items()}
    lat = {"teacher": [], "student": []}
    for _ in range(rounds):
        for k, m in (("teacher", teacher), ("student", res.model)):
            lat[k].append(measure_latency(m, batch, warmup=2, runs=7)["median_ms"])
    lt, ls = statistics.median(lat["teacher"]), statistics.median(lat["student"])
    pt, ps = det["student"]["teacher_params"], det["student"]["params"]
    tr = det["training"]
    return [f"\n**minilm**: 3-layer student (layers {layers}), {steps} steps, lr {lr:g}, "
            f"{len(p.batches)} batches of calibration sentences; distillation took {secs:.0f} s "
            f"(loss {tr['loss_first']:.3f} -> {tr['loss_last']:.3f}); latency: batch of "
            f"{batch['input_ids'].shape[0]} x {batch['input_ids'].shape[1]} tokens\n",
            "| model | parameters | embedding cosine | top-1 neighbour agreement | latency ms |",
            "|---|---|---|---|---|",
            f"| teacher (6 layers) | {pt:,} | 1.0000 | 1.000 | {lt:.1f} |",
            f"| student, layers kept, before distillation | {ps:,} | {before['value']:.4f} | "
            f"{before['top1_neighbour_agreement']:.3f} | {ls:.1f} |",
            f"| student, distilled | {ps:,} | {after['value']:.4f} | {after['top1_neighbour_agreement']:.3f} | "
            f"{ls:.1f} |",
            f"\nstudent latency {lt / ls:.2f}x faster than the teacher; fidelity over training: " +
            ", ".join(f"{e['step']}: {e['value']:.3f}" for e in tr["evaluations"])]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--temperature", type=float, default=4.0)
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--minilm-steps", type=int, default=60)
    ap.add_argument("--minilm-lr", type=float, default=1e-3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    q = 10 if args.quick else 1
    t0 = time.perf_counter()
    lines = [f"torch {torch.__version__}, {platform.machine()}, {args.threads} threads"]
    for section in args.sections.split(","):
        if section == "digits":
            for name in ("digits-mlp", "digits-cnn"):
                lines += digits(name, args.width, max(1, args.steps // q), args.seeds, args.lr, args.temperature)
        elif section == "minilm":
            lines += minilm(max(1, args.minilm_steps // q), args.minilm_lr, args.rounds)
        else:
            raise SystemExit(f"unknown section {section!r}; sections: {', '.join(SECTIONS)}")
    lines.append(f"\ntotal {time.perf_counter() - t0:.0f} s; load average during the runs "
                 f"{min(LOADS, default=0):.1f} .. {max(LOADS, default=0):.1f}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
