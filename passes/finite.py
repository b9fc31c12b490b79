"""Finite pass: find the weights to quantize that hold NaN or infinite values.

Reads: the Parameters the discover pass chose to quantize (``Discovery.targets``), resolved in
the model by their first FQN. Returns: one :class:`NonFinite` per tensor holding a NaN or an
infinity, naming it and counting what it holds. Changes nothing.

A quantizer's scale is max|w| (or a clip searched from it), so a single NaN or infinity makes
every code of its tensor meaningless; ``prepare`` refuses such a model before rewriting it. The
MSQ controller applies :func:`non_finite_summary` to the latent weights before every prune.
Tensors are scanned in chunks, so the check holds at most one chunk's mask in memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import Tensor, nn

from .discover import WeightTarget

__all__ = ["NonFinite", "non_finite_weights", "non_finite_summary"]

#: Elements scanned at a time: bounds the boolean masks of a large tensor.
_CHUNK = 1 << 24


@dataclass(frozen=True)
class NonFinite:
    """A weight holding NaN or infinite values: its name and e.g. "3 NaN, 1 inf of 4096"."""

    name: str
    summary: str


def non_finite_weights(model: nn.Module, targets: Iterable[WeightTarget]) -> list[NonFinite]:
    """The targets of ``model`` whose Parameter holds a NaN or an infinity, in target order."""
    found = []
    for target in targets:
        summary = non_finite_summary(model.get_parameter(target.name))
        if summary is not None:
            found.append(NonFinite(target.name, summary))
    return found


def non_finite_summary(tensor: Tensor) -> str | None:
    """None when every value of ``tensor`` is finite, else how many are NaN and infinite.

    A tensor on the meta device holds no values and counts as finite.
    """
    if tensor.is_meta or tensor.numel() == 0:
        return None
    flat = tensor.detach().reshape(-1)
    chunks = flat.split(_CHUNK)
    if all(bool(torch.isfinite(chunk).all()) for chunk in chunks):
        return None
    nan = sum(int(torch.isnan(chunk).sum()) for chunk in chunks)
    inf = sum(int(torch.isinf(chunk).sum()) for chunk in chunks)
    counts = [f"{count} {what}" for count, what in ((nan, "NaN"), (inf, "inf")) if count]
    return f"{', '.join(counts)} of {flat.numel()}"
