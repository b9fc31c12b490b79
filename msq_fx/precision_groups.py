"""The precision group as the controller sees it, and the record of one decision about it.

A group is every weight that must share one width (passes/group.py decides which); its members'
quantizers hold the group's bits and prune step p, which :class:`PrecisionGroup` reads and sets
for all of them at once. :class:`PruneRecord` is what one pruning step decided for one group.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .owners import QuantizedWeight

__all__ = ["PrecisionGroup", "PruneRecord", "saved_widths"]


@dataclass(frozen=True)
class PruneRecord:
    """What one pruning step decided for one group."""

    epoch: int  # the epoch it ran after; for a prune counted in steps, the epochs completed
    group: str
    kind: str
    params: int
    beta: float
    hessian_trace: float | None
    omega: float | None
    lsbs_dropped: int
    bits_before: int
    bits_after: int
    next_prune_step: int
    compression: float
    hessian_method: str | None = None  # how H v was computed; None when no Hessian was taken
    step: int | None = None  # the optimizer step it ran after, when pruning counts steps
    # pruning.last_prune="measured", in the prune that reached the target: the loss increase
    # measured for the drop the group took, or for its 1-LSB drop when it took none.
    drop_loss_increase: float | None = None


class PrecisionGroup:
    """The members of one precision group; their quantizers hold the group's bits and p."""

    def __init__(self, name: str, members: list[QuantizedWeight]) -> None:
        self.name = name
        self.members = members
        self.kind = members[0].quantizer.kind
        self.params = sum(m.latent.numel() for m in members)
        self.prunable = all(m.quantizer.prunable for m in members)

    @property
    def bits(self) -> int:
        return self.members[0].quantizer.num_bits

    @property
    def prune_step(self) -> int:
        return self.members[0].quantizer.prune_lsbs

    def set_bits(self, bits: int) -> None:
        for member in self.members:
            member.quantizer.set_bits(bits)

    def set_prune_step(self, p: int) -> None:
        for member in self.members:
            member.quantizer.set_prune_step(p)

    def droppable_lsbs(self, min_bits: int) -> int:
        """The LSBs the next prune would drop: p, clipped so the width stays >= ``min_bits``."""
        return max(0, min(self.prune_step, self.bits - min_bits))

    def lsb_nonzero_rate(self, min_bits: int) -> float:
        """beta over all member weights pooled, over the LSBs the next prune would drop."""
        k = self.droppable_lsbs(min_bits)
        nonzero = sum(m.quantizer.lsb_nonzero_rate(m.latent, k) * m.latent.numel()
                      for m in self.members)
        return nonzero / self.params

    def trace(self, traces: dict[int, float]) -> float:
        """Tr(H) of the group: its members' traces (``traces`` is keyed by id of the latent)."""
        return sum(traces[id(m.latent)] for m in self.members)

    def omega_growth_per_bit(self, traces: dict[int, float], min_bits: int,
                             per_weight: bool = False) -> float:
        """What the next prune costs per bit of memory it saves: (Omega at the width after it -
        Omega now) / (weights x LSBs dropped), each member's scale as it is; inf when the
        group is at ``min_bits``. ``per_weight`` measures Omega with the average trace,
        Tr(H) / weights (``pruning.omega_scale="per_weight"``): the second-order loss increase
        per bit saved, which the raw trace overstates in proportion to the group's size."""
        k = self.droppable_lsbs(min_bits)
        if k == 0:
            return math.inf
        return self.omega_growth(traces, k, per_weight) / (self.params * k)

    def omega_growth(self, traces: dict[int, float], lsbs: int, per_weight: bool = False) -> float:
        """Omega at ``lsbs`` bits under the group's width minus Omega now, each member's scale as
        it is; ``per_weight`` takes the average trace, Tr(H) / weights, in place of Tr(H)."""
        lower = sum(traces[id(m.latent)]
                    * m.quantizer.quantization_error(m.latent, self.bits - lsbs)
                    for m in self.members)
        growth = lower - self.omega(traces)
        return growth / self.params if per_weight else growth

    def omega(self, traces: dict[int, float]) -> float:
        """Omega_g = sum over members of Tr(H_l) * ||W_q - W||^2 at the group's width."""
        return sum(traces[id(m.latent)] * m.quantizer.quantization_error(m.latent, self.bits)
                   for m in self.members)


def saved_widths(groups: Sequence[PrecisionGroup]) -> Callable[[], None]:
    """Copy each group's width and p and its members' learned scales; the returned function
    puts them back (what a prune, or a trial drop, changes in the model besides BatchNorm)."""
    widths = [(group, group.bits, group.prune_step) for group in groups]
    scales = [(scale, scale.detach().clone()) for group in groups for member in group.members
              if (scale := member.quantizer.learned_scale) is not None]

    def restore() -> None:
        for group, bits, prune_step in widths:
            group.set_bits(bits)
            group.set_prune_step(prune_step)
        with torch.no_grad():
            for scale, saved in scales:
                scale.copy_(saved)
    return restore
