"""Huffman sizing of codes: optimality, bounds, and that the counted table decodes."""
from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
import torch

from shrink.formats import (
    canonical_codes,
    entropy_bits,
    huffman_code_lengths,
    huffman_nbytes,
    packed_nbytes,
    symbol_counts,
)


def _cost(counts, lengths) -> int:
    return sum(c * n for c, n in zip(counts, lengths))


def _random_counts(gen: torch.Generator, n: int, high: int = 50) -> list[int]:
    return torch.randint(1, high, (n,), generator=gen).tolist()


def test_textbook_example():
    """CLRS 16.3: a..f with frequencies 45,13,12,16,9,5 -> codes 0,101,100,111,1101,1100 (224 bits)."""
    counts = [45, 13, 12, 16, 9, 5]
    lengths = huffman_code_lengths(counts)
    assert lengths == [1, 3, 3, 3, 4, 4]
    assert _cost(counts, lengths) == 224
    assert huffman_nbytes(counts) == 28 + 6  # ceil(224 / 8) payload + one length byte per symbol
    assert huffman_nbytes(counts, include_table=False) == 28


def test_edge_cases():
    assert huffman_code_lengths([0, 7, 0]) == [0, 1, 0]  # one used symbol still costs a bit each
    assert huffman_nbytes([0, 7, 0]) == 1 + 3
    assert huffman_code_lengths([0, 0]) == [0, 0]
    assert huffman_nbytes([0, 0]) == 2
    assert huffman_code_lengths([]) == []
    assert huffman_code_lengths([3, 0, 5]) == [1, 0, 1]  # unused symbols get no code
    # ties: leaves merge before merged nodes, lower symbol first -> pinned
    assert huffman_code_lengths([1, 1, 1, 1, 1]) == [3, 3, 2, 2, 2]
    assert huffman_code_lengths(torch.tensor([45, 13, 12, 16, 9, 5])) == [1, 3, 3, 3, 4, 4]


def test_rejects_bad_counts():
    with pytest.raises(ValueError, match=r"counts\[1\]"):
        huffman_code_lengths([3, -1])
    with pytest.raises(ValueError, match=r"counts\[0\]"):
        huffman_code_lengths([1.5, 2])
    with pytest.raises(ValueError, match="integer tensor"):
        huffman_nbytes(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        symbol_counts(torch.tensor([0, 4]), 4)


def test_kraft_equality():
    """A Huffman tree is full, so sum 2^-len == 1 exactly (>= 2 used symbols)."""
    gen = torch.Generator().manual_seed(1)
    for n in list(range(2, 20)) + [256]:
        counts = _random_counts(gen, n, high=10_000)
        lengths = huffman_code_lengths(counts)
        assert sum(Fraction(1, 2**n_) for n_ in lengths) == 1
    skewed = [2**i for i in range(30)]  # the deepest tree: lengths 29, 29, 28, ..., 1
    assert sorted(huffman_code_lengths(skewed)) == [1, *range(2, 30), 29]


def test_optimal_against_brute_force():
    """No prefix code (any lengths with Kraft sum <= 1) is cheaper than Huffman's."""
    gen = torch.Generator().manual_seed(2)
    for trial in range(25):
        n = 2 + trial % 5  # alphabets of 2..6 symbols
        counts = _random_counts(gen, n)
        best = min(
            _cost(counts, ls)
            for ls in itertools.product(range(1, n), repeat=n)
            if sum(1 << (n - x) for x in ls) <= 1 << n  # Kraft, in integers
        )
        assert _cost(counts, huffman_code_lengths(counts)) == best, counts


def test_entropy_bound():
    """Shannon: H <= average Huffman length < H + 1; equality for dyadic probabilities."""
    gen = torch.Generator().manual_seed(3)
    for n in range(2, 40):
        counts = _random_counts(gen, n, high=1000)
        avg = _cost(counts, huffman_code_lengths(counts)) / sum(counts)
        h = entropy_bits(counts)
        assert h - 1e-12 <= avg < h + 1
    dyadic = [4, 2, 1, 1]
    assert entropy_bits(dyadic) == pytest.approx(1.75)
    assert _cost(dyadic, huffman_code_lengths(dyadic)) / 8 == 1.75
    assert entropy_bits([5, 5]) == pytest.approx(1.0)
    assert entropy_bits([9]) == 0.0 and entropy_bits([0, 0]) == 0.0


def test_length_table_is_enough_to_decode():
    """What huffman_nbytes counts decodes: a decoder given only the lengths
    rebuilds the canonical codes and recovers the symbols from the payload."""
    gen = torch.Generator().manual_seed(4)
    probs = torch.tensor([0.5, 0.2, 0.0, 0.15, 0.1, 0.05])
    symbols = torch.multinomial(probs, 3000, replacement=True, generator=gen)
    counts = symbol_counts(symbols, len(probs))
    assert counts[2] == 0
    lengths = huffman_code_lengths(counts)
    codes = canonical_codes(lengths)
    assert codes[2] is None
    words = {s: format(c, f"0{lengths[s]}b") for s, c in enumerate(codes) if c is not None}
    for a, b in itertools.permutations(words.values(), 2):
        assert not b.startswith(a)  # prefix-free
    bitstream = "".join(words[s] for s in symbols.tolist())
    assert math.ceil(len(bitstream) / 8) == huffman_nbytes(counts, include_table=False)

    # decoder side: lengths only
    decode_table = {format(c, f"0{lengths[s]}b"): s for s, c in enumerate(canonical_codes(lengths)) if c is not None}
    out, word = [], ""
    for bit in bitstream:
        word += bit
        if word in decode_table:
            out.append(decode_table[word])
            word = ""
    assert word == "" and out == symbols.tolist()


def test_skewed_codes_beat_fixed_width_uniform_do_not():
    """Huffman pays off only when codes are skewed (e.g. pruned weights coded as 0)."""
    skewed = [900, 50, 30, 20]  # 2-bit codes, mostly one symbol
    assert huffman_code_lengths(skewed) == [1, 2, 3, 3]
    assert huffman_nbytes(skewed) == 144 + 4 < packed_nbytes(sum(skewed), 2) == 250  # 1150 bits
    uniform = [250] * 4  # already optimal at 2 bits: Huffman gains nothing, pays its table
    assert huffman_code_lengths(uniform) == [2, 2, 2, 2]
    assert huffman_nbytes(uniform) == packed_nbytes(1000, 2) + 4
