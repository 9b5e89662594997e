"""Built-in models (tiny-gpt, digits-mlp, digits-cnn, minilm) and shrink.load.

tiny-gpt is trained once per machine (a few minutes on 2 cores) and cached in
$SHRINK_CACHE or ~/.cache/shrink; every later run loads it in a second.
"""
from __future__ import annotations

import json
import math
import threading
import time

import pytest
import torch

import shrink
from shrink.data.calibration import token_stream
from shrink.data.corpus import stdlib_corpus
from shrink.models import load, load_tokenizer, models_cache
from shrink.models.digits import (
    DIGITS_NAMES, DigitsConfig, accuracy, digits_data, digits_dir, load_digits_model, train_digits,
)
from shrink.models.io import build_cached
from shrink.models.tiny_gpt import TinyGPTConfig, load_tiny_gpt, perplexity, save, tiny_gpt_dir, train

transformers = pytest.importorskip("transformers")

SMALL = TinyGPTConfig(
    vocab_size=512, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, context=64,
    batch_size=4, steps=20, warmup_steps=5, max_train_chars=200_000, eval_tokens=2048,
)
PROBE = "def add(a, b):\n    return a + b\n\n\nclass Stack:\n    def push(self, item):\n"


@pytest.fixture(scope="session", autouse=True)
def offline():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="session")
def tiny_gpt(offline):
    """(model, tokenizer, directory) of the real tiny-gpt: trained on first use, then cached."""
    model, tokenizer = load_tiny_gpt()
    return model, tokenizer, tiny_gpt_dir()


def logits(model, tokenizer, text=PROBE) -> torch.Tensor:
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits


# ----------------------------------------------------------------------------- tiny-gpt

# The first test to ask for `tiny_gpt` pays for its training on a fresh machine: more
# than pytest's default per-test limit where the cores are shared with other work.
TRAINING_TIMEOUT = pytest.mark.timeout(1800)


@pytest.mark.slow  # trains the full tiny-gpt on first use (minutes on 2 cores): make bench
@TRAINING_TIMEOUT
def test_tiny_gpt_is_far_better_than_the_baselines(tiny_gpt):
    model, tok, directory = tiny_gpt
    record = json.loads((directory / "training.json").read_text())
    vocab = len(tok)
    assert vocab == record["uniform_perplexity"] == 4096
    for field in ("steps", "seconds", "final_train_loss", "heldout_perplexity", "unigram_perplexity"):
        assert field in record

    corpus = stdlib_corpus(max_train_chars=2_000_000, max_heldout_chars=200_000)
    heldout = token_stream(tok, corpus.heldout_texts)[:16384]
    ppl = perplexity(model, tok, corpus.heldout_texts, seq_len=256, max_tokens=16384)
    # a unigram model of the train split, add-one smoothed, on the same held-out tokens
    counts = torch.bincount(token_stream(tok, corpus.train_texts), minlength=vocab).double() + 1
    unigram = math.exp(-(counts / counts.sum()).log()[heldout].mean().item())
    assert ppl < vocab / 20, (ppl, vocab)
    assert ppl < 0.5 * unigram, (ppl, unigram)
    assert record["heldout_perplexity"] < 0.5 * record["unigram_perplexity"]
    assert record["final_train_loss"] < record["first_train_loss"] - 2.0


@pytest.mark.slow
@TRAINING_TIMEOUT
def test_tiny_gpt_reloads_bit_exactly(tiny_gpt):
    model, tok, directory = tiny_gpt
    again = shrink.load("tiny-gpt")
    assert type(again).__name__ == "LlamaForCausalLM" and not again.training
    assert torch.equal(logits(model, tok), logits(again, tok))
    assert load_tokenizer("tiny-gpt").backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    assert directory.parent == models_cache() and directory.name.startswith("tiny-gpt-")


def test_training_is_deterministic_and_the_saved_model_is_exact(tmp_path):
    a = train(SMALL)
    steps = []
    directory = tiny_gpt_dir(SMALL, cache_dir=tmp_path, progress=steps.append)   # a second training
    assert steps == list(range(1, SMALL.steps + 1))
    assert directory == tmp_path / "models" / f"tiny-gpt-{SMALL.key()}"
    b, tok_b = load_tiny_gpt(SMALL, cache_dir=tmp_path)
    sa, sb = a.model.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.tokenizer.backend_tokenizer.to_str() == tok_b.backend_tokenizer.to_str()
    assert torch.equal(logits(a.model, a.tokenizer), logits(b, tok_b))
    assert a.record["final_train_loss"] < a.record["first_train_loss"]
    # cached: no second training, and no temporary directories left behind
    steps.clear()
    assert tiny_gpt_dir(SMALL, cache_dir=tmp_path, progress=steps.append) == directory and steps == []
    assert [p.name for p in (tmp_path / "models").iterdir() if p.is_dir()] == [directory.name]
    # a different seed is a different model in a different place
    assert TinyGPTConfig(seed=1).key() != TinyGPTConfig().key()
    # save() writes what from_pretrained reads
    save(a, tmp_path / "copy")
    assert torch.equal(logits(load(tmp_path / "copy"), a.tokenizer), logits(a.model, a.tokenizer))


def test_training_leaves_the_callers_torch_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_digits(DigitsConfig(epochs=1))
    assert torch.equal(torch.rand(3), expected)
    assert not torch.are_deterministic_algorithms_enabled()


def test_config_validation():
    with pytest.raises(ValueError, match="hidden_size 100 is not divisible by num_heads 3"):
        TinyGPTConfig(hidden_size=100, num_heads=3)
    with pytest.raises(ValueError, match="steps"):
        TinyGPTConfig(steps=0)
    with pytest.raises(ValueError, match="name"):
        DigitsConfig(name="digits-rnn")


# ----------------------------------------------------------------------------- the cache

def test_a_failed_build_leaves_nothing(tmp_path):
    final = tmp_path / "models" / "thing-1"

    def broken(tmp):
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        build_cached(final, ("done",), broken)
    assert not final.exists()
    assert not list((tmp_path / "models").glob(".thing-1.*.tmp"))
    assert build_cached(final, ("done",), lambda tmp: (tmp / "done").write_text("ok")) == final
    assert (final / "done").read_text() == "ok"


def test_concurrent_builds_train_once(tmp_path):
    final = tmp_path / "models" / "thing-2"
    builds = []

    def slow(tmp):
        builds.append(1)
        time.sleep(0.3)
        (tmp / "done").write_text("ok")

    threads = [threading.Thread(target=build_cached, args=(final, ("done",), slow)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert builds == [1] and (final / "done").is_file()


def test_shrink_cache_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("SHRINK_CACHE", str(tmp_path))
    assert models_cache() == tmp_path / "models"


# ----------------------------------------------------------------------------- digits

def test_digits_split_is_fixed_and_stratified():
    a, b = digits_data(), digits_data()
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_train, b.y_train)
    assert a.x_train.shape == (1347, 64) and a.x_test.shape == (450, 64)
    assert float(a.x_train.min()) == 0.0 and float(a.x_train.max()) == 1.0
    # stratified: each class is a quarter of its images in the test split
    per_class = torch.bincount(torch.cat([a.y_train, a.y_test]))
    assert ((torch.bincount(a.y_test) - per_class * 0.25).abs() <= 1).all()
    assert not torch.equal(digits_data(seed=1).y_test, a.y_test)


@pytest.mark.parametrize("name", DIGITS_NAMES)
def test_digits_models_are_accurate(name):
    model = load_digits_model(name)
    data = digits_data()
    acc = accuracy(model, data.x_test, data.y_test)
    assert acc >= 0.95, (name, acc)
    record = json.loads((digits_dir(name) / "training.json").read_text())
    assert record["test_accuracy"] == pytest.approx(acc, abs=1e-4)
    assert record["seconds"] > 0
    assert not model.training


# ----------------------------------------------------------------------------- shrink.load

@pytest.mark.parametrize("name", ["minilm", pytest.param("tiny-gpt", marks=[pytest.mark.slow, TRAINING_TIMEOUT]),
                                  "digits-mlp", "digits-cnn"])
def test_load_every_builtin(name, request):
    if name == "tiny-gpt":
        request.getfixturevalue("tiny_gpt")      # trained (or found) once for the session
    model = shrink.load(name)
    assert isinstance(model, torch.nn.Module) and not model.training
    if name == "minilm":
        tok = load_tokenizer("minilm")
        out = model(**tok(["a sentence to embed"], return_tensors="pt"))
        assert out.last_hidden_state.shape[-1] == 384


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_load_hf_directory_and_weights_files(tmp_path):
    model = tiny_llama()
    ids = torch.arange(10).view(1, 10)
    expected = model(input_ids=ids).logits
    model.save_pretrained(str(tmp_path / "llama"))
    loaded = shrink.load(tmp_path / "llama")
    assert type(loaded).__name__ == "LlamaForCausalLM" and not loaded.training
    assert torch.equal(loaded(input_ids=ids).logits, expected)

    # a .safetensors file with a config.json beside it, under any name
    (tmp_path / "st").mkdir()
    (tmp_path / "st" / "config.json").write_bytes((tmp_path / "llama" / "config.json").read_bytes())
    (tmp_path / "st" / "weights.safetensors").write_bytes((tmp_path / "llama" / "model.safetensors").read_bytes())
    assert torch.equal(shrink.load(tmp_path / "st" / "weights.safetensors")(input_ids=ids).logits, expected)

    # a pickled state dict: read with weights_only=True
    torch.save(model.state_dict(), tmp_path / "st" / "weights.pt")
    assert torch.equal(shrink.load(str(tmp_path / "st" / "weights.pt"))(input_ids=ids).logits, expected)

    # weights that do not fit the config: named, not half-loaded
    state = {k: v for k, v in model.state_dict().items() if k != "model.norm.weight"}
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "st" / "partial.safetensors"))
    with pytest.raises(ValueError, match=r"partial.safetensors: weights do not match .*model.norm.weight"):
        shrink.load(tmp_path / "st" / "partial.safetensors")

    # a BERT encoder keeps its class
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    bert.save_pretrained(str(tmp_path / "bert"))
    assert type(shrink.load(tmp_path / "bert")).__name__ == "BertModel"


class NotWeights:
    pass


def test_pickles_are_not_unpickled(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    torch.save({"x": NotWeights()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="evil.pt: the checkpoint needs arbitrary Python objects.*convert it to safetensors"):
        shrink.load(tmp_path / "evil.pt")


def test_load_digits_by_path():
    directory = digits_dir("digits-cnn")
    data = digits_data()
    for target in (directory, directory / "model.safetensors"):
        model = shrink.load(target)
        assert accuracy(model, data.x_test, data.y_test) >= 0.95


@pytest.mark.parametrize("name, suggestion", [("tiny-gtp", "tiny-gpt"), ("digits_cnn", "digits-cnn"),
                                              ("MiniLM", "minilm")])
def test_unknown_names_suggest_the_closest(name, suggestion):
    with pytest.raises(FileNotFoundError, match=f"did you mean '{suggestion}'") as e:
        shrink.load(name)
    assert "minilm, tiny-gpt, digits-mlp, digits-cnn" in str(e.value) and repr(name) in str(e.value)


def test_bad_paths_say_what_is_wrong(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(ValueError, match=r"notes.txt.*unsupported file type \.txt"):
        shrink.load(notes)
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(FileNotFoundError, match="needs a config.json beside it"):
        shrink.load(tmp_path / "w" / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="needs a config.json"):
        shrink.load(tmp_path / "w")
    (tmp_path / "w" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not a valid JSON config"):
        shrink.load(tmp_path / "w")
    (tmp_path / "w" / "config.json").write_text(json.dumps({"shrink_model": "digits-mlp", "hidden": [128, 64]}))
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        shrink.load(tmp_path / "w")
    (tmp_path / "w" / "config.json").write_text(json.dumps({"shrink_model": "digits-gru"}))
    with pytest.raises(ValueError, match="unknown shrink_model 'digits-gru'"):
        shrink.load(tmp_path / "w")
    with pytest.raises(TypeError):
        shrink.load(123)


def test_load_tokenizer():
    assert load_tokenizer("minilm")("hello")["input_ids"][0] == 101
    with pytest.raises(ValueError, match="no tokenizer"):
        load_tokenizer("digits-mlp")
    with pytest.raises(FileNotFoundError, match="did you mean 'minilm'"):
        load_tokenizer("minilmm")


def test_public_names():
    assert shrink.load is load
    assert callable(shrink.plan)          # the lazy `plan` still works beside `load`
    with pytest.raises(AttributeError):
        shrink.no_such_name  # noqa: B018
