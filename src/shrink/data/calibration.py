"""Calibration batches: token id tensors [n_samples, seq_len] from text, or
rows drawn from tensors.

Sources (`calibration_batches(source, tokenizer, ...)`):

- ``"stdlib"`` (or ``"stdlib:train"``, ``"stdlib:heldout"``): the standard
  library's sources (`shrink.data.corpus`);
- a path to a ``.jsonl`` file: one JSON object per line with a ``"text"`` string;
- a path to any other file: UTF-8 text;
- a list of strings (sentences, documents);
- a tensor, or a list of tensors joined along dim 0: integer tensors are token
  ids (rows of exactly `seq_len` are samples; anything else is one stream);
  floating tensors are inputs (images, features): rows are drawn from them.

Text is tokenized without special tokens, documents are joined with the
tokenizer's end-of-text (or separator) token, and the stream is cut into
non-overlapping windows of `seq_len`; `n_samples` windows are drawn without
replacement by a generator seeded with `seed`, so the same arguments give the
same tensor.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from shrink.data.corpus import stdlib_corpus

DEFAULT_CORPUS_CHARS = 2_000_000   # ~550k tokens of the stdlib: plenty of windows, tokenized in ~1 s
CORPUS_SOURCES = ("stdlib", "stdlib:train", "stdlib:heldout")


# ----------------------------------------------------------------------------- text sources

def read_text_file(path: str | Path) -> list[str]:
    """The file as one document (UTF-8; a clear error names the first bad byte)."""
    path = Path(path)
    data = _read_bytes(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte offset {e.start}: {e.reason})") from None
    if not text.strip():
        raise ValueError(f"{path}: the calibration file is {'empty' if not data else 'blank'} (no text); give a "
                         "file with text, or leave --calib out to use the stdlib corpus")
    return [text]


def read_jsonl(path: str | Path, field: str = "text") -> list[str]:
    """The `field` string of every line's JSON object; blank lines are skipped."""
    path = Path(path)
    texts = []
    for number, raw in enumerate(_read_bytes(path).split(b"\n"), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{where}: not UTF-8 text (byte {e.start} of the line: {e.reason})") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object with a {field!r} field, got {type(record).__name__}")
        if field not in record:
            keys = ", ".join(map(repr, list(record)[:8])) or "none"
            raise ValueError(f"{where}: no {field!r} field (keys: {keys})")
        if not isinstance(record[field], str):
            raise ValueError(f"{where}: {field!r} must be a string, got {type(record[field]).__name__}")
        texts.append(record[field])
    if not any(t.strip() for t in texts):
        raise ValueError(f"{path}: no records (the file is empty or blank)")
    return texts


def _read_bytes(path: Path) -> bytes:
    if path.is_dir():
        raise ValueError(f"{path}: is a directory; calibration text must be a .txt or .jsonl file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return path.read_bytes()


def calibration_texts(source, max_chars: int | None = None) -> list[str]:
    """The documents of a text source (see the module docstring)."""
    if isinstance(source, str) and source in CORPUS_SOURCES:
        cap = DEFAULT_CORPUS_CHARS if max_chars is None else max_chars
        if source == "stdlib:heldout":
            return stdlib_corpus(max_train_chars=0, max_heldout_chars=cap).heldout_texts
        return stdlib_corpus(max_train_chars=cap, max_heldout_chars=0).train_texts
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(
                f"{path}: no such file; calibration text is one of {', '.join(map(repr, CORPUS_SOURCES))}, "
                "a .jsonl file (a \"text\" field per line), a text file, a list of strings or a tensor"
            )
        texts = read_jsonl(path) if path.suffix.lower() == ".jsonl" else read_text_file(path)
    elif isinstance(source, Sequence) and not isinstance(source, (bytes, bytearray)):
        texts = list(source)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"calibration text [{i}] is a {type(t).__name__}, expected str")
    else:
        raise TypeError(f"calibration source: unsupported type {type(source).__name__}")
    return _cap(texts, max_chars)


def _cap(texts: list[str], max_chars: int | None) -> list[str]:
    if max_chars is None:
        return texts
    out, left = [], max_chars
    for t in texts:
        if left <= 0:
            break
        out.append(t[:left])
        left -= len(out[-1])
    return out


# ----------------------------------------------------------------------------- tokens

def _backend(tokenizer):
    """The `tokenizers.Tokenizer` inside a transformers tokenizer, or the tokenizer itself;
    without padding or truncation (a copy, when the original has them: e.g. MiniLM's
    tokenizer.json pads and truncates to 128, which would silently cut documents)."""
    inner = getattr(tokenizer, "backend_tokenizer", None)
    if inner is None:
        inner = tokenizer if hasattr(tokenizer, "encode_batch") else None
    if inner is not None and (inner.padding is not None or inner.truncation is not None):
        from tokenizers import Tokenizer

        inner = Tokenizer.from_str(inner.to_str())
        inner.no_padding()
        inner.no_truncation()
    return inner


def token_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens.

    `tokenizer`: a transformers tokenizer, a `tokenizers.Tokenizer`, or a
    callable str -> list[int].
    """
    backend = _backend(tokenizer)
    if backend is not None:
        encode = getattr(backend, "encode_batch_fast", None) or backend.encode_batch  # fast: no offsets
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]
    if hasattr(tokenizer, "encode"):
        return [list(tokenizer.encode(t, add_special_tokens=False)) for t in texts]
    if callable(tokenizer):
        return [list(tokenizer(t)) for t in texts]
    raise TypeError(f"tokenizer: expected a transformers or tokenizers tokenizer or a callable, got {type(tokenizer).__name__}")


def separator_id(tokenizer) -> int | None:
    """The id placed between documents: end-of-text, else the separator, else none."""
    for attr in ("eos_token_id", "sep_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    if hasattr(tokenizer, "token_to_id"):   # a bare tokenizers.Tokenizer
        for token in ("<|endoftext|>", "</s>", "[SEP]"):
            value = tokenizer.token_to_id(token)
            if value is not None:
                return value
    return None


def token_stream(tokenizer, texts: Sequence[str], separator: int | None | str = "auto") -> torch.Tensor:
    """All texts as one int64 stream, documents joined by `separator` ("auto": `separator_id`)."""
    sep = separator_id(tokenizer) if separator == "auto" else separator
    pieces: list[int] = []
    for i, ids in enumerate(token_ids(tokenizer, texts)):
        if i and sep is not None:
            pieces.append(sep)
        pieces.extend(ids)
    return torch.tensor(pieces, dtype=torch.int64)


# ----------------------------------------------------------------------------- batches

def _choose(n_available: int, n_samples: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_available, generator=g)[:n_samples]


def pack(stream: torch.Tensor, n_samples: int, seq_len: int, seed: int = 0, what: str = "the text") -> torch.Tensor:
    """`n_samples` non-overlapping windows of `seq_len` tokens drawn from a 1-D stream."""
    needed = n_samples * seq_len
    if stream.numel() < needed:
        raise ValueError(
            f"calibration needs {needed} tokens ({n_samples} samples x {seq_len}), found {stream.numel()} in {what}; "
            "give more text, or fewer or shorter samples"
        )
    windows = stream[: stream.numel() // seq_len * seq_len].view(-1, seq_len)
    return windows[_choose(windows.shape[0], n_samples, seed)].clone()


def _from_tensor(t: torch.Tensor, n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    if t.is_floating_point() or t.is_complex():
        if t.dim() == 0 or t.shape[0] < n_samples:
            rows = 0 if t.dim() == 0 else t.shape[0]
            raise ValueError(f"calibration needs {n_samples} samples, found {rows} rows in the tensor")
        return t[_choose(t.shape[0], n_samples, seed)].clone()
    if t.dtype == torch.bool:
        raise TypeError("calibration tensor: bool is neither token ids nor inputs")
    ids = t.to(torch.int64)
    if ids.dim() == 2 and ids.shape[1] == seq_len:
        if ids.shape[0] < n_samples:
            raise ValueError(
                f"calibration needs {n_samples * seq_len} tokens ({n_samples} samples x {seq_len}), "
                f"found {ids.numel()} in the tensor ({ids.shape[0]} rows)"
            )
        return ids[_choose(ids.shape[0], n_samples, seed)].clone()
    return pack(ids.reshape(-1), n_samples, seq_len, seed, what="the tensor")


def calibration_batches(
    source,
    tokenizer=None,
    n_samples: int = 128,
    seq_len: int = 256,
    seed: int = 0,
    max_chars: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Calibration data as a tensor: [n_samples, seq_len] int64 token ids for
    text (and integer tensors); [n_samples, ...] rows for floating tensors.

    `max_chars` caps the text read (for "stdlib" it defaults to
    DEFAULT_CORPUS_CHARS). Inputs are never modified. `progress(1)` is called
    once the text is tokenized.
    """
    if n_samples < 1 or seq_len < 1:
        raise ValueError(f"n_samples and seq_len must be >= 1, got {n_samples} and {seq_len}")
    if isinstance(source, torch.Tensor) or (
        isinstance(source, (list, tuple)) and source and all(isinstance(s, torch.Tensor) for s in source)
    ):
        t = source if isinstance(source, torch.Tensor) else torch.cat([s.detach() for s in source], dim=0)
        return _from_tensor(t.detach(), n_samples, seq_len, seed)
    if tokenizer is None:
        raise ValueError("calibration from text needs a tokenizer (e.g. shrink.models.load_tokenizer(name))")
    texts = calibration_texts(source, max_chars)
    stream = token_stream(tokenizer, texts)
    if progress is not None:
        progress(1)
    what = repr(source) if isinstance(source, (str, Path)) else f"{len(texts)} texts"
    return pack(stream, n_samples, seq_len, seed, what=what)


def sentence_batches(tokenizer, sentences: Sequence[str], batch_size: int = 32,
                     max_length: int = 128) -> list[dict[str, torch.Tensor]]:
    """Calibration for encoders: sentences as the model reads them at inference (with its
    special tokens, e.g. [CLS] ... [SEP], and an attention mask), in batches of similar
    length so little padding enters the statistics. Sentence embedders calibrated on long
    packed windows of code see other activations than on the sentences they embed
    (MiniLM int4 GPTQ: 0.977 embedding cosine calibrated on windows, 0.986 on sentences;
    docs/BENCHMARKS.md). Returns a list of {"input_ids", "attention_mask", ...} dicts."""
    if not callable(tokenizer) or not hasattr(tokenizer, "pad_token_id"):
        raise TypeError("sentence_batches needs a transformers tokenizer (it adds special tokens and pads)")
    if batch_size < 1 or max_length < 2:
        raise ValueError(f"batch_size must be >= 1 and max_length >= 2, got {batch_size} and {max_length}")
    texts = [s for s in sentences if isinstance(s, str) and s.strip()]
    if not texts:
        raise ValueError("sentence_batches: no non-empty sentences given")
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
    texts = [t for _, _, t in sorted(zip(lengths, range(len(texts)), texts))]  # similar lengths share a batch
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        out.append({k: v for k, v in dict(enc).items() if isinstance(v, torch.Tensor)})
    return out
