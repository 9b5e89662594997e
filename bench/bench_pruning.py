"""Pruning on the built-in models (issue 6): quality against sparsity, structured pruning
with fine-tuning, the lottery ticket against its control, attention heads and layers.

Run: .venv/bin/python bench/bench_pruning.py [--sections quality,structured,lottery,heads]
     [--quick] [--threads 1] [--latency-rounds 5]
Prints Markdown tables; docs/BENCHMARKS.md records a run.

Sections:
- quality:    one-shot magnitude / Wanda / SparseGPT (no fine-tune) at sparsity 0.3, 0.5,
              0.7, 0.9 and the 2:4 pattern, on digits-mlp, digits-cnn (held-out accuracy)
              and tiny-gpt (held-out perplexity).
- structured: digits-mlp neurons and digits-cnn channels at 0.5 and 0.75, before and after a
              300-step distillation fine-tune: accuracy, parameters, latency.
- lottery:    the lottery ticket on digits-mlp (targets 0.8 and 0.9, rewind to init and to
              iteration 20) against its control (same mask, random re-init, same training),
              and iterative magnitude pruning against one-shot + fine-tune of equal budget.
- heads:      minilm with 25% of its heads removed, with and without fine-tuning; tiny-gpt
              heads 0.25 and layers 0.25, without fine-tuning and with 200 steps of next-token
              loss on the default 64 calibration windows, of distillation on the same
              windows, and of next-token loss on 256 windows; whether each config reloads
              (shrink's own directory; transformers' save_pretrained / from_pretrained; and
              the safetensors export, shrink.export.hf.write_hf_dir, loaded by transformers'
              Auto class with trust_remote_code=True, which is also timed).

Everything runs through shrink.recipe.compress on the models and metrics of
shrink.recipe.job.prepare. Latency: shrink.eval.latency.latency_metric on compress's own
probe (the first calibration example, and the first 8), the models timed round-robin for
--latency-rounds rounds, median of the per-round medians, at --threads threads.
--quick cuts every training run to a tenth (a smoke test, not figures to record).
"""
from __future__ import annotations

import argparse
import atexit
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# transformers copies remote code (the export's shrink_resized.py) here: a temporary dir, not ~/.cache
_MODULES = tempfile.mkdtemp(prefix="bench-pruning-hf-modules-")
os.environ.setdefault("HF_MODULES_CACHE", _MODULES)
atexit.register(shutil.rmtree, _MODULES, True)

import torch  # noqa: E402

from shrink.eval.latency import latency_probe, measure_latency  # noqa: E402
from shrink.recipe import compress  # noqa: E402
from shrink.recipe.job import prepare  # noqa: E402
from shrink.recipe.measure import measure  # noqa: E402

SECTIONS = ("quality", "structured", "lottery", "heads")
METHODS = ("magnitude", "wanda", "sparsegpt")
LEVELS = (0.3, 0.5, 0.7, 0.9)
LOADS: list[float] = []


def run(model, recipe, batches, metric, *, base=None, speed=False, seed=0):
    torch.manual_seed(seed)
    t = time.perf_counter()
    # a baseline measured without latency would leave compress's own L empty: measure it afresh then
    res = compress(model, recipe, calibration=batches, evaluate=metric, measure_speed=speed,
                   baseline=None if speed else base)
    LOADS.append(os.getloadavg()[0])
    return res, time.perf_counter() - t


def quality(res, which="compressed") -> float:
    return res.metrics[which]["quality"]["value"]


def fmt_q(v: float, metric_name: str) -> str:
    if metric_name == "accuracy":
        return f"{100 * v:.1f}%"
    return f"{v:.2f}" if metric_name == "perplexity" else f"{v:.4f}"


def timings(models: dict, probes: dict, rounds: int) -> dict:
    """{model: {probe: median over rounds of measure_latency's median ms}}, round-robin."""
    acc = {m: {p: [] for p in probes} for m in models}
    for _ in range(rounds):
        for mname, model in models.items():
            for pname, batch in probes.items():
                acc[mname][pname].append(measure_latency(model, batch, warmup=2, runs=7)["median_ms"])
        LOADS.append(os.getloadavg()[0])
    return {m: {p: statistics.median(v) for p, v in d.items()} for m, d in acc.items()}


def ms(v: float) -> str:
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 10 else f"{v:.1f}"


def steps_of(n: int, quick: bool) -> int:
    return max(10, n // 10) if quick else n


# ---------------------------------------------------------------- 1. quality against sparsity

def sec_quality(args) -> None:
    print("\n## 1. One-shot quality against sparsity (no fine-tune)\n")
    for name in ("digits-mlp", "digits-cnn", "tiny-gpt"):
        model, batches, metric, _, _ = prepare(name)
        base = measure(model, metric, None)
        qname = base["quality"]["name"]
        cols = [*LEVELS, "2:4"]
        cells: dict[str, list[str]] = {}
        ratios: dict[str, list[str]] = {}
        params, skipped, secs = {}, set(), {m: 0.0 for m in METHODS}
        for method in METHODS:
            row, rrow = [], []
            for level in cols:
                step = {"method": method, **({"pattern": level} if level == "2:4" else {"sparsity": level})}
                res, s = run(model, [{"prune": step}], batches, metric, base=base)
                secs[method] += s
                row.append(fmt_q(quality(res), qname))
                # wanda / sparsegpt record magnitude's layer error on the same inputs as error_rtn
                layers = [l for l in res.steps[0].layers if l.error_rtn]
                rrow.append(f"{statistics.mean(l.error / l.error_rtn for l in layers):.2f} ({len(layers)})"
                            if layers else "-")
                params[level] = res.metrics["compressed"]["params"]
                skipped.update(f"{k['name']} ({k['reason']})" for k in res.steps[0].skipped
                               if "embedding" not in k["reason"] and "output head" not in k["reason"])
            cells[method] = row
            ratios[method] = rrow
        print(f"### {name}: {qname} of the float model {fmt_q(base['quality']['value'], qname)}\n")
        print("| method | " + " | ".join(f"{c:.0%}" if isinstance(c, float) else c for c in cols) + " | seconds (all 5) |")
        print("| --- " * (len(cols) + 2) + "|")
        for method in METHODS:
            print(f"| {method} | " + " | ".join(cells[method]) + f" | {secs[method]:.2f} |")
        print(f"| params kept (of {base['params']:,}) | " + " | ".join(f"{params[c]:,}" for c in cols) + " | |")
        if skipped:
            print("\nleft dense: " + "; ".join(sorted(skipped)))
        print(f"\nLayer output error relative to magnitude pruning of the same layer on the same inputs, "
              f"mean over the layers that record it (how many):\n")
        print("| method | " + " | ".join(f"{c:.0%}" if isinstance(c, float) else c for c in cols) + " |")
        print("| --- " * (len(cols) + 1) + "|")
        for method in METHODS[1:]:
            print(f"| {method} | " + " | ".join(ratios[method]) + " |")
        print(flush=True)


# ---------------------------------------------------------------- 2. structured + fine-tune

def sec_structured(args) -> None:
    steps = steps_of(300, args.quick)
    print(f"\n## 2. Structured pruning, then fine-tune ({steps} steps, lr 3e-3, distillation from the original)\n")
    rows = []
    lat_rows = []
    for name, method in (("digits-mlp", "neurons"), ("digits-cnn", "channels")):
        model, batches, metric, _, _ = prepare(name)
        base = measure(model, metric, None)
        from shrink.models.digits import digits_data

        big = digits_data().x_train[:256]
        probe = latency_probe(batches[0])
        probes = {"1": probe["batch1"], "8": probe["batched"], "256": big}
        tuned = {}
        for s in (0.5, 0.75):
            prune = {"prune": {"method": method, "sparsity": s}}
            r0, _ = run(model, [prune], batches, metric, base=base)
            r1, secs = run(model, [prune, {"finetune": {"steps": steps, "lr": 3e-3}}], batches, metric, speed=True)
            d = r0.steps[0].details
            tuned[s] = r1.model
            widths = ", ".join(f"{g['width']}->{g['kept']}" for g in d["removed"])
            rows.append(f"| {name} | {method} {s:.0%} ({widths}) | {d['params_before']:,} -> {d['params_after']:,} | "
                        f"{fmt_q(base['quality']['value'], 'accuracy')} | {fmt_q(quality(r0), 'accuracy')} | "
                        f"{fmt_q(quality(r1), 'accuracy')} | {r1.metrics['ratios']['L']:.2f}x | {secs:.1f} |")
        t = timings({"original": model, **{f"{s:.0%}": m for s, m in tuned.items()}}, probes, args.latency_rounds)
        for key in t:
            if key == "original":
                continue
            lat_rows.append(f"| {name} {method} {key} | " + " | ".join(
                f"{ms(t['original'][p])} | {ms(t[key][p])} | {t['original'][p] / t[key][p]:.2f}x" for p in probes)
                + " |")
    print("| model | removed (width before->after) | params | accuracy original | after pruning | "
          "after fine-tune | L (compress's own, batch 1) | seconds (prune + fine-tune) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    print(f"\nLatency, ms (round-robin, median of {args.latency_rounds} rounds x median of 7 calls; "
          "speed-up = original / pruned):\n")
    print("| pruned model | batch 1 original | pruned | speed-up | batch 8 original | pruned | speed-up | "
          "batch 256 original | pruned | speed-up |")
    print("| --- " * 10 + "|")
    print("\n".join(lat_rows), flush=True)


# ---------------------------------------------------------------- 3. lottery ticket, iterative

def sec_lottery(args) -> None:
    steps = steps_of(300, args.quick)
    model, batches, metric, _, _ = prepare("digits-mlp")
    base = measure(model, metric, None)
    print(f"\n## 3. Lottery ticket on digits-mlp (per_round 0.2, {steps} steps a round, lr 3e-3, control: true)\n")
    print(f"accuracy of the original (the distillation teacher): {fmt_q(base['quality']['value'], 'accuracy')}; "
          f"training data: the {sum(b.shape[0] for b in batches)} calibration images\n")
    print("| target | rewind | rounds | sparsity reached | training steps (ticket) | + control | "
          "dense net after round 0 | ticket | control | ticket - control | seconds |")
    print("| --- " * 11 + "|")
    rewind_at = 20 if not args.quick else 2
    for target in (0.8, 0.9):
        for rewind in ("init", rewind_at):
            step = {"lottery_ticket": {"target": target, "per_round": 0.2, "rewind": rewind, "steps": steps,
                                       "lr": 3e-3, "control": True}}
            res, secs = run(model, [step], batches, metric, base=base)
            d = res.steps[0].details
            ticket, control = quality(res), d["control"]["quality"]["value"]
            k = 0 if rewind == "init" else rewind
            print(f"| {target:.0%} | {rewind} | {len(d['rounds']) - 1} | {d['rounds'][-1]['sparsity']:.1%} | "
                  f"{d['training_steps']:,} | {steps - k} | {fmt_q(d['rounds'][0]['quality']['value'], 'accuracy')} | "
                  f"{fmt_q(ticket, 'accuracy')} | {fmt_q(control, 'accuracy')} | {100 * (ticket - control):+.1f} pt | "
                  f"{secs:.1f} |", flush=True)

    ft = steps_of(100, args.quick)
    print(f"\n### Iterative magnitude pruning against one-shot + fine-tune, equal training ({4 * ft} steps, lr 3e-3)\n")
    print("| recipe | sparsity | accuracy after each round | final accuracy | seconds |")
    print("| --- | --- | --- | --- | --- |")
    res, secs = run(model, [{"iterative_prune": {"method": "magnitude", "target": 0.9, "rounds": 4,
                                                 "finetune": {"steps": ft, "lr": 3e-3}}}], batches, metric, base=base)
    rounds = res.steps[0].details["rounds"]
    per = ", ".join(f"{r['sparsity']:.0%}: {fmt_q(r['quality']['value'], 'accuracy')}" for r in rounds)
    print(f"| iterative_prune magnitude (global), 4 rounds x {ft} steps | {rounds[-1]['sparsity']:.0%} | {per} | "
          f"{fmt_q(quality(res), 'accuracy')} | {secs:.1f} |")
    for scope in ("global", "layer"):
        prune = {"prune": {"method": "magnitude", "sparsity": 0.9, "scope": scope}}
        r0, _ = run(model, [prune], batches, metric, base=base)
        r1, secs = run(model, [prune, {"finetune": {"steps": 4 * ft, "lr": 3e-3}}], batches, metric, base=base)
        print(f"| one-shot magnitude 0.9 ({scope}) + finetune {4 * ft} steps | 90% | before fine-tune: "
              f"{fmt_q(quality(r0), 'accuracy')} | {fmt_q(quality(r1), 'accuracy')} | {secs:.1f} |", flush=True)


# ---------------------------------------------------------------- 4. heads and layers

def _reload_checks(res, base_desc, batch, tmp: Path) -> tuple[str, str, str, object]:
    """(shrink's own directory: max |diff| of outputs after reload; transformers save_pretrained /
    from_pretrained: outcome; the safetensors export loaded by transformers' Auto class with
    trust_remote_code=True: outcome; that loaded model, or None). Files stay in `tmp`."""
    import transformers

    from shrink.export.hf import write_hf_dir
    from shrink.export.hf_resized import has_remote_code
    from shrink.models.compressed import save_compressed
    from shrink.models.io import is_causal_lm, load
    from shrink.surgery.capture import call_model

    def out(m):
        with torch.inference_mode():
            o = call_model(m, batch)
        o = getattr(o, "logits", None) if getattr(o, "logits", None) is not None else getattr(o, "last_hidden_state", o)
        return o.float()

    def n_params(m):
        return sum(p.numel() for p in m.parameters())

    ref = out(res.model.eval())
    save_compressed(res.model, tmp / "own", base=base_desc)
    own = f"reloads, max |diff| {float((out(load(tmp / 'own')) - ref).abs().max()):.1e}"
    try:
        res.model.save_pretrained(tmp / "hf")
        hf = type(res.model).from_pretrained(tmp / "hf").eval()
        hf_txt = f"loads, max |diff| {float((out(hf) - ref).abs().max()):.1e}"
    except Exception as e:  # noqa: BLE001 - recorded, not hidden
        hf_txt = f"fails: {type(e).__name__}: {str(e).splitlines()[0].split('. ')[0]}"
    auto = transformers.AutoModelForCausalLM if is_causal_lm(res.model) else transformers.AutoModel
    write_hf_dir(res.model, None, tmp / "export")
    remote = has_remote_code(tmp / "export")
    exported = auto.from_pretrained(tmp / "export", trust_remote_code=True, local_files_only=True).eval()
    ex_txt = (f"loads as {type(exported).__name__} ({'remote code' if remote else 'no remote code needed'}), "
              f"{n_params(exported):,} params (shrink's model: {n_params(res.model):,}), "
              f"max |diff| {float((out(exported) - ref).abs().max()):.1e}")
    return own, hf_txt, ex_txt, exported


def sec_heads(args) -> None:
    steps = steps_of(200, args.quick)
    print(f"\n## 4. Attention heads and layers ({steps} fine-tuning steps)\n")
    # finetune's default loss (auto) distills from the uncompressed model; next-token loss is named
    default = {"steps": steps, "lr": 1e-4}
    lm, distill = {**default, "loss": "lm"}, {**default, "loss": "distill"}
    # (method, sparsity, finetune or None, calibration windows for the fine-tune (None: prepare's default))
    plans = {"minilm": [("heads", 0.25, None, None), ("heads", 0.25, default, None)],
             "tiny-gpt": [(m, 0.25, ft, n) for m in ("heads", "layers")
                          for ft, n in ((None, None), (lm, None), (distill, None), (lm, 256))]}
    for name, variants in plans.items():
        model, batches, metric, base_desc, _ = prepare(name)
        base = measure(model, metric, None)
        qname = base["quality"]["name"]
        probe = latency_probe(batches[0])
        more = {}
        rows, tuned, checks, configs = [], {}, {}, {}
        tmp = Path(tempfile.mkdtemp(prefix=f"bench-pruning-{name}-"))
        for method, s, ft, windows in variants:
            data = batches
            if windows is not None:
                if windows not in more:
                    more[windows] = prepare(name, n_samples=windows)[1]
                data = more[windows]
            recipe = [{"prune": {"method": method, "sparsity": s}}]
            label = f"{method} {s:.0%}"
            if ft is not None:
                recipe.append({"finetune": ft})
                loss = {"auto": "distill"}.get(ft.get("loss", "auto"), ft.get("loss"))
                rows_of = sum(b["input_ids"].shape[0] for b in data)
                label += f" + finetune {ft['steps']} (lr {ft['lr']:g}, {loss}, {rows_of} calibration rows)"
            res, secs = run(model, recipe, data, metric, base=base, speed=ft is not None)
            d = res.steps[0].details
            removed = d["removed"]
            what = (f"{removed[0]['kept']}/{removed[0]['units']} {removed[0]['kind']} per layer" if method == "heads"
                    else f"layers {[r['layer'] for r in removed]} of {len(d['layer_scores'])}")
            L = res.metrics["ratios"]["L"]
            tr = res.steps[1].details["training"] if ft is not None else None
            losses = "-" if tr is None else f"{tr['loss_first']:.3g} -> {tr['loss_last']:.3g}"
            rows.append(f"| {label} | {what} | {d['params_before']:,} -> {d['params_after']:,} | "
                        f"{fmt_q(base['quality']['value'], qname)} -> {fmt_q(quality(res), qname)} | "
                        f"{losses} | "
                        f"{'-' if L is None else f'{L:.2f}x'} | {secs:.1f} |")
            configs[method] = d["config"]
            if ft is not None and method not in checks:   # one timing and reload check per pruned shape
                tuned[label] = res.model
                own, hf, ex, exported = _reload_checks(res, base_desc, probe["batched"], tmp / method)
                checks[method] = (label, own, hf, ex)
                tuned[f"{label}, loaded by transformers from the export"] = exported
        q = "embedding cosine to the original" if name == "minilm" else "perplexity on held-out text"
        shape = {k: tuple(v.shape) for k, v in probe["batched"].items() if k == "input_ids"}["input_ids"]
        print(f"### {name} ({q}; latency probe: batch 1 and {shape[0]} x {shape[1]} tokens)\n")
        print(f"| recipe | removed | params | {qname} | training loss first -> last | L (compress's own, batch 1) "
              "| seconds |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        print("\n".join(rows))
        t = timings({"original": model, **tuned}, {"1": probe["batch1"], "8": probe["batched"]},
                    args.latency_rounds)
        print(f"\nLatency, ms (round-robin, median of {args.latency_rounds} rounds):\n")
        print(f"| model | batch 1 | speed-up | batch {shape[0]} | speed-up |")
        print("| --- | --- | --- | --- | --- |")
        for key, d in t.items():
            print(f"| {key} | {ms(d['1'])} | {t['original']['1'] / d['1']:.2f}x | {ms(d['8'])} | "
                  f"{t['original']['8'] / d['8']:.2f}x |")
        print("\nConfig and reloading:\n")
        print("| pruned | config_loadable (steps[0].details) | reason | shrink's own directory | "
              "transformers save_pretrained / from_pretrained | export safetensors, Auto class "
              "from_pretrained(trust_remote_code=True) |")
        print("| --- | --- | --- | --- | --- | --- |")
        for method, (label, own, hf, ex) in checks.items():
            c = configs[method]
            print(f"| {label} | {c['config_loadable']} | {c.get('reason', '') or '-'} | {own} | {hf} | {ex} |")
        print(flush=True)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {','.join(SECTIONS)}")
    ap.add_argument("--quick", action="store_true", help="a tenth of every training run (smoke test)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the cores are shared)")
    ap.add_argument("--latency-rounds", type=int, default=5)
    args = ap.parse_args()
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in chosen if s not in SECTIONS]
    if bad:
        ap.error(f"unknown section(s) {bad}; choose from {', '.join(SECTIONS)}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"# machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}{', QUICK (not for the record)' if args.quick else ''}")
    t0 = time.perf_counter()
    for s in chosen:
        {"quality": sec_quality, "structured": sec_structured, "lottery": sec_lottery, "heads": sec_heads}[s](args)
    print(f"\n# total {time.perf_counter() - t0:.0f} s; load average (1 min) during the runs "
          f"{min(LOADS, default=0):.1f}-{max(LOADS, default=0):.1f}")


if __name__ == "__main__":
    main()
