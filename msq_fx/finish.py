"""The prune that reaches the target, chosen by measurement (``pruning.last_prune="measured"``).

Every other rule picks the last drops by an estimate: beta, or Omega from a Hutchinson trace that,
for one layer, can be far off, even below zero (docs/fidelity.md). The last prune decides the
final widths, and trying each candidate costs a few forwards, so here each candidate drop is
tried: :func:`measured_drop_costs` applies it as the prune would (narrower width, scale re-fitted,
BatchNorm statistics re-estimated), measures the loss on the prune's batches and puts everything
back; :func:`cheapest_cover` then picks the set of drops with the least summed loss increase
among those that save enough bits to reach the target.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from .batchnorm import recalibrate_batchnorm, saved_statistics, tracking_batchnorms
from .precision_groups import PrecisionGroup, saved_widths
from .utils import call_model, model_mode

__all__ = ["cheapest_cover", "measured_drop_costs"]

# The cover's table has at most this many rows (bits saved, in units): past it, bits are counted
# in coarser units, rounded down, so every set it returns still saves enough.
_COVER_RESOLUTION = 4096


def cheapest_cover(options: dict[str, Sequence[tuple[int, float]]], needed: int,
                   ) -> dict[str, int] | None:
    """The choice of at most one option per key whose bits saved sum to at least ``needed`` and
    whose costs sum least, of those the one saving the fewest bits; None when even every key's
    largest saving falls short.

    Args:
        options: per group name, its alternative drops as ``(bits saved, cost)``. A negative
            cost lowers the sum, so such a drop is taken even where the target does not need it
            (the measured finish passes costs clipped at zero for that reason).
        needed: the bits that must be saved, >= 0.

    Returns:
        Group name -> index into its options, for the groups that drop; groups not named keep
        their width. Remaining ties go to the choice found first in the order of ``options``.

    Exact (a 0/1 knapsack by dynamic programming over bits saved) while ``needed`` is at most
    4,096 bits; above, bits saved are counted in units of ``ceil(needed / 4096)``, each option's
    saving rounded down, so the result may save a little more than the optimum would but never
    less than ``needed`` (and when the rounding leaves the goal unreached, every group takes its
    largest drop).

    Example:
        >>> cheapest_cover({"a": [(400, 1.0)], "b": [(600, 1.5)], "c": [(1000, 3.0)]}, 1000)
        {'a': 0, 'b': 0}
    """
    if needed < 0:
        raise ValueError(f"cheapest_cover: needed must be >= 0, got {needed}")
    unit = max(1, math.ceil(needed / _COVER_RESOLUTION))
    goal = math.ceil(needed / unit)
    # saved units (capped at goal) -> (summed cost, bits saved, chosen options)
    best: dict[int, tuple[float, int, tuple[tuple[str, int], ...]]] = {0: (0.0, 0, ())}
    for name, alternatives in options.items():
        grown = dict(best)
        for reached, (cost, saved, chosen) in best.items():
            for index, (bits, option_cost) in enumerate(alternatives):
                key = min(goal, reached + bits // unit)
                value = (cost + option_cost, saved + bits, chosen + ((name, index),))
                if key not in grown or value[:2] < grown[key][:2]:
                    grown[key] = value
        best = grown
    if goal in best:
        return dict(best[goal][2])
    # Only the rounding can leave a reachable goal unreached: then every group's largest drop.
    largest = {name: max(range(len(alternatives)), key=lambda i: alternatives[i][0])
               for name, alternatives in options.items() if alternatives}
    if sum(options[name][index][0] for name, index in largest.items()) >= needed:
        return largest
    return None


@torch.no_grad()
def measured_drop_costs(model: nn.Module, groups: Sequence[PrecisionGroup], min_bits: int,
                        batches: list, loss_fn: Callable, *, refit: bool, recalibration: int,
                        training: bool = False,
                        all_reduce: Callable[[Tensor], Tensor] | None = None,
                        ) -> dict[str, list[float]]:
    """The loss increase each candidate drop causes, measured.

    Reads each group's width and p (``droppable_lsbs``); for each group and each k from 1 to the
    LSBs its next prune may drop, sets the group k bits narrower, re-fits its learned scales
    (``refit``), re-estimates the BatchNorm statistics on the first ``recalibration`` batches,
    and takes the mean of ``loss_fn(model(inputs), targets)`` over ``batches`` with the model in
    train (``training``) or eval mode; the baseline it subtracts is that loss at the current
    widths, the statistics re-estimated the same way. Changes nothing: every width, learned
    scale and BatchNorm statistic is put back after each trial, also when one fails.

    Returns:
        Group name -> the loss increase of dropping 1, 2, ... LSBs (an empty list for a group at
        ``min_bits``). Under torch.distributed, ``all_reduce`` averages them over the ranks, so
        every rank makes the same choice.
    """
    norms = tracking_batchnorms(model)
    trials = [(group, k) for group in groups
              for k in range(1, group.droppable_lsbs(min_bits) + 1)]
    with model_mode(model, training=training), _restored(groups, norms):
        # Against statistics re-estimated the same way at the current widths: the
        # re-estimation alone lowers the loss on these batches, which is no merit of a drop.
        if recalibration:
            recalibrate_batchnorm(model, batches[:recalibration])
        baseline = _mean_loss(model, batches, loss_fn)
        losses = []
        for group, k in trials:
            with _restored([group], norms):
                group.set_bits(group.bits - k)
                if refit:
                    for member in group.members:
                        member.quantizer.refit_scale(member.latent)
                if recalibration:
                    recalibrate_batchnorm(model, batches[:recalibration])
                losses.append(_mean_loss(model, batches, loss_fn) - baseline)
    increases = torch.tensor(losses, dtype=torch.float64)
    if all_reduce is not None and trials:
        increases = all_reduce(increases)
    costs: dict[str, list[float]] = {group.name: [] for group in groups}
    for (group, _), increase in zip(trials, increases.tolist()):
        costs[group.name].append(increase)
    return costs


def _mean_loss(model: nn.Module, batches: list, loss_fn: Callable) -> float:
    return sum(float(loss_fn(call_model(model, inputs), targets))
               for inputs, targets in batches) / len(batches)


class _restored:
    """On exit, put back the widths, p and learned scales of ``groups`` and the running
    statistics of ``norms`` as they were on entry."""

    def __init__(self, groups: Sequence[PrecisionGroup], norms: Sequence[nn.Module]) -> None:
        self.groups, self.norms = groups, norms

    def __enter__(self) -> None:
        self.restore_widths = saved_widths(self.groups)
        self.restore_statistics = saved_statistics(self.norms)

    def __exit__(self, *exc_info) -> None:
        self.restore_widths()
        self.restore_statistics()
