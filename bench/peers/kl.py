"""KL(float || quantized) per token, averaged over held-out sequences.

Plain torch + a transformers-style causal LM (model(ids).logits): shared by
bench_peers_gptq.py (shrink's venv) and the peer runners (their own venvs), so
every tool is scored by the same lines.
"""
from __future__ import annotations

import torch


def _device(model) -> torch.device:
    return next(model.parameters()).device


def reference_logprobs(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """log-softmax of the model's logits for each row of ids [n, seq] (float32 on the CPU, [seq, vocab] each)."""
    out = []
    with torch.no_grad():
        for row in ids:
            out.append(model(row[None].to(_device(model))).logits[0].float().log_softmax(-1).cpu())
    return out


def mean_kl(model, ids: torch.Tensor, ref: list[torch.Tensor]) -> float:
    """sum_v p(v) (log p(v) - log q(v)), p the reference, q this model, averaged over every token."""
    total, count = 0.0, 0
    with torch.no_grad():
        for row, lp in zip(ids, ref):
            lq = model(row[None].to(_device(model))).logits[0].float().log_softmax(-1).cpu()
            total += float((lp.exp() * (lp - lq)).sum(-1).sum(dtype=torch.float64))
            count += lp.shape[0]
    return total / count


def mean_entropy(ref: list[torch.Tensor]) -> float:
    """Mean entropy (nats) of the reference's next-token distributions."""
    return float(sum(-(lp.exp() * lp).sum(-1).sum(dtype=torch.float64) for lp in ref)
                 / sum(lp.shape[0] for lp in ref))
