"""The evidence of pruning and training steps in a report: what structured pruning removed,
the rounds of iterative pruning and of the lottery ticket, and the ticket's control."""
from __future__ import annotations

from .svg import esc, finite
from .text import num, table


def _quality(entry) -> str:
    q = entry.get("quality") if isinstance(entry, dict) else None
    return num(q.get("value")) if isinstance(q, dict) else "\u2014"


def pruning_details(details) -> str:
    if not isinstance(details, dict):
        return ""
    out = []
    before, after = details.get("params_before"), details.get("params_after")
    if finite(before) and finite(after) and before:
        out.append(f"<p>Parameters {int(before):,} \u2192 {int(after):,} ({100 * (1 - after / before):.1f}% removed: "
                   "the tensors are smaller, the model runs as a smaller dense model).</p>")
    removed = [r for r in details.get("removed") or [] if isinstance(r, dict)]
    if removed:
        rows = [[str(r.get("group", r.get("layer", "?"))), str(r.get("kind", "layer")),
                 str(r.get("width", r.get("units", "\u2014"))), str(r.get("kept", "removed"))] for r in removed]
        out.append("<details><summary>Removed units</summary>"
                   + table(["group", "unit", "before", "kept"], rows, "num") + "</details>")
    cfg = details.get("config")
    if isinstance(cfg, dict) and "config_loadable" in cfg:
        verdict = "transformers can load it from its config alone" if cfg["config_loadable"] else \
            "shrink's own directory records the shapes; a plain transformers config cannot"
        out.append(f"<p>Config: {esc(verdict)} ({esc(cfg.get('reason', ''))}).</p>")
    rounds = [r for r in details.get("rounds") or [] if isinstance(r, dict)]
    if rounds:
        rows = [[str(r.get("round")), num(100 * r["sparsity"], ".1f") if finite(r.get("sparsity")) else "\u2014",
                 num((r.get("training") or {}).get("loss_last")), _quality(r)] for r in rounds]
        out.append("<p>Rounds:</p>" + table(["round", "sparsity %", "training loss (end)", "quality"], rows, "num"))
    control = details.get("control")
    if isinstance(control, dict) and rounds:
        out.append(f"<p>Lottery ticket {_quality(rounds[-1])} against its control ({esc(control.get('what', ''))}): "
                   f"{_quality(control)}; {esc(details.get('training_steps', '?'))} training steps for the ticket.</p>")
    return "\n".join(out)
