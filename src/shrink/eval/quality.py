"""Quality metrics as callables `metric(model) -> {"name", "value", "higher_is_better", ...}`,
built once from the reference model and held-out data so that every candidate is
scored on the same inputs.

- causal LMs: perplexity on held-out text;
- encoders: embedding fidelity to the original model, the mean cosine of
  mean-pooled embeddings and top-1 neighbour agreement;
- classifiers: accuracy on a held-out split.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from shrink.data.corpus import sentences_from  # noqa: F401  (re-exported: held-out sentences for metrics)

Metric = Callable[[nn.Module], dict]


def perplexity_metric(tokenizer, texts: Sequence[str], seq_len: int = 256, max_tokens: int = 16384) -> Metric:
    from shrink.data.calibration import token_stream
    from shrink.models.tiny_gpt import stream_perplexity

    stream = token_stream(tokenizer, list(texts))

    def metric(model: nn.Module) -> dict:
        with torch.no_grad():
            ppl = stream_perplexity(model, stream, seq_len, max_tokens)
        return {"name": "perplexity", "value": ppl, "higher_is_better": False,
                "tokens": min(max_tokens, stream.numel())}

    return metric


def embedding_metric(reference: nn.Module, tokenizer, sentences: Sequence[str], max_length: int = 128) -> Metric:
    batch = dict(tokenizer(list(sentences), padding=True, truncation=True, max_length=max_length,
                           return_tensors="pt"))

    def embed(model: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return (hidden * mask).sum(1) / mask.sum(1)

    ref = embed(reference)
    ref_n = torch.nn.functional.normalize(ref, dim=-1)
    ref_top = _neighbours(ref_n)

    def metric(model: nn.Module) -> dict:
        e = torch.nn.functional.normalize(embed(model), dim=-1)
        cos = float((e * ref_n).sum(-1).mean())
        agree = float((_neighbours(e) == ref_top).float().mean())
        return {"name": "embedding cosine", "value": cos, "higher_is_better": True,
                "top1_neighbour_agreement": agree, "sentences": len(sentences)}

    return metric


def accuracy_metric(x: torch.Tensor, y: torch.Tensor) -> Metric:
    def metric(model: nn.Module) -> dict:
        with torch.no_grad():
            pred = model(x).argmax(-1)
        return {"name": "accuracy", "value": float((pred == y).float().mean()), "higher_is_better": True,
                "examples": int(y.numel())}

    return metric


def _neighbours(e: torch.Tensor) -> torch.Tensor:
    sim = e @ e.T
    sim.fill_diagonal_(-2.0)
    return sim.argmax(-1)


    return out
