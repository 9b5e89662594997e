"""`shrink compress MODEL --recipe RECIPE -o DIR`: run a recipe, measure, save."""
from __future__ import annotations

import json
import sys


def add_parser(sub) -> None:
    p = sub.add_parser("compress", help="run a recipe on a model; write DIR/model and DIR/result.json")
    p.add_argument("model", metavar="MODEL", help="minilm, tiny-gpt, digits-mlp, digits-cnn, or a model directory")
    p.add_argument("--recipe", required=True, metavar="RECIPE",
                   help="a built-in name (int8, w4-rtn, w4-gptq, w4-awq, w3-gptq, kmeans16) or a YAML file")
    p.add_argument("-o", "--output", required=True, metavar="DIR")
    p.add_argument("--calib", metavar="SOURCE", help="calibration text: a .txt or .jsonl file (default: the stdlib corpus)")
    p.add_argument("--device", metavar="NAME",
                   help="a device from `shrink plan`'s table (e.g. rtx-4090, raspberry-pi-5): the report shows "
                        "memory fit and the roofline there")
    p.add_argument("--eval", dest="eval_source", metavar="SOURCE",
                   help="held-out text to score quality on (.txt or .jsonl; default: held-out stdlib modules)")
    p.add_argument("--force", action="store_true",
                   help="run a step order the recipe rules refuse (e.g. pruning after quantization)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its checkpoint in DIR/.resume (same model, recipe, seed "
                        "and data); the result is the same, byte for byte, as an uninterrupted run's")
    p.add_argument("--json", action="store_true", help="print result.json on stdout")


def run(args) -> int:
    from shrink.cli.progress import bar_callback
    from shrink.recipe.job import run_job
    from shrink.report import write_report

    progress = bar_callback()
    doc = run_job(args.model, args.recipe, args.output, calib=args.calib, eval_source=args.eval_source, seed=args.seed, device=args.device,
                  force=args.force, progress=progress, resume=args.resume,
                  note=lambda msg: print(msg, file=sys.stderr))
    report = write_report(args.output)
    if args.json:
        json.dump(doc, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
        return 0
    b, c = doc["baseline"], doc["compressed"]
    print(f"{args.model}: {b['size_bytes'] / 1e6:.2f} MB -> {c['size_bytes'] / 1e6:.2f} MB "
          f"({doc['size_reduction']:.2f}x smaller)")
    if "quality" in b:
        q0, q1 = b["quality"], c["quality"]
        print(f"{q0['name']}: {q0['value']:.4f} -> {q1['value']:.4f}")
    r = doc.get("ratios") or {}
    if r:
        fmt = lambda v, pct=False: "n/a" if v is None else (f"{100 * v:.1f}%" if pct else f"{v:.2f}x")  # noqa: E731
        lat = f" (batch-1 {b['latency_ms']:.2f} ms -> {c['latency_ms']:.2f} ms)" if "latency_ms" in c else ""
        print(f"R size {fmt(r.get('R'))}, A quality kept {fmt(r.get('A'), True)}, L latency {fmt(r.get('L'))}{lat}, "
              f"E energy (estimate) {fmt(r.get('E'))}")
    for step in doc["steps"]:
        layers = step["layers"]
        rtn = [l for l in layers if l.get("error_rtn")]
        extra = ""
        if rtn:
            ratio = sum(l["error"] / l["error_rtn"] for l in rtn) / len(rtn)
            ref = "magnitude pruning's" if next(iter(step["step"])) == "prune" else "RTN's"
            extra = f", output error {ratio:.2f}x {ref} on average"
        det = step.get("details") or {}
        if det.get("params_before"):
            extra += f", parameters {det['params_before']:,} -> {det['params_after']:,}"
        if (det.get("training") or {}).get("loss_first") is not None:
            extra += f", training loss {det['training']['loss_first']:.4g} -> {det['training']['loss_last']:.4g}"
        print(f"step {step['index']} {next(iter(step['step']))}: {len(layers)} layers in {step['seconds']:.1f}s{extra}"
              + (f"; {len(step['skipped'])} modules skipped (see result.json)" if step["skipped"] else ""))
    for w in doc.get("warnings") or []:
        print(w)
    print(f"wrote {args.output}/result.json, {args.output}/model/ and {report}")
    return 0
