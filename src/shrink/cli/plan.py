"""`shrink plan`: will it fit, how fast can it be, what should I use."""
from __future__ import annotations

import json
import sys


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="deployment arithmetic: sizes, fit, speed bounds, a recommendation",
                       description="Sizes at every precision, fit on a device with the KV cache, "
                                   "roofline speed limits and a recommended strategy, each with its arithmetic.")
    p.add_argument("model", nargs="?", metavar="MODEL",
                   help="a preset (llama-2-13b, mistral-7b, gpt2, bert-base, ...), a config.json or model directory")
    p.add_argument("--params", metavar="N", help="plan from a parameter count alone (7B, 350M)")
    p.add_argument("--device", metavar="NAME", help="rtx-4090, a100-80gb, h100, t4, raspberry-pi-5, phone, mcu, ...")
    p.add_argument("--memory", metavar="BYTES", help="custom device memory (24GB, 16GiB); overrides --device's")
    p.add_argument("--bandwidth", metavar="RATE", help="custom device bandwidth (1TB/s); overrides --device's")
    p.add_argument("--context", metavar="N", help="tokens of context (default: the model's, capped at 4096)")
    p.add_argument("--batch", metavar="N", default="1", help="concurrent sequences (default 1)")
    p.add_argument("--kv-format", metavar="F", default="fp16", help="KV cache precision: fp16 (default), fp8, int8, int4, fp32")
    p.add_argument("--format", metavar="F", action="append", dest="formats",
                   help="a format to plan (repeatable): fp32 fp16 bf16 fp8-e4m3 int8 int4-g128 nf4-g64 int3-g128 ...")
    p.add_argument("--max-drop", metavar="PCT", default="1", help="accuracy you can lose, in percent (default 1)")
    p.add_argument("--can-train", action="store_true", help="training compute is available (QAT, distillation)")
    p.add_argument("--explain", action="store_true", help="show the arithmetic behind every figure")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")


def run(args) -> int:
    from shrink.plan.planner import build_plan

    max_drop = _percent(args.max_drop)
    plan = build_plan(args.model, params=args.params, device=args.device, memory=args.memory,
                      bandwidth=args.bandwidth, context=args.context, batch=args.batch,
                      kv_format=args.kv_format, formats=args.formats, max_drop=max_drop,
                      can_train=args.can_train)
    if args.json:
        json.dump(plan.to_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    from shrink.cli.render_plan import render

    render(plan, explain=args.explain)
    return 0


def _percent(text: str) -> float:
    t = str(text).strip().rstrip("%")
    try:
        v = float(t)
    except ValueError:
        raise ValueError(f"--max-drop {text!r} is not a number; write e.g. 1 or 0.5%") from None
    if not 0 < v <= 100:
        raise ValueError(f"--max-drop must be in (0, 100] percent, got {text!r}")
    return v
