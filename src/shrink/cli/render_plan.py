"""Draw a Plan for people: a rich table, the recommendation, and (with --explain)
every figure's arithmetic, grouped by format."""
from __future__ import annotations

import re

from rich.console import Console
from rich.table import Table
from rich.text import Text


def render(plan, explain: bool = False, console: Console | None = None) -> None:
    con = console or Console(highlight=False, markup=False, width=max(110, Console().width))
    m, dev = plan.model, plan.device
    con.print(Text.assemble((m.name, "bold"), f": {m.params:,} parameters ({m.source})"))
    if dev is not None:
        mem = f"{dev.memory_bytes / 2**30:,.1f} GiB" if dev.memory_bytes else "memory unknown"
        bw = f"{dev.bandwidth_bytes_per_s / 1e9:,.0f} GB/s" if dev.bandwidth_bytes_per_s else "bandwidth unknown"
        con.print(Text.assemble("device ", (dev.name, "bold"), f" ({dev.tier}): {mem}, {bw}"))
    con.print(f"context {plan.context:,} x batch {plan.batch}, KV cache in {plan.kv_format}")
    con.print()

    t = Table(show_edge=False, header_style="bold")
    for col in ("format", "bits/w", "weights GB", "KV GB", "total GB", "fits", "tok/s <=", "x fp16", "bound"):
        t.add_column(col, justify="left" if col in ("format", "fits", "bound") else "right")
    for f in plan.formats:
        fits = Text("-") if f.fits is None else (Text("yes", "green") if f.fits else Text("no", "red"))
        tps = "-" if f.decode_tokens_per_s_bound is None else f"{f.decode_tokens_per_s_bound:,.1f}"
        t.add_row(f.name, f"{f.bits_per_weight:.2f}", _gb(f.weight_bytes), _gb(f.kv_cache_bytes),
                  _gb(f.total_bytes), fits, tps, f"{f.compression_vs_fp16:.2f}", f.bound or "-")
    con.print(t)
    if plan.usable_bytes is not None:
        con.print(f"\ntotal = weights + KV cache + activations ({_gb(plan.activation_bytes)} GB); "
                  f"usable = 90% of device memory = {_gb(plan.usable_bytes)} GB")
    job = getattr(plan, "job_memory", None)
    if job is not None:
        streamed = ("it cannot be streamed" if job["streamed_bytes"] is None
                    else f"{job['streamed_bytes'] / 2**30:,.2f} GiB streamed block by block")
        con.print(f"\ncompressing it ({job['recipe']}) needs about {job['in_memory_bytes'] / 2**30:,.2f} GiB "
                  f"in memory, {streamed}")
    rec = plan.recommendation
    if rec is not None:
        con.print()
        con.print(Text.assemble(("Recommendation: ", "bold"), f"{rec['format']} via recipe ",
                                (rec["recipe"], "bold")))
        for reason in rec["why"]:
            con.print(f"  - {reason}")
    elif dev is None:
        con.print("\n(no --device: give one for fit, speed bounds and a recommendation)")
    if explain:
        _explain(plan, con)


def _explain(plan, con: Console) -> None:
    con.print()
    con.print(Text("How each figure is derived", "bold"))
    per_format: dict[str, list[tuple[str, str]]] = {}
    for key, text in plan.derivations.items():
        m = re.fullmatch(r"(.+)\[(.+)\]", key)
        if m:
            per_format.setdefault(m.group(2), []).append((m.group(1), text))
        else:
            con.print(Text.assemble((f"{key}: ", "cyan"), text))
    for fmt, lines in per_format.items():
        con.print(Text(f"\n{fmt}", "bold"))
        for key, text in lines:
            con.print(Text.assemble((f"  {key}: ", "cyan"), text))


def _gb(n: int) -> str:
    return f"{n / 1e9:,.2f}"
