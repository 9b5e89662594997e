"""The tokenizer of a GGUF file, rebuilt from its `tokenizer.ggml.*` metadata as a transformers
PreTrainedTokenizerFast (built from `tokenizers` objects, as transformers 5 wants).

- `gpt2` (byte-level BPE): the tokens and merges as they are, split as the file's
  `tokenizer.ggml.pre` says ('gpt-2'/'default': GPT-2's split; 'llama-bpe': Llama 3's).
- `llama` (SentencePiece): a byte-fallback BPE whose merges are every pair of tokens that
  spells a longer token, ranked by that token's score, which is how llama.cpp's own
  SentencePiece tokenizer chooses what to merge.

Control tokens become special tokens and user-defined ones are matched whole, as in llama.cpp;
`add_bos_token` / `add_eos_token` become the post-processor.
"""
from __future__ import annotations

import numpy as np

from shrink.models.gguf_read import _CORRUPT, GGUFInfo, _is_int, check_gguf


def _strings(info: GGUFInfo, key: str, required: bool = True) -> list[str] | None:
    v = info.metadata.get(key)
    if v is None and not required:
        return None
    if not isinstance(v, list) or not v or not all(isinstance(s, str) for s in v):
        raise info.fail(key, "missing, empty or not an array of strings", "the file carries no usable tokenizer")
    return v


def _numbers(info: GGUFInfo, key: str, n: int) -> np.ndarray | None:
    v = info.metadata.get(key)
    if v is None:
        return None
    if not isinstance(v, np.ndarray) or v.shape != (n,):
        raise info.fail(key, f"expected an array of {n} numbers, one per token")
    return v


def _byte_level(info: GGUFInfo, tokens: list[str], vocab: dict[str, int]):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    merges = []
    for i, m in enumerate(_strings(info, "tokenizer.ggml.merges")):
        pair = m.split(" ")
        if len(pair) != 2 or pair[0] not in vocab or pair[1] not in vocab or pair[0] + pair[1] not in vocab:
            raise info.fail("tokenizer.ggml.merges", f"merge {i} {m!r} is not two tokens of the vocabulary "
                                                     "joining into a third")
        merges.append((pair[0], pair[1]))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    pre = info.metadata.get("tokenizer.ggml.pre", "default")
    if pre in ("default", "gpt-2", "gpt2"):
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    elif pre in _LLAMA3_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        raise info.fail("tokenizer.ggml.pre", f"pre-tokenizer {pre!r} is not supported",
                        f"shrink splits text as 'gpt-2' or {', '.join(map(repr, _LLAMA3_PRE))} vocabularies do")
    tok.decoder = decoders.ByteLevel()
    return tok


# llama.cpp's 'llama-bpe' split (Llama 3): contractions, letters, 1-3 digits, punctuation runs, newlines, spaces.
_LLAMA3_PRE = ("llama-bpe", "llama3", "llama-v3", "smaug-bpe")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _sentencepiece(info: GGUFInfo, tokens: list[str], vocab: dict[str, int], types):
    from tokenizers import Tokenizer, decoders, models, normalizers

    scores = _numbers(info, "tokenizer.ggml.scores", len(tokens))
    if scores is None:
        raise info.fail("tokenizer.ggml.scores", "missing", "a SentencePiece vocabulary needs its scores")
    # Each token longer than one character is what merging any two tokens that spell it makes,
    # ranked by its score (highest first), as llama.cpp's SentencePiece tokenizer merges.
    merges = []
    for i, t in enumerate(tokens):
        if len(t) < 2 or vocab[t] != i or (types is not None and types[i] in (2, 3, 6)):
            continue
        for k in range(1, len(t)):
            left, right = t[:k], t[k:]
            if left in vocab and right in vocab:
                merges.append((-float(scores[i]), vocab[left], vocab[right], left, right))
    merges.sort(key=lambda m: m[:3])
    unk_id = info.metadata.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if _is_int(unk_id) and 0 <= unk_id < len(tokens) else ("<unk>" if "<unk>" in vocab else None)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[m[3:] for m in merges], unk_token=unk,
                               fuse_unk=True, byte_fallback=True))
    prefix = bool(info.metadata.get("tokenizer.ggml.add_space_prefix", True))
    # "▁" before the text always (as llama.cpp and SentencePiece do; transformers' Metaspace
    # skips it when the text already starts with a space), then every space as "▁"
    tok.normalizer = normalizers.Sequence(([normalizers.Prepend("\u2581")] if prefix else [])
                                          + [normalizers.Replace(" ", "\u2581")])
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok


def gguf_tokenizer(path):
    """A transformers PreTrainedTokenizerFast rebuilt from the GGUF file's `tokenizer.ggml.*` metadata."""
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast

    info = check_gguf(path)
    kind = info.metadata.get("tokenizer.ggml.model")
    if kind not in ("gpt2", "llama"):
        raise info.fail("tokenizer.ggml.model", f"tokenizer model {kind!r} is not supported" if kind is not None
                        else "missing", "shrink rebuilds 'gpt2' (byte-level BPE) and 'llama' (SentencePiece) tokenizers")
    tokens = _strings(info, "tokenizer.ggml.tokens")
    types = _numbers(info, "tokenizer.ggml.token_type", len(tokens))
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # a repeated token keeps its first id, as llama.cpp looks tokens up
    try:
        backend = _byte_level(info, tokens, vocab) if kind == "gpt2" else _sentencepiece(info, tokens, vocab, types)
        if types is not None:
            # control tokens (type 3) are special; user-defined ones (4) are matched whole, as llama.cpp does
            backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                        for t, k in zip(tokens, types) if k == 3])
            backend.add_tokens([AddedToken(t, normalized=False) for t, k in zip(tokens, types) if k == 4])
        named = {}
        for name in ("bos", "eos", "unknown", "padding"):
            v = info.metadata.get(f"tokenizer.ggml.{name}_token_id")
            if v is not None and not (_is_int(v) and 0 <= v < len(tokens)):
                raise info.fail(f"tokenizer.ggml.{name}_token_id", f"{v!r} is not a token id (0 to {len(tokens) - 1})")
            if v is not None:
                named[{"unknown": "unk", "padding": "pad"}.get(name, name)] = tokens[int(v)]
        add = [(named.get(n), info.metadata.get(f"tokenizer.ggml.add_{n}_token") is True) for n in ("bos", "eos")]
        if any(flag and token for token, flag in add):
            bos, eos = (token if flag else None for token, flag in add)
            single = " ".join(([f"{bos}:0"] if bos else []) + ["$A:0"] + ([f"{eos}:0"] if eos else []))
            pair = " ".join(([f"{bos}:0"] if bos else []) + ["$A:0"] + ([f"{eos}:0"] if eos else []) + ["$B:1"])
            backend.post_processor = processors.TemplateProcessing(
                single=single, pair=pair, special_tokens=[(t, vocab[t]) for t in (bos, eos) if t])
        return PreTrainedTokenizerFast(tokenizer_object=backend, **{f"{k}_token": v for k, v in named.items()})
    except ValueError:
        raise
    except Exception as e:  # tokenizers rejects what slipped past the checks above
        raise ValueError(f"{info.path}: tokenizer.ggml.*: cannot build the tokenizer ({e}); {_CORRUPT}") from None
