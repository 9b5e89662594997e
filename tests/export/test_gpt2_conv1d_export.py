"""A GPT-2 whose Conv1D projections were quantized or pruned exports as Conv1D again, so
transformers loads the checkpoint and computes what shrink's model computes (it once
wrote [out, in] Linear weights under Conv1D names: refused when not square, transposed
silently when square)."""
from __future__ import annotations

import torch

import shrink
from shrink.export.dense import plain_copy
from tests_support import tiny_gpt2


def test_quantized_and_pruned_gpt2_reload_in_transformers(tmp_path):
    from transformers import GPT2LMHeadModel

    model = tiny_gpt2()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    for i, recipe in enumerate(([{"rtn": {"bits": 8, "group_size": None, "symmetric": True}}],
                                [{"prune": {"method": "magnitude", "sparsity": 0.5}}])):
        res = shrink.compress(model, recipe, measure_speed=False)
        plain = plain_copy(res.model)
        assert type(plain.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
        assert type(plain.transformer.h[0].mlp.c_proj).__name__ == "Conv1D"
        plain.save_pretrained(tmp_path / f"hf{i}")
        back = GPT2LMHeadModel.from_pretrained(tmp_path / f"hf{i}").eval()
        with torch.no_grad():
            want = plain(ids).logits
            got = back(ids).logits
            ref = res.model(ids).logits
        assert torch.allclose(got, want, atol=1e-5)
        assert torch.allclose(got, ref, atol=5e-2)   # int8's kernel computes in bf16
