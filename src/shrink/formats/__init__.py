"""Numeric formats: integer grids, floats (fp32/fp16/bf16/fp8), lookup tables
(NF4, general codebooks), dense bit packing and Huffman sizing of codes."""
from shrink.formats.codebook import NF4, CodebookFormat, nf4_values
from shrink.formats.float import BF16, FLOAT_FORMATS, FP8_E4M3, FP8_E5M2, FP16, FP32, FloatFormat
from shrink.formats.huffman import (
    canonical_codes, entropy_bits, huffman_code_lengths, huffman_nbytes, symbol_counts,
)
from shrink.formats.int import IntFormat
from shrink.formats.pack import pack_bits, packed_nbytes, unpack_bits

Format = IntFormat | FloatFormat | CodebookFormat

__all__ = [
    "BF16", "FLOAT_FORMATS", "FP8_E4M3", "FP8_E5M2", "FP16", "FP32", "NF4",
    "CodebookFormat", "FloatFormat", "Format", "IntFormat",
    "canonical_codes", "entropy_bits", "huffman_code_lengths", "huffman_nbytes",
    "nf4_values", "pack_bits", "packed_nbytes", "symbol_counts", "unpack_bits",
]
