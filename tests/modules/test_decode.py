"""greedy_decode: the same tokens as transformers' generate(do_sample=False), with QuantLinear layers too."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from shrink.modules import QuantLinear, greedy_decode
from shrink.modules.decode import intra_op_threads
from shrink.quant import QuantSpec

transformers = pytest.importorskip("transformers")


def _tiny_llama(seed: int = 0):
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, vocab_size=128,
                                   max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None  # generate must not stop or suppress eos: plain greedy
    return model


def _quantize_blocks(model, head_spec=None):
    spec = QuantSpec(bits=4, granularity="group", group_size=32)  # hidden 64: groups of 32
    for block in model.model.layers:
        for parent in block.modules():
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, QuantLinear.from_linear(child, spec))
    if head_spec is not None:
        model.lm_head = QuantLinear.from_linear(model.lm_head, head_spec)
    return model


def _generate(model, ids, n):
    with torch.inference_mode():
        return model.generate(ids, max_new_tokens=n, do_sample=False, use_cache=True,
                              pad_token_id=0)


@pytest.mark.parametrize("variant", ["fp32", "int4", "int4+int8 head", "int4 bf16"])
def test_same_tokens_as_generate(variant):
    model = _tiny_llama()
    if variant != "fp32":
        model = _quantize_blocks(model, QuantSpec(bits=8) if "head" in variant else None)
        assert sum(isinstance(m, QuantLinear) and m.kernel != "reference" for m in model.modules()) >= 14
    if "bf16" in variant:
        model = model.to(torch.bfloat16)
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(1))
    res = greedy_decode(model, ids, 12)
    assert res.tokens.shape == (1, 17) and res.new_tokens == 12 and res.prompt_tokens == 5
    assert torch.equal(res.tokens, _generate(model, ids, 12))
    assert res.tokens_per_s > 0 and res.prefill_s > 0


def test_batch_and_eos_and_threads_restored():
    model = _tiny_llama(seed=3)
    ids = torch.randint(0, 128, (2, 4), generator=torch.Generator().manual_seed(2))
    before = torch.get_num_threads()
    res = greedy_decode(model, ids, 6, threads=1)
    assert torch.get_num_threads() == before
    assert torch.equal(res.tokens, _generate(model, ids, 6))
    first = int(res.tokens[0, 4])
    one = greedy_decode(model, ids[:1], 6, eos_token_id=first)
    assert one.new_tokens == 1 and torch.equal(one.tokens, res.tokens[:1, :5])


def test_bad_arguments():
    model = _tiny_llama()
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_decode(model, torch.zeros(1, 3, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="input_ids"):
        greedy_decode(model, torch.zeros(3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="threads"):
        with intra_op_threads(0):
            pass
