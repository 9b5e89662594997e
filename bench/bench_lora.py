"""LoRA and QLoRA (issue 7) on the built-in tiny-gpt: does a fine-tune of the adapters on a
slice of text of a kind the model never trained on lower its perplexity on more of it?

Run: .venv/bin/python bench/bench_lora.py [--domain tests|heldout] [--steps 60] [--lr 2e-3]
     [--rank 8] [--seq 128] [--batch 8] [--samples 256] [--eval-tokens 8192]
     [--formats nf4,int4] [--full] [--full-lr 5e-4] [--threads N]
Prints a Markdown table; docs/BENCHMARKS.md records a run.

Data (train and eval slices are disjoint documents):
- tests (default): the standard library's own test suite (Lib/test/test_*.py), which
  tiny-gpt's corpus excludes: a domain it has not seen (unittest code). 60 files in a
  fixed hash order, dealt alternately into the train and the eval slice.
- heldout: the standard library's held-out modules (shrink.data.corpus; tiny-gpt never
  trained on them), sorted by name and dealt alternately.
Training windows: --samples windows of --seq tokens drawn from the train slice
(shrink.data.calibration), batches of --batch. Perplexity: windows of 256 tokens over the
first --eval-tokens tokens of the eval slice (shrink.eval.quality).

Rows, each through shrink.recipe.compress with the lora step (next-token loss: the task's
own), the same steps, lr and seed:
- base:         tiny-gpt as it is;
- lora:         rank r, alpha 2r, on every Linear but the head, merged after training;
- qlora FMT:    the same adapters on a 4-bit base (nf4: NF4 per group of 64; int4:
                asymmetric per group of 128), kept apart; perplexity of the 4-bit base
                before training (what quantizing cost), after training unmerged, and
                merged into float layers;
- full:         (--full) every weight trained with the same loss and steps at --full-lr.
Columns: trainable parameters (share of the model's), eval perplexity, the merged/unmerged
max abs logit difference on a calibration batch, seconds per optimizer step, stored bytes.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import shrink  # noqa: E402
from shrink.data.calibration import calibration_batches  # noqa: E402
from shrink.data.corpus import stable_unit, stdlib_corpus, stdlib_root  # noqa: E402
from shrink.eval.quality import perplexity_metric  # noqa: E402
from shrink.models.io import load_tokenizer  # noqa: E402
from shrink.modules import LoRALinear  # noqa: E402
from shrink.recipe import compress  # noqa: E402
from shrink.recipe.measure import measure  # noqa: E402
from shrink.recipe.records import model_nbytes  # noqa: E402
from shrink.train.lora import fold_lora, merge_lora  # noqa: E402


def _slices(domain: str) -> tuple[list[str], list[str], str]:
    if domain == "heldout":
        docs = sorted(stdlib_corpus().heldout, key=lambda d: d.module)
        texts = [d.text for d in docs]
        what = "held-out standard-library modules"
    else:
        files = sorted((stdlib_root() / "test").glob("test_*.py"), key=lambda p: stable_unit("lora:" + p.name))[:60]
        texts = [p.read_bytes().decode("utf-8", errors="ignore") for p in files]
        what = "standard-library test files (Lib/test, outside tiny-gpt's corpus)"
    return texts[0::2], texts[1::2], what


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--domain", choices=("tests", "heldout"), default="tests")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--formats", default="nf4")
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--full-lr", type=float, default=5e-4)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    model = shrink.load("tiny-gpt")
    tok = load_tokenizer("tiny-gpt")
    train_texts, eval_texts, what = _slices(args.domain)
    windows = calibration_batches(train_texts, tok, n_samples=args.samples, seq_len=args.seq)
    batches = list(windows.split(args.batch))
    metric = perplexity_metric(tok, eval_texts, seq_len=256, max_tokens=args.eval_tokens)
    baseline = measure(model, metric, None)
    base_ppl = baseline["quality"]["value"]
    print(f"tiny-gpt ({sum(p.numel() for p in model.parameters()):,} parameters) on {what}: train slice "
          f"{len(train_texts)} files ({sum(map(len, train_texts)):,} chars), eval slice {len(eval_texts)} files "
          f"({sum(map(len, eval_texts)):,} chars, first {baseline['quality']['tokens']:,} tokens scored); "
          f"{len(batches)} batches of {args.batch}x{args.seq} tokens; {args.steps} steps, lr {args.lr:g}, "
          f"rank {args.rank}, alpha {2 * args.rank}; torch threads {torch.get_num_threads()}; "
          f"{platform.processor() or platform.machine()}")
    lora = {"rank": args.rank, "alpha": float(2 * args.rank), "steps": args.steps, "lr": args.lr}
    rows = [{"name": "base (no training)", "ppl": base_ppl, "bytes": model_nbytes(model)}]

    def run(step: dict):
        return compress(model, [step], calibration=batches, evaluate=metric, measure_speed=False,
                        baseline=baseline)

    res = run({"lora": {**lora, "merge": True}})
    d = res.steps[0].details
    rows.append({"name": f"lora r{args.rank}, trained, merged", "share": _share(d),
                 "ppl": res.metrics["compressed"]["quality"]["value"],
                 "diff": f"{d['merged_vs_unmerged_max_abs_diff']:.1e} (plain layers: "
                         f"{d['folded_vs_unmerged_max_abs_diff']:.1e})",
                 "step_s": _per_step(d), "bytes": model_nbytes(res.model)})

    for fmt in [f for f in args.formats.split(",") if f]:
        res = run({"lora": {**lora, "base_bits": 4, "base_format": fmt, "merge": False}})
        d = res.steps[0].details
        adapters = sum(m.adapter_nbytes for m in res.model.modules() if isinstance(m, LoRALinear))
        rows.append({"name": f"qlora {d['base_format']}: 4-bit base, before training",
                     "ppl": d["quality_quantized_base"]["value"], "bytes": model_nbytes(res.model) - adapters})
        rows.append({"name": f"qlora {d['base_format']}: trained, adapters kept apart", "share": _share(d),
                     "ppl": res.metrics["compressed"]["quality"]["value"],
                     "diff": f"{d['merged_vs_unmerged_max_abs_diff']:.1e} (base kernel "
                             f"{', '.join(d.get('base_kernels', []))})",
                     "step_s": _per_step(d), "bytes": model_nbytes(res.model)})
        merge_lora(res.model)
        merged_ppl = _ppl(metric, res.model)
        fold_lora(res.model)
        rows.append({"name": f"qlora {d['base_format']}: trained, merged into float layers", "share": _share(d),
                     "ppl": merged_ppl, "bytes": model_nbytes(res.model)})

    if args.full:
        res = run({"finetune": {"steps": args.steps, "lr": args.full_lr, "loss": "lm"}})
        tr = res.steps[0].details["training"]
        n = sum(p.numel() for p in model.parameters())
        rows.append({"name": f"full fine-tune (every weight, lr {args.full_lr:g})", "share": f"{n:,} (100%)",
                     "ppl": res.metrics["compressed"]["quality"]["value"],
                     "step_s": tr["seconds"] / max(1, tr["steps_run"]), "bytes": model_nbytes(res.model)})

    print()
    print("| model | trainable params | eval perplexity | vs base | merged vs unmerged max abs diff | "
          "s / step | stored bytes |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        step_s = r.get("step_s")
        print(f"| {r['name']} | {r.get('share', '-')} | {r['ppl']:.2f} | {100 * (r['ppl'] / base_ppl - 1):+.1f}% | "
              f"{r.get('diff', '-')} | {'-' if step_s is None else f'{step_s:.2f}'} | {r['bytes']:,} |")
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")


def _ppl(metric, model) -> float:
    return float(metric(model)["value"])


def _share(d: dict) -> str:
    return f"{d['trainable_params']:,} ({d['trainable_percent']:.2f}%)"


def _per_step(d: dict) -> float:
    tr = d["training"]
    return tr["seconds"] / max(1, tr["steps_run"])


if __name__ == "__main__":
    main()
