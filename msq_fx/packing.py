"""Dense bit packing of n-bit two's-complement codes, so a saved model takes n bits per weight.

The int8 containers of a converted model spend 8 bits on every weight whatever its width; on disk
the codes are stored as a bit stream of exactly ``ceil(numel * bits / 8)`` bytes instead.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["packed_size", "pack_codes", "unpack_codes", "codes_outside_width"]


def packed_size(numel: int, bits: int) -> int:
    """Bytes that ``numel`` codes of ``bits`` bits occupy once packed."""
    return -(-numel * bits // 8)


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack signed ``bits``-bit codes (any integer dtype) into a flat uint8 tensor."""
    _check_range(codes, bits)
    offset = 2 ** (bits - 1)
    flat = codes.detach().cpu().reshape(-1)
    if 8 % bits == 0:
        # Whole codes per byte, the first in the lowest bits: the same stream, without a
        # plane per bit.
        unsigned = (flat.to(torch.int16) + offset).to(torch.uint8).numpy()
        per_byte = 8 // bits
        rows = np.zeros(packed_size(unsigned.size, bits) * per_byte, dtype=np.uint8)
        rows[:unsigned.size] = unsigned
        rows = rows.reshape(-1, per_byte) << np.arange(0, 8, bits, dtype=np.uint8)
        return torch.from_numpy(np.bitwise_or.reduce(rows, axis=1, dtype=np.uint8))
    unsigned = (flat.to(torch.int64) + offset).numpy().astype(np.uint16)
    # One row per code, its bits least significant first; the rows laid end to end.
    planes = (unsigned[:, None] >> np.arange(bits, dtype=np.uint16)) & 1
    return torch.from_numpy(np.packbits(planes.astype(np.uint8).reshape(-1), bitorder="little"))


def unpack_codes(packed: Tensor, bits: int, shape: tuple[int, ...]) -> Tensor:
    """Inverse of ``pack_codes``: int8 codes of the given shape."""
    numel = int(np.prod(shape, dtype=np.int64))
    if packed.numel() != packed_size(numel, bits):
        raise ValueError(f"{packed.numel()} packed bytes cannot hold {numel} codes of {bits} bits "
                         f"(expected {packed_size(numel, bits)})")
    stream = packed.cpu().numpy()
    if 8 % bits == 0:
        shifts = np.arange(0, 8, bits, dtype=np.uint8)
        unsigned = ((stream[:, None] >> shifts) & np.uint8(2**bits - 1)).reshape(-1)[:numel]
        signed = torch.from_numpy(unsigned).to(torch.int16) - 2 ** (bits - 1)
        return signed.to(torch.int8).reshape(shape)
    stream = np.unpackbits(stream, count=numel * bits, bitorder="little")
    planes = stream.reshape(numel, bits).astype(np.int64)
    unsigned = (planes << np.arange(bits, dtype=np.int64)).sum(axis=1)
    return torch.from_numpy(unsigned - 2 ** (bits - 1)).to(torch.int8).reshape(shape)


def _check_range(codes: Tensor, bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8 for int8 codes, got {bits}")
    if codes.is_floating_point():
        raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
    problem = codes_outside_width(codes, bits)
    if problem is not None:
        raise ValueError(problem)


def codes_outside_width(codes: Tensor, bits: int) -> str | None:
    """Why integer ``codes`` do not fit ``bits``-bit two's complement, or None when they do."""
    if not codes.numel():
        return None
    low, high = int(codes.min()), int(codes.max())
    if low < -(2 ** (bits - 1)) or high >= 2 ** (bits - 1):
        return (f"codes in [{low}, {high}] do not fit {bits}-bit two's complement "
                f"[{-(2 ** (bits - 1))}, {2 ** (bits - 1) - 1}]")
    return None
