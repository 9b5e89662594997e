"""Dense bit packing of 1-8 bit codes: n codes of b bits take ceil(n*b/8) bytes.

Bits are laid out least-significant first, code after code, with no padding
between codes (3-bit codes straddle byte boundaries). numpy's packbits does
the byte assembly in C.
"""
from __future__ import annotations

import numpy as np
import torch


def packed_nbytes(count: int, bits: int) -> int:
    _check_bits(bits)
    return (count * bits + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (any integer dtype, values in [0, 2^bits)) into uint8."""
    _check_bits(bits)
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise TypeError(f"pack_bits: codes must be an integer tensor, got {codes.dtype}")
    flat = codes.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= (1 << bits)):
        raise ValueError(
            f"pack_bits: codes must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing, "
            f"got range [{int(flat.min())}, {int(flat.max())}]"
        )
    if bits == 8:
        return flat.to(torch.uint8).cpu().clone()
    if 8 % bits == 0:  # 1, 2, 4 bits: whole codes per byte, shifts in torch
        per = 8 // bits
        c = flat.to(torch.uint8).cpu()
        pad = (-c.numel()) % per
        if pad:
            c = torch.cat([c, c.new_zeros(pad)])
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
        return (c.view(-1, per) << shifts).sum(dim=1, dtype=torch.uint8)
    arr = flat.to(torch.uint8).cpu().numpy()
    # each code's low `bits` bits, least significant first, then all bits in a row
    planes = np.unpackbits(arr[:, None], axis=1, count=bits, bitorder="little")
    return torch.from_numpy(np.packbits(planes.reshape(-1), bitorder="little"))


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of pack_bits: the first `count` codes as uint8."""
    _check_bits(bits)
    need = packed_nbytes(count, bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != need:
        raise ValueError(
            f"unpack_bits: expected a 1-D uint8 tensor of {need} bytes for {count} "
            f"{bits}-bit codes, got {tuple(packed.shape)} {packed.dtype}"
        )
    if bits == 8:
        return packed.cpu().clone()
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
        mask = (1 << bits) - 1
        return ((packed.cpu()[:, None] >> shifts) & mask).reshape(-1)[:count]
    arr = packed.cpu().numpy()
    planes = np.unpackbits(arr, count=count * bits, bitorder="little").reshape(count, bits)
    # reassemble each code from its bit row (packbits zero-fills the missing high bits)
    return torch.from_numpy(np.packbits(planes, axis=1, bitorder="little").reshape(count))


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bit width must be an integer in 1..8, got {bits!r}")
