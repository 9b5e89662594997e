"""`shrink demo`: the whole journey on the built-in models, in a few minutes.

1. plan: MiniLM on a Raspberry Pi 5, Llama-2-7B on an RTX 4090 (arithmetic only);
2. formats: every weight matrix of the pretrained MiniLM in each number format
   (stored bytes, compression, SQNR);
3. compress: MiniLM and tiny-gpt with a few recipes (quantization, and pruning before it),
   digits-cnn pruned 2:4 by SparseGPT, digits-mlp distilled into a half-width student then
   int8, each measured before and after
   (size, quality, latency, energy) into DIR/NAME/ with its report.html;
4. export: tiny-gpt's GPTQ model to GGUF (its codes carried into Q4_1), proven in llama.cpp;
5. search: a small space on tiny-gpt to a quality floor, Pareto front and choice;
6. a summary table and where everything is.

--quick runs one recipe per model and a smaller search (the tests use it).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from shrink.cli.progress import Progress, bar_callback
from shrink.eval import roundtrip_errors, summarize
from shrink.fsutil import write_json_atomic
from shrink.models import minilm_dir, read_safetensors
from shrink.quant import QuantSpec

RUNS = [("minilm", "int8"), ("minilm", "w4-gptq"), ("tiny-gpt", "w4-gptq"), ("tiny-gpt", "mixed-4.5"),
        ("tiny-gpt", "prune50-wanda+w4"), ("digits-cnn", "prune-2:4-sparsegpt"), ("digits-mlp", "distill+int8")]
QUICK_RUNS = [("minilm", "int8"), ("tiny-gpt", "w4-gptq")]
SEARCH = {"model": "tiny-gpt", "max_drop": 1.0, "space": "small", "full": 2}
QUICK_SEARCH = {"model": "digits-mlp", "max_drop": 1.0, "space": "small", "full": 2}

# (label, spec name, observer)
FORMATS = [
    ("fp16", "fp16", "minmax"),
    ("bf16", "bf16", "minmax"),
    ("fp8-e4m3 per-channel", "fp8-e4m3", "minmax"),
    ("int8 per-channel", "int8", "minmax"),
    ("int4-g128 minmax", "int4-g128", "minmax"),
    ("int4-g128 mse", "int4-g128", "mse"),
    ("nf4-g64", "nf4-g64", "minmax"),
    ("int3-g128 mse", "int3-g128", "mse"),
]


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the main job on the built-in models")
    p.add_argument("-o", "--output", metavar="DIR", default="demo-out",
                   help="where runs, reports and demo.json go (default: demo-out)")
    p.add_argument("--quick", action="store_true", help="one recipe per model and a smaller search")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")


PLANS = [("minilm", "raspberry-pi-5", 512), ("llama-2-7b", "rtx-4090", 4096)]


def run(args) -> int:
    from shrink.cli.render_plan import render
    from shrink.plan.planner import build_plan

    plans = []
    for model, device, ctx in PLANS:
        plan = build_plan(model, device=device, context=ctx,
                          formats=["fp32", "fp16", "int8", "int4-g128", "nf4-g64", "int3-g128"])
        plans.append(plan.to_json())
        if not args.json:
            render(plan)
            print()
    path = minilm_dir() / "model.safetensors"
    weights = [(k, v) for k, v in read_safetensors(path).items() if v.dim() == 2 and "embeddings" not in k]
    rows = []
    for label, name, observer in FORMATS:
        spec = QuantSpec.from_name(name)
        layers = roundtrip_errors(weights, spec, observer=observer,
                                  progress=Progress(label, len(weights)))
        rows.append({"format": label, "spec": name, "observer": observer,
                     "summary": summarize(layers), "layers": [l.to_dict() for l in layers]})
    rows += _kmeans_rows(weights)
    doc = {"plans": plans, "model": "minilm", "source": str(path), "matrices": len(weights), "results": rows}
    if not args.json:
        _print_table(doc)
    out = Path(args.output)
    doc["runs"] = _compress_runs(out, QUICK_RUNS if args.quick else RUNS)
    doc["exports"] = _exports(out, doc["runs"])
    doc["search"] = _search(out, QUICK_SEARCH if args.quick else SEARCH)
    write_json_atomic(out / "demo.json", _jsonable(doc))
    if args.json:
        json.dump(_jsonable(doc), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        _print_journey(doc)
        print(f"\nwrote {out / 'demo.json'}; open the reports above in a browser")
    return 0


def _compress_runs(out: Path, runs) -> list[dict]:
    from shrink.recipe.job import run_job
    from shrink.report import write_report

    rows = []
    for model, recipe in runs:
        d = out / f"{model}-{recipe}"
        print(f"compress {model} --recipe {recipe} -o {d}", file=sys.stderr)
        r = run_job(model, recipe, d, device="raspberry-pi-5" if model == "minilm" else "jetson-orin",
                    progress=bar_callback())
        rows.append({"model": model, "recipe": recipe, "dir": str(d), "report": str(write_report(d)),
                     "baseline": _brief(r["baseline"]), "compressed": _brief(r["compressed"]),
                     "ratios": r["ratios"]})
    return rows


EXPORTS = [("tiny-gpt", "w4-gptq", "gguf:auto")]


def _exports(out: Path, runs: list[dict]) -> list[dict]:
    """Export the compressed DIRs to a deployment format and prove them in the runtime; the
    record goes into the run's result.json and report."""
    from shrink.cli.export import _attach_to_run
    from shrink.export.run import check_runtime, export, parse_format

    rows = []
    for model, recipe, fmt in EXPORTS:
        run = next((r for r in runs if (r["model"], r["recipe"]) == (model, recipe)), None)
        if run is None:
            continue
        path = Path(run["dir"]) / ("model.gguf" if fmt.startswith("gguf") else "export")
        print(f"export {run['dir']} --format {fmt} -o {path}", file=sys.stderr)
        try:
            check_runtime(parse_format(fmt)[0])
        except ValueError as e:
            rows.append({"dir": run["dir"], "format": fmt, "skipped": str(e)})
            continue
        rec = export(run["dir"], fmt, path)
        _attach_to_run(run["dir"], rec)
        v = rec["verification"]
        rows.append({"dir": run["dir"], "format": fmt, "path": str(path), "bytes": rec["bytes"],
                     "carried": rec.get("carried"), "runtime": v["runtime"], "passed": v["passed"],
                     "vs_shrink_model": v["vs_shrink_model"], "greedy_generated": v["greedy"]["generated"],
                     "decode_tokens_per_s": v["latency"]["decode_tokens_per_s"]})
    return rows


def _search(out: Path, cfg: dict) -> dict:
    from shrink.recipe.search_job import search_job
    from shrink.recipe.trials import quiet_model_loading
    from shrink.report import write_report

    d = out / f"search-{cfg['model']}"
    print(f"search {cfg['model']} --max-drop {cfg['max_drop']} --space {cfg['space']} -o {d}", file=sys.stderr)
    quiet_model_loading()
    r = search_job(cfg["model"], d, max_drop=cfg["max_drop"], space=cfg["space"], full=cfg["full"],
                   progress=bar_callback())
    c = r["chosen"]
    return {**cfg, "dir": str(d), "report": str(write_report(d)), "candidates": len(r["candidates"]),
            "front": [x["name"] for x in r["candidates"] if x["on_front"]],
            "chosen": None if c is None else {"name": c["name"], "size_bytes": c["size_bytes"], "quality": c["quality"]},
            "baseline": _brief(r["baseline"]), "note": r.get("note")}


def _brief(m: dict) -> dict:
    return {"size_bytes": m["size_bytes"], "params": m["params"], "quality": m.get("quality"),
            "latency_ms": m.get("latency_ms")}


def _print_journey(doc: dict) -> None:
    print("\nCompressed (measured before -> after; 2 warm-ups, median of 7 for latency)\n")
    head = f"{'model':<11}{'recipe':<20}{'MB':>16}{'R':>7}{'quality':>28}{'A':>8}{'L':>7}{'E':>7}"
    print(head)
    print("-" * len(head))
    for r in doc["runs"]:
        b, c, x = r["baseline"], r["compressed"], r["ratios"]
        q = f"{b['quality']['value']:.4f} -> {c['quality']['value']:.4f}"
        fmt = lambda v, pct=False: "n/a" if v is None else (f"{100 * v:.1f}%" if pct else f"{v:.2f}x")  # noqa: E731
        print(f"{r['model']:<11}{r['recipe']:<20}{b['size_bytes'] / 1e6:>7.2f} -> {c['size_bytes'] / 1e6:<6.2f}"
              f"{fmt(x['R']):>7}{b['quality']['name'][:10]:>12} {q:>15}{fmt(x['A'], True):>8}{fmt(x['L']):>7}"
              f"{fmt(x['E']):>7}")
    for e in doc.get("exports", []):
        if "skipped" in e:
            print(f"\nExport of {e['dir']} to {e['format']} skipped: {e['skipped']}")
            continue
        a = e["vs_shrink_model"]
        print(f"\nExported {e['dir']} -> {e['path']} ({e['format']}, {e['bytes'] / 1e6:.2f} MB, "
              f"{e['carried']} layers' codes carried); in {e['runtime']}: "
              f"{'PASSED' if e['passed'] else 'FAILED'}, logits rel. error {a['rel_rmse']:.1e} and top-1 agreement "
              f"{100 * a['top1_agreement']:.1f}% vs shrink's model, greedy {a['greedy_match']}/{e['greedy_generated']} "
              f"tokens equal, {e['decode_tokens_per_s']:.0f} tok/s decode")
    s = doc["search"]
    print(f"\nSearch on {s['model']} (--max-drop {s['max_drop']}%, {s['candidates']} candidates, "
          f"front: {', '.join(s['front']) or 'none'})")
    if s["chosen"]:
        c = s["chosen"]
        print(f"chosen: {c['name']}: {s['baseline']['size_bytes'] / 1e6:.2f} MB -> {c['size_bytes'] / 1e6:.2f} MB, "
              f"{c['quality']['name']} {s['baseline']['quality']['value']:.4f} -> {c['quality']['value']:.4f}")
    else:
        print(s["note"])
    print("\nReports:")
    for r in doc["runs"] + [s]:
        print(f"  {r['report']}")


def _kmeans_rows(weights) -> list[dict]:
    from shrink.algos import kmeans

    rows = []
    for bits in (4,):
        label = f"k-means {1 << bits} (Deep Compression)"
        layers = roundtrip_errors(weights, quantizer=lambda w: kmeans(w, bits=bits).qtensor,
                                  progress=Progress(label, len(weights)))
        rows.append({"format": label, "spec": f"kmeans-{1 << bits}", "observer": "lloyd",
                     "summary": summarize(layers), "layers": [l.to_dict() for l in layers]})
    return rows


def _print_table(doc: dict) -> None:
    s0 = doc["results"][0]["summary"]
    print(f"\nMiniLM ({doc['matrices']} weight matrices, {s0['params']:,} parameters, "
          f"{s0['bytes_fp32'] / 1e6:.1f} MB in fp32)\n")
    head = f"{'format':<34}{'MB':>8}{'bits/w':>8}{'x fp32':>8}{'SQNR dB (min/mean)':>22}"
    print(head)
    print("-" * len(head))
    for r in doc["results"]:
        s = r["summary"]
        print(f"{r['format']:<34}{s['bytes_stored'] / 1e6:>8.2f}{s['bits_per_weight']:>8.2f}"
              f"{s['compression_vs_fp32']:>8.2f}{s['sqnr_db_min']:>11.1f} / {s['sqnr_db_mean']:<8.1f}")


def _jsonable(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj
