"""`shrink eval MODEL_OR_DIR`: size, quality, latency and energy of one model, measured as compress does."""
from __future__ import annotations

import json
import sys


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="measure a model: size, quality, latency, energy estimate",
                       description="Measure a built-in model, a model directory, or a DIR written by "
                                   "`shrink compress` (scored against the model it was made from).")
    p.add_argument("model", metavar="MODEL_OR_DIR")
    p.add_argument("--eval", dest="eval_source", metavar="SOURCE",
                   help="held-out text to score quality on (.txt or .jsonl; default: held-out stdlib modules)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")


def run(args) -> int:
    from shrink.recipe.job import _jsonable, evaluate_job

    doc = _jsonable(evaluate_job(args.model, seed=args.seed, eval_source=args.eval_source))
    if args.json:
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(f"{doc['model']}: {doc['size_bytes'] / 1e6:.2f} MB stored, {doc['params']:,} parameters")
    if doc["source_model"] != doc["model"]:
        print(f"compressed from {doc['source_model']}")
    q = doc.get("quality")
    if q:
        print(f"{q['name']}: {q['value']:.4f}" + (f" (on {doc['eval_source']})" if doc.get("eval_source") else ""))
    lat = doc.get("latency")
    if lat:
        print(f"latency: batch 1 {lat['batch1']['median_ms']:.2f} ms, batch {lat['batched']['batch_size']} "
              f"{lat['batched']['median_ms']:.2f} ms (median of {lat['batch1']['runs']}, {lat['threads']} threads)")
    e = doc.get("energy")
    if e:
        print(f"energy (estimate, one batch-1 forward): {e['derivation']}")
    return 0
