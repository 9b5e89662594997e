"""`shrink search MODEL [--device NAME] [--max-size BYTES] [--max-drop PCT] [--min-quality Q] -o DIR`."""
from __future__ import annotations

import json
import sys


def add_parser(sub) -> None:
    p = sub.add_parser("search", help="try recipes to a budget; keep the Pareto front; save the best")
    p.add_argument("model", metavar="MODEL", help="minilm, tiny-gpt, digits-mlp, digits-cnn, or a model directory")
    p.add_argument("--device", metavar="NAME", help="fit on this device (memory after KV cache and activations)")
    p.add_argument("--max-size", metavar="BYTES", help="size budget for the stored model, e.g. 8MB, 20MiB")
    p.add_argument("--max-drop", metavar="PCT", help="quality may drop at most this percent, e.g. 1 or 1%%")
    p.add_argument("--min-quality", metavar="Q", type=float,
                   help="quality floor in the metric's units (for perplexity: the highest allowed)")
    p.add_argument("-o", "--output", required=True, metavar="DIR")
    p.add_argument("--space", default="default", choices=("small", "default", "wide"),
                   help="how many candidate recipes to generate (default: default)")
    p.add_argument("--recipe", action="append", metavar="RECIPE",
                   help="search only these recipes (built-in names or YAML files; repeat the flag)")
    p.add_argument("--full", type=int, default=4, metavar="N", help="candidates evaluated fully after the proxy (4)")
    p.add_argument("--workers", type=int, metavar="N", help="trial processes (default: min(4, CPUs); 1: in process)")
    p.add_argument("--cluster", metavar="ADDRESS", help="run the trials on a Ray cluster (pip install 'shrink[cluster]')")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print result.json on stdout")


def run(args) -> int:
    from shrink.cli.progress import bar_callback
    from shrink.plan.numbers import parse_bytes
    from shrink.recipe.search_job import search_job
    from shrink.recipe.trials import quiet_model_loading
    from shrink.report import write_report

    max_size = None if args.max_size is None else parse_bytes(args.max_size, "--max-size")
    drop = None if args.max_drop is None else _percent(args.max_drop)
    if args.device is None and max_size is None and drop is None and args.min_quality is None:
        raise ValueError("give a target: --device NAME or --max-size BYTES, and/or a quality floor "
                         "(--max-drop PCT or --min-quality Q)")
    quiet_model_loading()  # the trials' model loads would draw one transformers bar each
    doc = search_job(args.model, args.output, device=args.device, max_size=max_size, max_drop=drop,
                     min_quality=args.min_quality, space=args.space, recipes=args.recipe, full=args.full,
                     workers=args.workers, cluster=args.cluster, seed=args.seed, progress=bar_callback())
    report = write_report(args.output)
    if args.json:
        json.dump(doc, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        _print(doc)
        print(f"wrote {args.output}/result.json" + (f", {args.output}/model/" if doc["chosen"] else "")
              + f" and {report}")
    if doc["chosen"] is None:   # the budget cannot be met: the user's target is what must change
        print(f"shrink search: error: {_unmet(doc)}", file=sys.stderr)
        return 2
    return 0


def _unmet(doc: dict) -> str:
    """One line: none met the constraints, which came closest, what to do."""
    near = doc.get("closest")
    if near is None:
        return "no candidate could be evaluated (each candidate's error is in result.json); nothing was saved as model/"
    return (f"{doc.get('note', 'no candidate met the constraints')}; loosen --max-size / --max-drop / --min-quality "
            "or try --space wide (candidates and the closest are in result.json)")


def _percent(text: str) -> float:
    t = str(text).strip().rstrip("%")
    try:
        return float(t)
    except ValueError:
        raise ValueError(f"--max-drop {text!r}: write a percentage such as 1 or 0.5%") from None


def _print(doc: dict) -> None:
    cons = doc["constraints"]
    qname = cons["quality_name"]
    parts = []
    if cons["max_size_bytes"] is not None:
        parts.append(f"size <= {cons['max_size_bytes'] / 1e6:,.2f} MB" + (f" ({cons['device']})" if cons["device"] else ""))
    if cons["quality_floor"] is not None:
        parts.append(f"{qname} {'>=' if cons['higher_is_better'] else '<='} {cons['quality_floor']:.4f}")
    print(f"{doc['model']}: {len(doc['candidates'])} candidates; constraints: {', '.join(parts) or 'none'}")
    head = f"{'candidate':<20}{'stage':>7}{'MB':>9}{qname[:14]:>15}{'ms b1':>8}  front  ok"
    print(head)
    print("-" * len(head))
    for c in doc["candidates"]:
        if c.get("error"):
            print(f"{c['name']:<20}{c['stage']:>7}  failed: {c['error'][:70]}")
            continue
        lat = "" if c.get("latency_ms") is None else f"{c['latency_ms']:.2f}"
        mark = "*" if doc["chosen"] and c["name"] == doc["chosen"]["name"] else " "
        print(f"{c['name']:<20}{c['stage']:>7}{c['size_bytes'] / 1e6:>9.2f}{c['quality']['value']:>15.4f}{lat:>8}"
              f"  {'yes' if c['on_front'] else '   '}    {'yes' if c['feasible'] else ''}{mark}")
    if doc["chosen"]:
        c = doc["chosen"]
        print(f"chosen: {c['name']} ({c['size_bytes'] / 1e6:.2f} MB, {qname} {c['quality']['value']:.4f})")
    else:
        print(doc.get("note", "no candidate met the constraints"))
