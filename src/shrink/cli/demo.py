"""`shrink demo`: the journey on built-in models, as far as shrink goes today.

Now: plan (MiniLM on a Raspberry Pi 5, Llama-2-7B on an RTX 4090), then
quantize every weight matrix of the pretrained MiniLM in each number format
and report stored bytes, compression and reconstruction quality.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from shrink.cli.progress import Progress
from shrink.eval import roundtrip_errors, summarize
from shrink.fsutil import write_json_atomic
from shrink.models import minilm_dir, read_safetensors
from shrink.quant import QuantSpec

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
    p.add_argument("-o", "--output", metavar="DIR", help="write demo.json into DIR")
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
    if args.output:
        write_json_atomic(Path(args.output) / "demo.json", _jsonable(doc))
    if args.json:
        json.dump(_jsonable(doc), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        _print_table(doc)
        if args.output:
            print(f"\nwrote {Path(args.output) / 'demo.json'}")
    return 0


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
