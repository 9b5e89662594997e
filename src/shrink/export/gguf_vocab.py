"""The tokenizer of a GGUF file: a transformers fast tokenizer written as the
`tokenizer.ggml.*` metadata llama.cpp reads.

Two kinds are carried:
- byte-level BPE (GPT-2, Llama 3): tokenizer.ggml.model 'gpt2', tokens and merges as they
  are, and the pre-tokenizer named by how the text is split ('gpt-2' for GPT-2's ByteLevel
  regex, 'llama-bpe' for Llama 3's split regex). Any other split is refused: llama.cpp would
  split differently and the token ids would not match.
- SentencePiece-style BPE with byte fallback (Llama 1/2, Mistral, TinyLlama as transformers
  converts them: "▁" for spaces, <0xNN> byte tokens): tokenizer.ggml.model 'llama'. llama.cpp
  merges the adjacent pair whose joined token has the highest score; giving each token the
  score -rank of the first merge that makes it reproduces the BPE merge order.
"""
from __future__ import annotations

import json
import re

SPACE = "\u2581"
_BYTE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# Llama 3's split, as transformers writes it in tokenizer.json (llama.cpp's 'llama-bpe').
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
UNREACHED_SCORE = -1e9   # a token no merge makes (added or padding): merged only as a last resort


def add_tokenizer(w, tokenizer, vocab_size: int) -> str:
    """Write `tokenizer` into the GGUFWriter `w`; returns the tokenizer model written ('gpt2' or 'llama')."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError("GGUF export: the tokenizer has no fast (tokenizers) backend to read its vocabulary from; "
                         "save it with a tokenizer.json")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"GGUF export: the tokenizer is a {model.get('type')} model; shrink writes BPE tokenizers "
                         "(byte-level like GPT-2/Llama 3, or SentencePiece-style with byte fallback like Llama 2)")
    if model.get("byte_fallback"):
        _sentencepiece(w, tokenizer, spec, vocab_size)
        return "llama"
    _byte_level(w, tokenizer, spec, vocab_size)
    return "gpt2"


def _table(tokenizer, spec: dict, vocab_size: int):
    import gguf

    vocab = tokenizer.get_vocab()
    n = max(vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [gguf.TokenType.UNUSED] * n
    for tok, i in vocab.items():
        tokens[i] = tok
        types[i] = gguf.TokenType.NORMAL
    for added in spec.get("added_tokens", []):
        if added["id"] < n:
            types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    return tokens, types


def _merges(model: dict) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]


def _split_of(pre) -> str:
    """llama.cpp's name for how a byte-level tokenizer splits text, or a ValueError."""
    text = json.dumps(pre)
    if isinstance(pre, dict) and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if isinstance(pre, dict) and pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers") or []
        split = [p for p in parts if p.get("type") == "Split"]
        if (len(parts) == 2 and len(split) == 1 and parts[1].get("type") == "ByteLevel"
                and (split[0].get("pattern") or {}).get("Regex") == _LLAMA3_SPLIT):
            return "llama-bpe"
    raise ValueError(f"GGUF export: the byte-level tokenizer splits text with {text[:120]}, which is neither "
                     "GPT-2's nor Llama 3's split; llama.cpp would cut the text differently. Convert it with "
                     "llama.cpp's convert_hf_to_gguf.py, which knows more pre-tokenizers")


def _byte_level(w, tokenizer, spec: dict, vocab_size: int) -> None:
    model = spec["model"]
    pre = _split_of(spec.get("pre_tokenizer"))
    tokens, types = _table(tokenizer, spec, vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([int(t) for t in types])
    w.add_token_merges([" ".join(m) for m in _merges(model)])
    _special_ids(w, tokenizer)
    w.add_add_bos_token(_adds_bos(tokenizer, spec))


def _space_prefix(spec: dict) -> bool:
    """Whether the text gets a leading "▁" (SentencePiece's add_dummy_prefix), from the
    normalizer (Prepend "▁", older conversions) or the Metaspace pre-tokenizer (newer ones)."""
    found = json.dumps(spec.get("normalizer"), ensure_ascii=False)
    if '"Prepend"' in found and SPACE in found:
        return True
    pre = spec.get("pre_tokenizer") or {}
    for p in ([pre] if pre.get("type") != "Sequence" else pre.get("pretokenizers", [])):
        if p.get("type") == "Metaspace":
            return p.get("prepend_scheme", "always") != "never" and p.get("add_prefix_space", True) is not False
    return False


def _sentencepiece(w, tokenizer, spec: dict, vocab_size: int) -> None:
    import gguf

    model = spec["model"]
    pre = spec.get("pre_tokenizer") or {}
    if pre and pre.get("type") != "Metaspace":
        raise ValueError(f"GGUF export: a byte-fallback BPE tokenizer with pre-tokenizer {pre.get('type')!r} is not "
                         "SentencePiece-style (llama.cpp's 'llama' tokenizer reads text whole, spaces as \u2581)")
    if pre.get("split") is True:
        raise ValueError("GGUF export: the Metaspace pre-tokenizer splits words apart (split: true); llama.cpp's "
                         "SentencePiece tokenizer does not, so its token ids would differ")
    tokens, types = _table(tokenizer, spec, vocab_size)
    vocab = tokenizer.get_vocab()
    scores = [0.0] * len(tokens)
    made = set()
    for rank, (left, right) in enumerate(_merges(model)):
        joined = left + right
        i = vocab.get(joined)
        if i is not None and i not in made:
            made.add(i)
            scores[i] = -float(rank)
    for i, t in enumerate(tokens):
        if _BYTE.fullmatch(t) and types[i] == gguf.TokenType.NORMAL:
            types[i] = gguf.TokenType.BYTE
        elif len(t) > 1 and i not in made:
            scores[i] = UNREACHED_SCORE
    unk = tokenizer.unk_token_id
    if unk is not None and unk < len(types):
        types[unk] = gguf.TokenType.UNKNOWN
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types([int(t) for t in types])
    _special_ids(w, tokenizer)
    w.add_add_bos_token(_adds_bos(tokenizer, spec))
    w.add_add_eos_token(False)
    w.add_add_space_prefix(_space_prefix(spec))


def _special_ids(w, tokenizer) -> None:
    for kind in ("bos", "eos", "pad", "unk"):
        tid = getattr(tokenizer, f"{kind}_token_id", None)
        if tid is not None:
            getattr(w, f"add_{kind}_token_id")(int(tid))


def _adds_bos(tokenizer, spec: dict) -> bool:
    """Whether encoding puts the BOS token first (the post-processor's template says so)."""
    bos = getattr(tokenizer, "bos_token", None)
    post = spec.get("post_processor") or {}
    if bos is None or post.get("type") != "TemplateProcessing":
        return False
    first = (post.get("single") or [{}])[0]
    return (first.get("SpecialToken") or {}).get("id") == bos
