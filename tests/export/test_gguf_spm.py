"""SentencePiece-style (Llama 2) and Llama 3 tokenizers go into GGUF so that llama.cpp cuts
text into the same token ids as transformers does."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")

from shrink.export.gguf import write_gguf  # noqa: E402
from shrink.export.run import export  # noqa: E402
from shrink.models.gguf_tokenizer import gguf_tokenizer  # noqa: E402

SPECIALS = ["<unk>", "<s>", "</s>"]


def _spm_tokenizer(texts: list[str], merges_wanted: int = 600):
    """A Llama-2-style tokenizer trained on `texts`: <unk> <s> </s>, the 256 byte tokens,
    then BPE pieces over "▁"-joined words; byte fallback; BOS added; the text read whole.
    (transformers' newer Metaspace form does not prepend "▁" to text that starts with a
    space, where SentencePiece and llama.cpp do: the legacy normalizer form is the faithful one.)"""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    learner.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300 + merges_wanted, limit_alphabet=80,
                                                           show_progress=False, special_tokens=SPECIALS))
    learned = learner.get_vocab()
    vocab = {t: i for i, t in enumerate(SPECIALS + [f"<0x{b:02X}>" for b in range(256)])}
    for t, _ in sorted(learned.items(), key=lambda kv: kv[1]):
        vocab.setdefault(t, len(vocab))
    import json

    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)
              for m in json.loads(learner.to_str())["model"]["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    # as transformers writes Llama 2's tokenizer.json: "▁" always prepended, spaces replaced, no pre-tokenizer
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from shrink.data.corpus import stdlib_corpus

    corpus = stdlib_corpus(max_train_chars=200_000, max_heldout_chars=20_000)
    tok = _spm_tokenizer(corpus.train_texts)
    held_out = [line for t in corpus.heldout_texts for line in t.splitlines() if line.strip()]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2)
    d = tmp_path_factory.mktemp("spm") / "llama-spm"
    LlamaForCausalLM(cfg).eval().save_pretrained(d)
    tok.save_pretrained(d)
    return d, tok, held_out


def _runtime(path):
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


def test_llama_cpp_cuts_text_as_transformers_does(spm_dir, tmp_path):
    d, tok, held_out = spm_dir
    rec = export(str(d), "gguf:F32", tmp_path / "spm.gguf", n_tokens=128)
    assert rec["verification"]["passed"]
    assert rec["verification"]["greedy"]["runtime"] == rec["verification"]["greedy"]["shrink_model"]
    runtime = _runtime(tmp_path / "spm.gguf")
    # held-out sentences plus text the vocabulary cannot spell (byte fallback) and odd spacing
    texts = held_out + ["naïve café — 日本語 ☃", "  two  spaces\tand a tab", "x" * 40]
    same = 0
    for text in texts:
        ours = tok(text)["input_ids"]
        theirs = runtime.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        same += ours == theirs
    assert same == len(texts), f"{len(texts) - same} of {len(texts)} texts tokenized differently"
    assert tok("naïve ☃")["input_ids"][0] == 1            # BOS first, as the file says
    assert any(tok.convert_ids_to_tokens(i).startswith("<0x") for i in tok("☃")["input_ids"])


def test_shrink_reads_the_tokenizer_back(spm_dir, tmp_path):
    from shrink.models.io import load_tokenizer

    d, tok, held_out = spm_dir
    write_gguf(__import__("shrink").load(str(d)), load_tokenizer(str(d)), tmp_path / "t.gguf", "F32")
    back = gguf_tokenizer(tmp_path / "t.gguf")
    for text in held_out[:100]:
        assert back(text)["input_ids"] == tok(text)["input_ids"]


def test_the_check_can_fail_scores_matter(spm_dir, tmp_path, monkeypatch):
    """With every score equal (what a converter without merge ranks writes), llama.cpp merges
    in another order and some token ids differ: the comparison above can fail."""
    import shrink.export.gguf_vocab as gv

    d, tok, held_out = spm_dir
    real = gv._merges
    monkeypatch.setattr(gv, "_merges", lambda model: list(reversed(real(model))))
    write_gguf(__import__("shrink").load(str(d)), tok, tmp_path / "bad.gguf", "F32")
    runtime = _runtime(tmp_path / "bad.gguf")
    differ = sum(tok(t)["input_ids"] != runtime.tokenize(t.encode(), add_bos=True, special=False) for t in held_out)
    assert differ > 0


def test_llama3_split_is_named_and_unknown_splits_are_refused(tmp_path):
    import gguf
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from shrink.export.gguf_vocab import _LLAMA3_SPLIT, add_tokenizer

    def byte_level(pre):
        t = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
        t.pre_tokenizer = pre
        return PreTrainedTokenizerFast(tokenizer_object=t)

    llama3 = byte_level(pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]))
    w = gguf.GGUFWriter(tmp_path / "x.gguf", "llama")
    assert add_tokenizer(w, llama3, 3) == "gpt2"
    assert w.kv_data[0]["tokenizer.ggml.pre"].value == "llama-bpe"
    odd = byte_level(pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\d+"), behavior="isolated"),
                                              pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]))
    with pytest.raises(ValueError, match="neither GPT-2's nor Llama 3's split"):
        add_tokenizer(gguf.GGUFWriter(tmp_path / "y.gguf", "llama"), odd, 3)
