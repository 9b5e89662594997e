"""Helpers shared by test modules (importable: tests/ is on sys.path via conftest)."""
from __future__ import annotations

import importlib
import inspect

MODULES = ["json", "argparse", "collections", "functools", "itertools", "pathlib", "shutil",
           "textwrap", "logging", "csv", "heapq", "bisect", "difflib", "statistics", "fractions", "string"]


def stdlib_sentences(n: int = 48) -> list[str]:
    out: list[str] = []
    for name in MODULES:
        mod = importlib.import_module(name)
        for _, obj in inspect.getmembers(mod):
            doc = inspect.getdoc(obj) if (inspect.isfunction(obj) or inspect.isclass(obj)) else None
            if doc:
                line = " ".join(doc.split())[:300]
                if len(line) > 40 and line not in out:
                    out.append(line)
            if len(out) >= n:
                return out
    return out


# Small transformers models of the three architectures shrink's surgery handles (seeded, random weights).

def n_params(m) -> int:
    return sum(p.numel() for p in m.parameters())


def tiny_llama(**kw):
    import torch
    import transformers

    cfg = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, bos_token_id=0, eos_token_id=1, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**cfg, **kw})).eval()


def cached_forward_logits(model, ids, new_tokens):
    """Teacher-forced last-position logits [b, new_tokens, vocab] of a transformers causal LM:
    the prompt ids[:, :-new_tokens], then one token at a time with a DynamicCache."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    out = [model(input_ids=ids[:, :-new_tokens], past_key_values=cache, use_cache=True).logits[:, -1:]]
    for i in range(ids.shape[1] - new_tokens, ids.shape[1] - 1):
        out.append(model(input_ids=ids[:, i:i + 1], past_key_values=cache, use_cache=True).logits)
    return torch.cat(out, 1)


def stepper_logits(model, ids, new_tokens, compile=False):
    """The same chain through shrink's LlamaStepper (compile: its compiled one-token step)."""
    import torch

    from shrink.modules.llama_stepper import LlamaStepper

    st = LlamaStepper(model, ids.shape[0], ids.shape[1], compile=compile)
    out = [st.step(ids[:, :-new_tokens])]
    for i in range(ids.shape[1] - new_tokens, ids.shape[1] - 1):
        out.append(st.step(ids[:, i:i + 1]))
    return torch.cat(out, 1)


def tiny_gpt2(**kw):
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=3, n_head=4, n_positions=64,
                                  bos_token_id=0, eos_token_id=1, **kw)
    return transformers.GPT2LMHeadModel(cfg).eval()


def tiny_bert(**kw):
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                  intermediate_size=48, **kw)
    return transformers.BertModel(cfg).eval()


# result.json fields that are timings or derived from them: they differ run to run.
TIMING = {"seconds", "latency_ms", "latency", "energy", "L", "E"}


def strip_timings(doc):
    """result.json without the timing fields, for comparing two runs."""
    if isinstance(doc, dict):
        return {k: strip_timings(v) for k, v in doc.items() if k not in TIMING}
    if isinstance(doc, list):
        return [strip_timings(v) for v in doc]
    return doc
