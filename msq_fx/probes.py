"""Rademacher probes for Hutchinson's estimator: drawn, packed, and scaled into offsets.

A probe is one +-1 entry per weight, drawn on CPU from a seeded generator so the stream
depends only on the shapes and a seed reproduces results on any device. The double backward
uses them as tensors at once (:func:`rademacher_like`); the finite-difference estimator keeps
them as signs packed eight to a byte (:class:`PackedSigns`) and makes each offset ``h v`` where
it is used (:class:`ScaledProbes`).
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch

__all__ = ["rademacher_like", "rademacher_signs", "PackedSigns", "ScaledProbes"]


def rademacher_like(
    params: list[torch.Tensor], generator: torch.Generator | None
) -> list[torch.Tensor]:
    """+-1 per element in each tensor's dtype, on its device (Hutchinson uses them at once)."""
    return [bits.to(device=param.device, dtype=param.dtype).mul_(2).sub_(1)
            for bits, param in zip(_random_bits(params, generator), params)]


def rademacher_signs(
    params: list[torch.Tensor], generator: torch.Generator | None
) -> list[PackedSigns]:
    """+-1 per element, one bit each (a 32nd of float32's memory), on each tensor's device."""
    return [PackedSigns(bits, param.device)
            for bits, param in zip(_random_bits(params, generator), params)]


def _random_bits(params: list[torch.Tensor],
                 generator: torch.Generator | None) -> Iterator[torch.Tensor]:
    """0/1 uint8 tensors shaped like ``params``, drawn on CPU one at a time."""
    # Drawn on CPU for every tensor, used or not, so the random stream depends
    # only on the shapes and a seed reproduces results on any device.
    for param in params:
        yield torch.randint(0, 2, param.shape, generator=generator, dtype=torch.uint8)


class PackedSigns:
    """The signs ``2 b - 1`` of 0/1 ``bits``, kept eight to a byte on ``device``.

    ``to(dtype)`` makes the +-1 tensor. On a model of billions of weights the probe is the
    estimator's one weight-sized store: as bits it is 0.5 GB for 4 B weights, where int8
    signs were 4 GB.
    """

    def __init__(self, bits: torch.Tensor, device: torch.device | str = "cpu") -> None:
        self.shape = bits.shape
        flat = bits.reshape(-1)
        padded = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)]).view(-1, 8)
        self.packed = padded.bitwise_left_shift(_bit_positions(padded.device)).sum(
            1, dtype=torch.uint8).to(device)

    def to(self, dtype: torch.dtype, copy: bool = True) -> torch.Tensor:
        """The +-1 tensor in ``dtype`` (always a new tensor; ``copy`` is for the Tensor API)."""
        bits = self.packed.unsqueeze(1).bitwise_right_shift(_bit_positions(self.packed.device))
        bits = bits.bitwise_and_(1).reshape(-1)[:self.shape.numel()].reshape(self.shape)
        return bits.to(dtype).mul_(2).sub_(1)


def _bit_positions(device: torch.device) -> torch.Tensor:
    return torch.arange(8, dtype=torch.uint8, device=device)


class ScaledProbes(Sequence[torch.Tensor]):
    """``offsets[l] = scale * probes[l]`` in ``params[l]``'s dtype, made when indexed.

    The probes stay packed signs (or whatever tensors they were given), so the
    finite-difference estimator holds a 32nd of a weight-sized copy rather than one; a user of
    an offset holds it only while it is used. The same index gives the same values every time,
    so a consumer may make an offset again instead of keeping it.
    """

    def __init__(self, probes: list[torch.Tensor], scale: float,
                 dtypes: Sequence[torch.dtype]) -> None:
        self.probes, self.scale, self.dtypes = probes, scale, list(dtypes)

    def __len__(self) -> int:
        return len(self.probes)

    def __getitem__(self, index: int) -> torch.Tensor:  # noqa: D105
        return self.probes[index].to(self.dtypes[index], copy=True).mul_(self.scale)
