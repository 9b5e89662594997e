"""Calibration batches: every source, exact shapes, seeded selection, clear errors."""
from __future__ import annotations

import json

import pytest
import torch

from shrink.data.calibration import (
    calibration_batches, calibration_texts, pack, read_jsonl, separator_id, token_ids, token_stream,
)


def byte_tokenizer(text: str) -> list[int]:
    """A callable tokenizer: one id per UTF-8 byte."""
    return list(text.encode())


SENTENCES = [f"Sentence number {i} says something about compression." for i in range(40)]


def is_window_of(row: torch.Tensor, stream: torch.Tensor) -> bool:
    """`row` is a contiguous, window-aligned slice of `stream`."""
    n = row.numel()
    return any(torch.equal(row, stream[i:i + n]) for i in range(0, stream.numel() - n + 1, n))


def test_sentences_shapes_and_windows():
    batch = calibration_batches(SENTENCES, byte_tokenizer, n_samples=8, seq_len=32, seed=0)
    assert batch.shape == (8, 32) and batch.dtype == torch.int64
    stream = token_stream(byte_tokenizer, SENTENCES)
    assert all(is_window_of(row, stream) for row in batch)
    assert len({tuple(r.tolist()) for r in batch}) == 8     # drawn without replacement


def test_same_seed_same_batches_other_seed_others():
    a = calibration_batches(SENTENCES, byte_tokenizer, n_samples=8, seq_len=32, seed=3)
    b = calibration_batches(SENTENCES, byte_tokenizer, n_samples=8, seq_len=32, seed=3)
    c = calibration_batches(SENTENCES, byte_tokenizer, n_samples=8, seq_len=32, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_too_little_text_says_how_much_is_needed():
    stream_len = token_stream(byte_tokenizer, SENTENCES[:2]).numel()
    with pytest.raises(ValueError, match=rf"needs 640 tokens \(10 samples x 64\), found {stream_len}"):
        calibration_batches(SENTENCES[:2], byte_tokenizer, n_samples=10, seq_len=64)
    with pytest.raises(ValueError, match="needs 64 tokens"):
        calibration_batches([], byte_tokenizer, n_samples=1, seq_len=64)
    with pytest.raises(ValueError, match=">= 1"):
        calibration_batches(SENTENCES, byte_tokenizer, n_samples=0)


def test_text_file_and_jsonl(tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("".join(s + "\n" for s in SENTENCES), encoding="utf-8")
    batch = calibration_batches(txt, byte_tokenizer, n_samples=4, seq_len=64, seed=1)
    assert batch.shape == (4, 64)
    assert calibration_batches(str(txt), byte_tokenizer, n_samples=4, seq_len=64, seed=1).equal(batch)

    jl = tmp_path / "data.jsonl"
    jl.write_text("".join(json.dumps({"text": s, "id": i}) + "\n" for i, s in enumerate(SENTENCES)) + "\n\n")
    assert read_jsonl(jl) == SENTENCES                        # blank lines are skipped
    assert calibration_batches(jl, byte_tokenizer, n_samples=4, seq_len=64).shape == (4, 64)


@pytest.mark.parametrize("line, message", [
    ('{"text": "ok"', r"data.jsonl:3: not valid JSON"),
    ('["text"]', r"data.jsonl:3: expected a JSON object with a 'text' field, got list"),
    ('{"body": "x", "id": 1}', r"data.jsonl:3: no 'text' field \(keys: 'body', 'id'\)"),
    ('{"text": 12}', r"data.jsonl:3: 'text' must be a string, got int"),
])
def test_jsonl_errors_name_the_line(tmp_path, line, message):
    jl = tmp_path / "data.jsonl"
    jl.write_text('{"text": "first"}\n\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        calibration_batches(jl, byte_tokenizer, n_samples=1, seq_len=4)


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt: no such file"):
        calibration_texts(tmp_path / "missing.txt")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"line one\ncaf\xe9\n")
    with pytest.raises(ValueError, match=r"latin1.txt:2: not UTF-8"):
        calibration_texts(bad)
    badjl = tmp_path / "bad.jsonl"
    badjl.write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not UTF-8"):
        calibration_texts(badjl)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no records"):
        calibration_texts(empty)
    with pytest.raises(TypeError, match=r"\[1\] is a int"):
        calibration_texts(["a", 1])
    with pytest.raises(ValueError, match="needs a tokenizer"):
        calibration_batches(SENTENCES)


def test_stdlib_corpus_source():
    a = calibration_batches("stdlib", byte_tokenizer, n_samples=16, seq_len=128, seed=0, max_chars=100_000)
    b = calibration_batches("stdlib", byte_tokenizer, n_samples=16, seq_len=128, seed=0, max_chars=100_000)
    assert a.shape == (16, 128) and torch.equal(a, b)
    held = calibration_batches("stdlib:heldout", byte_tokenizer, n_samples=16, seq_len=128, max_chars=100_000)
    assert held.shape == (16, 128) and not torch.equal(a, held)
    assert sum(map(len, calibration_texts("stdlib", max_chars=100_000))) == 100_000


def test_token_id_tensors():
    rows = torch.arange(20 * 16).view(20, 16)
    before = rows.clone()
    batch = calibration_batches(rows, n_samples=5, seq_len=16, seed=0)
    assert batch.shape == (5, 16)
    assert all(any(torch.equal(b, r) for r in rows) for b in batch)     # whole rows
    assert torch.equal(rows, before)
    batch[0, 0] = -1
    assert torch.equal(rows, before)                                    # a copy, not a view
    # a 1-D stream, or rows of another length, are packed into windows
    stream = torch.arange(1000, dtype=torch.int32)
    packed = calibration_batches(stream, n_samples=6, seq_len=50, seed=0)
    assert packed.dtype == torch.int64 and all(int(r[0]) % 50 == 0 and torch.equal(r, torch.arange(int(r[0]), int(r[0]) + 50)) for r in packed)
    with pytest.raises(ValueError, match=r"needs 1050 tokens \(21 samples x 50\), found 1000 in the tensor"):
        calibration_batches(stream, n_samples=21, seq_len=50)


def test_input_tensors():
    x = torch.randn(30, 64)
    batch = calibration_batches(x, n_samples=10, seed=2)
    assert batch.shape == (10, 64)
    assert torch.equal(batch, calibration_batches(x, n_samples=10, seed=2))
    assert all(any(torch.equal(b, r) for r in x) for b in batch)
    joined = calibration_batches([x[:15], x[15:]], n_samples=30, seed=2)   # a list of batches
    assert sorted(joined.sum(1).tolist()) == sorted(x.sum(1).tolist())
    with pytest.raises(ValueError, match="needs 31 samples, found 30 rows"):
        calibration_batches(x, n_samples=31)


def test_real_tokenizers():
    from transformers import AutoTokenizer

    from shrink.models import minilm_dir

    tok = AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True)
    padding = tok.backend_tokenizer.padding
    assert padding is not None         # MiniLM's tokenizer.json pads to 128: must not leak into calibration
    assert separator_id(tok) == tok.sep_token_id          # BERT has no end-of-text: [SEP] joins documents
    ids = token_ids(tok, ["hello world"])[0]
    batch = calibration_batches(SENTENCES, tok, n_samples=4, seq_len=32)
    assert batch.shape == (4, 32) and int(batch.max()) < tok.vocab_size
    assert tok.backend_tokenizer.padding == padding       # the caller's tokenizer is left as it was
    # (checked before calling the tokenizer itself: transformers' __call__ resets the backend's padding)
    assert ids == tok("hello world", add_special_tokens=False)["input_ids"]
    # a bare tokenizers.Tokenizer works too
    bare = tok.backend_tokenizer
    assert token_ids(bare, ["hello world"])[0] == ids


def test_pack_uses_whole_windows_only():
    stream = torch.arange(10)
    assert pack(stream, 3, 3, seed=0).shape == (3, 3)
    with pytest.raises(ValueError, match="needs 12 tokens"):
        pack(stream, 4, 3)


def test_sentence_batches_frame_sentences_as_the_encoder_reads_them():
    from transformers import AutoTokenizer

    from shrink.data.calibration import sentence_batches
    from shrink.data.corpus import sentences_from, stdlib_corpus
    from shrink.models import minilm_dir

    tok = AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True)
    texts = stdlib_corpus(max_train_chars=300_000, max_heldout_chars=0).train_texts
    sents = sentences_from(texts, n=70)
    assert len(sents) == 70 and sents == sentences_from(texts, n=70)  # deterministic
    batches = sentence_batches(tok, sents, batch_size=32, max_length=24)
    assert [b["input_ids"].shape[0] for b in batches] == [32, 32, 6]
    seen = 0
    for b in batches:
        ids, mask = b["input_ids"], b["attention_mask"]
        assert ids.shape == mask.shape and ids.shape[1] <= 24
        assert bool((ids[:, 0] == tok.cls_token_id).all())
        lengths = mask.sum(1)
        # each row ends in [SEP] at its last real token, padding after it
        assert bool((ids[torch.arange(ids.shape[0]), lengths - 1] == tok.sep_token_id).all())
        seen += ids.shape[0]
    assert seen == 70
    total_real = sum(int(b["attention_mask"].sum()) for b in batches)
    assert total_real / sum(b["attention_mask"].numel() for b in batches) > 0.8  # sorted: little padding
    with pytest.raises(ValueError, match="no non-empty"):
        sentence_batches(tok, ["", "  "])
    with pytest.raises(TypeError, match="transformers tokenizer"):
        sentence_batches(lambda s: [1, 2], ["a b"])
