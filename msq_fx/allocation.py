"""One-shot Hessian bit allocation: the baseline MSQ's gradual pruning is measured against.

Tools such as HAWQ-V3 and AIMET choose every layer's width once, from a sensitivity measured
before fine-tuning, then run plain QAT. :func:`allocate_bits_once` does that with MSQ's own
sensitivity: Omega_g(b) = Tr(H_g) * ||W_q(b) - W||^2 for every group g and width b, then lowers
widths greedily, one bit at a time, always where Omega grows least per bit saved (with
``pruning.omega_scale="per_weight"``, Omega with the average trace Tr(H_g) / weights), until the
target compression is reached. The controller is then done: regularization and pruning are off
and training is plain QAT at the chosen widths.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable

from torch import Tensor

from . import quant
from .config import MSQConfig
from .precision_groups import PrecisionGroup, PruneRecord
from .sensitivity import group_traces, warn_of_negative_traces

if TYPE_CHECKING:  # the controller calls lower_widths_by_omega: no import at run time
    from .controller import MSQController

__all__ = ["allocate_bits_once", "lower_widths_by_omega"]


def allocate_bits_once(controller: MSQController, batches: Iterable,
                       loss_fn: Callable[[Any, Any], Tensor]) -> list[PruneRecord]:
    """Choose every prunable group's width once so that the compression reaches the target.

    Reads the Hessian traces on the first ``hessian.batches`` of ``batches`` (the same
    estimator the pruning step uses). A learned scale is re-fitted
    (:func:`msq_fx.quant.best_clip`) at its group's chosen width, as a calibration at the final
    width would set it. Returns one record per group (epoch 0) and marks the controller done.
    ``MSQConfig(pruning={"schedule": "one_shot"})`` makes the controller's first due prune do
    the same inside the training loop.
    """
    groups = controller._active_groups()
    traces, method = group_traces(controller.model, [m for g in groups for m in g.members],
                                  batches, loss_fn, controller.config, controller.prune_count)
    before = {g.name: g.bits for g in groups}
    omega = lower_widths_by_omega(groups, traces, controller.config, controller.compression)
    warn_of_negative_traces("allocate_bits_once", [g for g in groups if g.bits != before[g.name]],
                            traces, controller.config.hessian.trace_margin)
    for member in (m for g in groups for m in g.members):
        member.quantizer.refit_scale(member.latent)
    controller.done = True
    records = [PruneRecord(
        epoch=0, group=g.name, kind=g.kind, params=g.params, beta=float("nan"),
        hessian_trace=g.trace(traces),
        omega=omega[g.name][g.bits], lsbs_dropped=before[g.name] - g.bits,
        bits_before=before[g.name], bits_after=g.bits, next_prune_step=g.prune_step,
        compression=controller.compression(), hessian_method=method) for g in groups]
    controller.history.extend(records)
    return records


def lower_widths_by_omega(groups: list[PrecisionGroup], traces: dict[int, float],
                          config: MSQConfig, compression: Callable[[], float],
                          ) -> dict[str, dict[int, float]]:
    """Lower the widths of ``groups`` one bit at a time, always where Omega grows least per bit
    saved, until ``compression()`` reaches ``config.target_compression`` or every group is at
    ``quantization.min_bits``.

    Reads the groups' latents, scales and ``traces`` (Tr(H) per member latent, keyed by id);
    changes only the groups' widths (scales are the caller's to re-fit). Returns Omega_g(b) for
    every group and width from the floor to its width before (each learned scale at its best
    clip at b), the table the choice was made on.
    """
    floor = config.quantization.min_bits
    omega = {g.name: {b: _group_error(g, b) * g.trace(traces) for b in range(floor, g.bits + 1)}
             for g in groups}
    # Per bit saved; "per_weight" takes the average trace, as the controller's drop order does.
    per_bit = {g.name: g.params * (g.params if config.pruning.omega_scale == "per_weight" else 1)
               for g in groups}
    while compression() < config.target_compression:
        lowerable = [g for g in groups if g.bits > floor]
        if not lowerable:
            break
        cheapest = min(lowerable, key=lambda g: (omega[g.name][g.bits - 1]
                                                 - omega[g.name][g.bits]) / per_bit[g.name])
        cheapest.set_bits(cheapest.bits - 1)
    return omega


def _group_error(group: PrecisionGroup, bits: int) -> float:
    """||W_q - W||^2 over the group at ``bits``, with each learned scale at its best clip there."""
    total = 0.0
    for member in group.members:
        quantizer, latent = member.quantizer, member.latent.detach()
        scale = None
        if quantizer.learned_scale is not None:
            scale = quant.best_clip(latent, bits, quantizer.grid,
                                    tuple(quantizer.learned_scale.shape))
        total += quant.quantization_error(latent, bits, quantizer.grid, scale)
    return total
