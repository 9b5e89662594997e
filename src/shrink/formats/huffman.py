"""Huffman sizing of integer codes (Deep Compression's last stage).

Pure functions on symbol counts. What `huffman_nbytes` counts, exactly:

  payload  ceil(sum_s count[s] * length[s] / 8) bytes: the codes, bit-packed
           back to back with no padding between them
  table    one byte per symbol of the alphabet (len(counts)), holding that
           symbol's code length (0 = unused). A canonical Huffman code is fully
           determined by its lengths (`canonical_codes`), so this is all a
           decoder needs. With at most 256 used symbols (8-bit codes) the
           deepest leaf is at depth <= 255, so a length fits in a byte.

Not counted: the number of codes and the alphabet size, which the tensor's
shape and its codebook already carry.
"""
from __future__ import annotations

import heapq
import math
from collections.abc import Sequence

import torch

Counts = Sequence[int] | torch.Tensor


def _as_counts(counts: Counts) -> list[int]:
    if isinstance(counts, torch.Tensor):
        if counts.dim() != 1 or counts.is_floating_point() or counts.is_complex():
            raise ValueError(
                f"counts must be a 1-D integer tensor, got shape {tuple(counts.shape)} {counts.dtype}"
            )
        counts = counts.tolist()
    out = []
    for i, c in enumerate(counts):
        if isinstance(c, bool) or not isinstance(c, int) or c < 0:
            raise ValueError(f"counts[{i}] must be a non-negative integer, got {c!r}")
        out.append(c)
    return out


def symbol_counts(codes: torch.Tensor, num_symbols: int) -> list[int]:
    """How often each symbol 0..num_symbols-1 occurs in an integer tensor of codes."""
    if codes.is_floating_point() or codes.is_complex():
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
    flat = codes.reshape(-1).long()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= num_symbols):
        raise ValueError(
            f"codes must lie in [0, {num_symbols - 1}], got range [{int(flat.min())}, {int(flat.max())}]"
        )
    return torch.bincount(flat, minlength=num_symbols).tolist()


def huffman_code_lengths(counts: Counts) -> list[int]:
    """Optimal prefix-code length per symbol (Huffman, 1952).

    Zero-count symbols get length 0 (no code). A lone used symbol gets length 1:
    a decoder still needs one bit per symbol to count them. Ties between equal
    weights are broken by creation order (leaves by symbol index, then merged
    nodes as made), so the result depends only on `counts`.
    """
    c = _as_counts(counts)
    lengths = [0] * len(c)
    # Heap items: (weight, order, symbols under this node).
    heap = [(w, i, [i]) for i, w in enumerate(c) if w > 0]
    if len(heap) == 1:
        lengths[heap[0][1]] = 1
        return lengths
    heapq.heapify(heap)
    order = len(c)
    while len(heap) > 1:
        w1, _, s1 = heapq.heappop(heap)
        w2, _, s2 = heapq.heappop(heap)
        for s in s1 + s2:  # every leaf below the new node sinks one level
            lengths[s] += 1
        heapq.heappush(heap, (w1 + w2, order, s1 + s2))
        order += 1
    return lengths


def canonical_codes(lengths: Sequence[int]) -> list[int | None]:
    """The canonical code of each symbol (as an integer of `lengths[s]` bits).

    Symbols are ordered by (length, index) and numbered consecutively, shifting
    left whenever the length grows (as DEFLATE does): this is why the lengths
    alone suffice to decode. Unused symbols (length 0) get None.
    """
    codes: list[int | None] = [None] * len(lengths)
    code, prev = 0, 0
    for length, s in sorted((n, s) for s, n in enumerate(lengths) if n > 0):
        code <<= length - prev
        codes[s] = code
        code, prev = code + 1, length
    return codes


def huffman_nbytes(counts: Counts, *, include_table: bool = True) -> int:
    """Bytes to store the symbols Huffman-coded: payload + (optionally) the length table.

    See the module docstring for what is counted. `counts` are symbol
    frequencies (use `symbol_counts` to get them from a tensor of codes).
    """
    c = _as_counts(counts)
    lengths = huffman_code_lengths(c)
    if max(lengths, default=0) > 255:  # only possible with more than 256 used symbols
        raise ValueError("a Huffman code length exceeds 255; a one-byte length table cannot hold it")
    payload_bits = sum(n * length for n, length in zip(c, lengths))
    return (payload_bits + 7) // 8 + (len(c) if include_table else 0)


def entropy_bits(counts: Counts) -> float:
    """Shannon entropy in bits per symbol, -sum p log2 p: the lower bound on any
    prefix code's average length (Huffman's lies in [H, H + 1))."""
    c = _as_counts(counts)
    total = sum(c)
    if total == 0:
        return 0.0
    return -sum(n / total * math.log2(n / total) for n in c if n > 0)
