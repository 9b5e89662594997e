"""`shrink inspect MODEL`: layers, parameters, bytes, weight statistics, per-layer sensitivity."""
from __future__ import annotations

import json
import sys

HEAD_ROWS, TAIL_ROWS = 30, 10   # a long table shows its first and last layers
MAX_ROWS = HEAD_ROWS + TAIL_ROWS + 10
TOP = 10                         # layers named in the "most sensitive" line


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="layers, sizes, weight statistics and per-layer sensitivity of a model",
                       description="Describe a built-in model, a model directory, or a DIR written by "
                                   "`shrink compress`: per layer its shape, storage, weight statistics, weight "
                                   "SQNR after round-to-nearest at int8 / int4-g128 / int3-g128 and, with "
                                   "calibration data, the layer-output error at int4-g128; layers ranked "
                                   "most sensitive first.")
    p.add_argument("model", metavar="MODEL", help="minilm, tiny-gpt, digits-mlp, digits-cnn, a model directory, "
                                                  "or a DIR from `shrink compress`")
    p.add_argument("--no-data", action="store_true",
                   help="data-free only: skip the calibration pass (rank by weight SQNR at int4-g128)")
    p.add_argument("--all", action="store_true", help="list every layer, however many")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")


def run(args) -> int:
    from shrink.cli.progress import bar_callback
    from shrink.recipe.inspect import inspect_model
    from shrink.recipe.job import _jsonable

    doc = _jsonable(inspect_model(args.model, data=not args.no_data, seed=args.seed, progress=bar_callback()))
    if args.json:
        json.dump(doc, sys.stdout, indent=2, allow_nan=False)
        sys.stdout.write("\n")
        return 0
    for line in render(doc, every=args.all):
        print(line)
    return 0


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n}B"


def _num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _short(name: str, width: int) -> str:
    return name if len(name) <= width else name[: width // 2 - 1] + "..." + name[-(width - width // 2 - 2):]


def _row(r: dict, name_w: int) -> list[str]:
    s, q = r["stats"], r["sqnr_db"] or {}
    err = r["output_error_int4"]
    return [_short(r["name"] or "(model)", name_w), r["type"], "x".join(map(str, r["shape"])), f"{r['params']:,}",
            r["format"], _bytes(r["bytes"]), _num(s["std"], ".4g"), _num(s["max_over_std"], ".2f"),
            _num(s["kurtosis"], ".2f"), _num(q.get("int8"), ".1f"), _num(q.get("int4-g128"), ".1f"),
            _num(q.get("int3-g128"), ".1f"), "-" if err is None else f"{100 * err:.3g}%",
            _num(r["rank"], "d")]


HEADER = ["name", "type", "shape", "params", "format", "bytes", "std", "max/std", "kurt",
          "SQNR8", "SQNR4", "SQNR3", "err@int4", "rank"]
LEFT = {0, 1, 2, 4}


def render(doc: dict, *, every: bool = False) -> list[str]:
    """The inspect document as text lines: totals, the layer table, the ranking."""
    t, cal, sens = doc["totals"], doc["calibration"], doc["sensitivity"]
    lines = [f"{doc['model']}: {t['params']:,} parameters, {_bytes(t['size_bytes'])} stored "
             f"({_num(t['bits_per_weight'], '.2f')} bits/weight); fp32 {_bytes(t['bytes_fp32'])}, "
             f"fp16 {_bytes(t['bytes_fp16'])}; {t['layers']} layers, {t['compressible_layers']} compressible"
             + (f", {t['quantized_layers']} quantized" if t["quantized_layers"] else "")]
    if doc["source_model"] != doc["model"]:
        lines.append(f"compressed from {doc['source_model']}")
    if cal["used"]:
        lines.append(f"sensitivity: layer-output error of {cal['format']} round-to-nearest, relative to the "
                     f"output energy, on {cal['batches']} calibration batches (rank 1 = most sensitive)")
    elif sens["order"]:
        lines.append(f"sensitivity: weight SQNR at int4-g128, lowest = rank 1; no layer-output error: {cal['reason']}")
    else:
        lines.append(f"sensitivity: no layer to rank ({cal['reason']})")
    layers = doc["layers"]
    shown = layers if every or len(layers) <= MAX_ROWS else layers[:HEAD_ROWS] + layers[-TAIL_ROWS:]
    name_w = min(48, max([len(HEADER[0])] + [len(r["name"]) for r in shown]))
    cells = [HEADER] + [_row(r, name_w) for r in shown]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]

    def fmt(c: list[str]) -> str:
        return "  ".join(v.ljust(w) if i in LEFT else v.rjust(w) for i, (v, w) in enumerate(zip(c, widths))).rstrip()

    lines.append("")
    lines.append(fmt(cells[0]))
    for k, c in enumerate(cells[1:]):
        if len(shown) < len(layers) and k == HEAD_ROWS:
            lines.append(f"... {len(layers) - len(shown)} more layers not shown (--all lists them, --json gives everything)")
        lines.append(fmt(c))
    lines.append("")
    if sens["order"]:
        by = {r["name"]: r for r in layers}
        top = [f"{n} ({100 * by[n]['output_error_int4']:.3g}%)" if sens["ranked_by"] == "output_error_int4"
               else f"{n} ({by[n]['sqnr_db']['int4-g128']:.1f} dB)" for n in sens["order"][:TOP]]
        lines.append("most sensitive: " + ", ".join(top))
    left_out = [f"{r['name']} ({r['note'].split(';')[0].split(',')[0]})" for r in layers
                if not r["compressible"] and not r["quantized"] and r["note"]]
    if left_out:
        lines.append("not compressed by default: " + ", ".join(left_out))
    return lines
