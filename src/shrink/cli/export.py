"""`shrink export DIR_OR_MODEL --format FORMAT -o PATH`: write a deployment format and prove it
in its runtime (llama.cpp, ONNX Runtime, transformers, shrink.load)."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write GGUF / ONNX / safetensors and verify it in its runtime",
                       description="Export a built-in model, a model directory or a DIR written by `shrink "
                                   "compress`, then load the artifact in its real runtime and compare its "
                                   "outputs with shrink's on held-out text. The record goes to "
                                   "PATH.export.json (PATH/export.json for a directory).")
    p.add_argument("model", metavar="DIR_OR_MODEL")
    p.add_argument("--format", "-f", required=True, metavar="FORMAT",
                   help="gguf:TYPE (F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q5_0 Q5_1 Q4_K Q5_K Q6_K Q4_K_M Q5_K_M auto), "
                        "onnx, onnx:int8, onnx:int4, safetensors, safetensors:packed")
    p.add_argument("-o", "--output", required=True, metavar="PATH")
    p.add_argument("--no-verify", action="store_true", help="write only; do not load it back in the runtime")
    p.add_argument("--json", action="store_true", help="print the export record as one JSON document")


def run(args) -> int:
    from shrink.cli.progress import bar_callback
    from shrink.export.run import export
    from shrink.export.verify import VerificationError
    from shrink.recipe.trials import quiet_model_loading

    quiet_model_loading()  # transformers' per-load bars would bury the export's own lines
    bars = bar_callback()
    try:
        record = export(args.model, args.format, args.output, verify=not args.no_verify,
                        progress=lambda done, total: bars("writing tensors", done, total))
    except VerificationError as e:
        print(f"shrink export: verification failed: {e}", file=sys.stderr)
        return 1
    _attach_to_run(args.model, record)
    if args.json:
        json.dump(record, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
        return 0
    print(_summary(record))
    return 0


def _agreement(a: dict, v: dict) -> str:
    """One line for an agreement record of any kind: a causal LM's logits, an encoder's
    embeddings, a classifier's predictions."""
    if "top1_agreement" in a:
        extra = f", greedy {a['greedy_match']}/{v['greedy']['generated']} tokens" if "greedy_match" in a else ""
        return (f"logits rel. RMS error {a['rel_rmse']:.2e}, top-1 agreement {100 * a['top1_agreement']:.1f}% "
                f"over {a['tokens']} tokens{extra}")
    if "min_cosine" in a:
        return f"embedding cosine min {a['min_cosine']:.6f}, hidden-state rel. RMS error {a['rel_rmse']:.2e}"
    if "agreement" in a:
        return (f"logits rel. RMS error {a['rel_rmse']:.2e}, prediction agreement {100 * a['agreement']:.1f}% "
                f"over {a.get('examples', '?')} examples")
    return ", ".join(f"{k} {val}" for k, val in a.items() if isinstance(val, (int, float)))


def _summary(r: dict) -> str:
    lines = [f"{r['path']}: {r['format']}, {r.get('bytes', 0) / 1e6:.2f} MB"]
    if r.get("tensor_types"):
        lines.append(f"tensor types: {', '.join(r['tensor_types'])}; {r.get('carried', 0)} tensors carried "
                     "without re-rounding")
    v = r.get("verification")
    if not v:
        lines.append("not verified (--no-verify)")
        return "\n".join(lines)
    lines.append(f"verified in {v['runtime']}: " + ("PASSED" if v.get("passed") else "FAILED"))
    for key, label in (("vs_stored_weights", "vs the stored weights"), ("vs_shrink_model", "vs shrink's model")):
        a = v.get(key)
        if a:
            lines.append(f"  {label}: {_agreement(a, v)}")
    if v.get("bit_exact") is not None:
        lines.append(f"  {v['tensors']} tensors bit-exact: {v['bit_exact']}")
    lat = v.get("latency") or {}
    if "decode_tokens_per_s" in lat:
        lines.append(f"  runtime speed: prefill {lat['prefill_tokens_per_s']:.0f} tok/s, decode "
                     f"{lat['decode_tokens_per_s']:.0f} tok/s ({lat['threads']} threads)")
    return "\n".join(lines)


def _attach_to_run(model_ref: str, record: dict) -> None:
    """A DIR from compress/search keeps a list of its exports in result.json, and its report shows them."""
    from shrink.fsutil import write_json_atomic

    result = Path(model_ref).expanduser() / "result.json"
    if not result.is_file():
        return
    try:
        doc = json.loads(result.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    summary = {k: record.get(k) for k in ("format", "path", "bytes", "verified", "tensor_types", "carried")}
    v = record.get("verification") or {}
    summary["agreement"] = {k: v[k] for k in ("vs_stored_weights", "vs_shrink_model") if k in v}
    summary["runtime"] = v.get("runtime")
    summary["latency"] = v.get("latency")
    doc["exports"] = [e for e in doc.get("exports", []) if e.get("path") != record["path"]] + [summary]
    write_json_atomic(result, doc)
    try:
        from shrink.report import write_report

        write_report(result.parent)
    except Exception as e:  # the export itself succeeded; a report that fails to redraw is only a warning
        print(f"shrink export: warning: could not redraw {result.parent / 'report.html'}: {e}", file=sys.stderr)
