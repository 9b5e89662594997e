"""The evidence of a training step in a report (finetune, qat, distill, lora, early_exit, a
low-rank fine-tune): the loss curve, the evaluations between epochs, early stopping,
mixed precision and resumption."""
from __future__ import annotations

from .plots import Plot
from .svg import PALETTE, Chart, PlotSkipped, circle, downsample, esc, finite, polyline
from .text import figure, num


def loss_curve(tr: dict) -> Plot:
    curve = [v for v in tr.get("curve") or [] if finite(v)]
    if len(curve) < 2:
        raise PlotSkipped("fewer than two loss values recorded")
    run = tr.get("steps_run") or tr.get("steps") or len(curve)
    every = max(1.0, run / len(curve))
    xs = [1 + i * every for i in range(len(curve))]
    lo, hi = min(curve), max(curve)
    c = Chart(f"Training loss ({tr.get('loss', 'loss')})", height=260)
    x, y = c.xscale(1, max(xs[-1], 2)), c.yscale(min(0.0, lo), hi if hi > lo else lo + 1)
    c.axes(x, y, xlabel="optimizer step", ylabel="loss")
    idx = downsample(curve, 400)
    c.marks.append(polyline([(x(xs[i]), y(curve[i])) for i in idx], PALETTE[0], tip="training loss"))
    c.add_legend("loss", PALETTE[0], "line")
    return Plot("training-loss", c.svg(), "The loss at each recorded optimizer step (every "
                f"{every:.0f} step{'s' if every >= 2 else ''}).")


def training_details(details) -> str:
    if not isinstance(details, dict) or not isinstance(details.get("training"), dict):
        return ""
    tr = details["training"]
    facts = [f"{esc(tr.get('steps_run', tr.get('steps', '?')))} of {esc(tr.get('steps', '?'))} steps",
             f"loss {esc(tr.get('loss', '?'))} {num(tr.get('loss_first'))} \u2192 {num(tr.get('loss_last'))}",
             f"lr {esc(tr.get('lr', '?'))}", f"precision {esc(tr.get('precision', 'fp32'))}"]
    if finite(tr.get("seconds")):
        facts.append(f"{tr['seconds']:.1f} s")
    if tr.get("skipped_steps"):
        facts.append(f"{tr['skipped_steps']} fp16 steps skipped (gradient overflow)")
    if tr.get("stopped_early"):
        facts.append(f"stopped early; best weights from step {esc(tr.get('best_step'))} kept")
    if tr.get("resumed_from") is not None:
        facts.append(f"resumed from a checkpoint at step {esc(tr['resumed_from'])}")
    out = ["<p>Training: " + "; ".join(facts) + ".</p>", figure("training-loss", loss_curve, tr)]
    evals = [e for e in tr.get("evaluations") or [] if isinstance(e, dict)]
    if evals:
        out.append("<p>Evaluations: " + ", ".join(f"step {esc(e.get('step'))}: {num(e.get('value'))}"
                                                  for e in evals[:40]) + "</p>")
    return "\n".join(out)
