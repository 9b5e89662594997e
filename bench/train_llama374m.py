"""Briefly train issue 9's 374M Llama, so the peer comparison runs on structured weights.

    .venv/bin/python bench/train_llama374m.py [--steps 120] [--work DIR]

A random-init model is a poor ground for comparing quantizers: its blocks amplify any
error chaotically and the embeddings of tokens never seen in calibration point in random
directions, so the held-out KL of a 4-bit model swings with the calibration order by more
than the gap between tools. The issue allows "random or briefly trained" weights; this
script makes the second kind, deterministically, on this CPU:

- data: the Python standard library's train modules (shrink.data.corpus), words and
  punctuation hashed into the 32000-id vocabulary, as in bench_peers_gptq.py (the held-out
  modules used for scoring are never seen);
- from bench/llama374m.build(0), AdamW (betas 0.9/0.95, weight decay 0.1), peak lr 6e-4
  after 10 warm-up steps, cosine to 10%, gradient clipping 1.0, bf16 autocast, batches of
  8 x 128 tokens drawn with a fixed seed;
- ~12 s a step on 2 cores: 120 steps (123k tokens) take about 25 minutes.

The result is saved as a Hugging Face directory (written to a temporary name, then renamed)
with train_log.json (loss per step, held-out loss before and after).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import llama374m  # noqa: E402
from bench_peers_gptq import PEERS, word_hash_ids  # noqa: E402


def lr_at(step: int, steps: int, peak: float, warmup: int = 10) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def heldout_loss(model, windows: torch.Tensor) -> float:
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    model.train()
    return sum(losses) / len(losses)


def trained_dir(work: Path, steps: int) -> Path:
    return work / f"llama374m-seed0-trained{steps}"


def train(work: Path, steps: int, batch: int = 8, seq: int = 128, peak_lr: float = 6e-4) -> Path:
    from shrink.data.calibration import calibration_texts

    out = trained_dir(work, steps)
    if (out / "config.json").is_file():
        return out
    stream = word_hash_ids(calibration_texts("stdlib", max_chars=60 * steps * batch * seq))
    held = word_hash_ids(calibration_texts("stdlib:heldout", max_chars=40 * 8 * seq))
    windows = stream[: stream.numel() // seq * seq].view(-1, seq)
    held_w = held[: 8 * seq].view(8, seq)
    if windows.shape[0] < steps * batch:
        raise ValueError(f"only {windows.shape[0]} windows of {seq} tokens for {steps} x {batch}")
    order = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(0))
    model = llama374m.build(0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=peak_lr, betas=(0.9, 0.95), weight_decay=0.1)
    log = {"steps": steps, "batch": batch, "seq": seq, "peak_lr": peak_lr, "threads": torch.get_num_threads(),
           "heldout_loss_before": heldout_loss(model, held_w), "loss": []}
    t0 = time.perf_counter()
    for step in range(steps):
        x = windows[order[step * batch:(step + 1) * batch]]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, peak_lr)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        log["loss"].append(round(loss.item(), 4))
        print(f"step {step + 1}/{steps} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    log["seconds"] = time.perf_counter() - t0
    log["heldout_loss_after"] = heldout_loss(model, held_w)
    print(f"held-out loss {log['heldout_loss_before']:.3f} -> {log['heldout_loss_after']:.3f}", flush=True)
    model.eval()
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    (tmp / "train_log.json").write_text(json.dumps(log, indent=1))
    tmp.rename(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--work", default=str(PEERS / "work"))
    args = ap.parse_args()
    print(train(Path(args.work), args.steps))


if __name__ == "__main__":
    main()
