"""MSQController: Algorithm 1 of the paper (LSB regularization, Hessian-aware bit pruning).

Usage, once per training run::

    ctl = MSQController(qmodel, config)
    for epoch in range(1, epochs + 1):          # epochs count from 1, as in Algorithm 1
        for x, y in loader:
            loss = criterion(qmodel(x), y) + ctl.regularization()
            ...
        ctl.epoch_end(epoch, hessian_batches, criterion)

Decisions are made per precision group (see passes/group.py); a group is every weight that must
share one width. What the paper leaves open, and what this implementation chose:

* beta (Alg. 1 line 16) is the fraction of a group's weights whose p LSBs are not all zero.
* Stop rule (lines 10/24 print the inequality reversed): prune while compression < Gamma; in the
  round that reaches Gamma, groups are pruned in ascending-beta order until it is reached
  (``pruning.drop_order="omega"``: in ascending order of Omega growth per bit saved); then
  regularization and pruning stop for good and training is plain QAT.
* Omega_g = sum over members of Tr(H_l) * ||W_q - W||^2, with the raw (not per-parameter) trace
  of the loss Hessian w.r.t. the latent weights through the straight-through quantizer, i.e. the
  Hessian at the quantized point; Hutchinson with Rademacher probes seeded by (seed, prune index),
  on ``hessian_batches`` batches, in eval mode (running norm statistics, no dropout). H v comes
  from a double backward, or (``hessian.method``) from the central difference of two gradients
  with the quantized weights displaced, which needs about a training step's memory instead of
  about 2.5 times it (ResNet-20); "auto" uses the first and falls back to the second on
  out-of-memory (msq_fx/sensitivity.py takes the traces). ``pruning.omega_scale="per_weight"``
  divides it by the group's weight count squared (mean curvature times mean squared error), so
  large layers are not p = 1 for their size alone.
* p := 2 where Omega_g < mean(Omega) over the groups still pruning, else 1; p = 1 for everyone at
  the first prune (paper, supplement §1). A prune never takes a group below ``min_bits``; beta and
  the LSB penalty look at the LSBs the next prune would actually drop (p clipped at the floor).
* A group whose width a policy fixes (``first_last="fixed"``) is never pruned or regularized.
* ``pruning.penalty_scope="planned"``: once a prune sees that the next one will reach the
  target, the penalty pulls only the groups that prune would take (planned by running the
  drop rules on the current widths with every beta taken as 0, then undone), and only those
  groups can be pruned; the plan holds until a prune changes a width.
* ``pruning.schedule="one_shot"`` replaces all of this with one decision: the first due prune
  sets every width from Omega (msq_fx.allocation.lower_widths_by_omega) and the run is plain QAT.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict
from typing import Any, Callable, Iterable

import torch
from tabulate import tabulate
from torch import Tensor, nn

from msq_fx.passes.finite import non_finite_summary

from .allocation import lower_widths_by_omega
from .batchnorm import recalibrate_batchnorm
from .config import MSQConfig
from .errors import MSQError
from .finish import cheapest_cover, measured_drop_costs
from .modules import WeightFakeQuant
from .owners import QuantizedWeight, iter_quantized_weights
from .precision_groups import PrecisionGroup, PruneRecord, saved_widths
from .sensitivity import distributed_mean, group_traces, warn_of_negative_traces
from .state import prepared_state
from .utils import take

__all__ = ["MSQController"]

logger = logging.getLogger("msq_fx")


class MSQController:
    """Owns Algorithm 1's state for one prepared model; see the module docstring.

    Args:
        qmodel: a model returned by ``msq_fx.prepare`` (or its DDP / DataParallel wrapper).
        config: the schedule (``target_compression``, ``pruning``, ``hessian``, ``seed``); its
            ``quantization`` section must be the one the model was prepared with. Default: the
            config the model was prepared with.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> from torch import nn
        >>> import msq_fx
        >>> _ = torch.manual_seed(0)
        >>> config = msq_fx.MSQConfig(pruning={"interval": 1, "threshold": 1.0})
        >>> qmodel = msq_fx.prepare(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)),
        ...                         config=config)
        >>> controller = msq_fx.MSQController(qmodel, config)
        >>> optimizer = torch.optim.SGD(qmodel.parameters(), lr=0.1)
        >>> batches = [(torch.randn(16, 4), torch.randint(0, 2, (16,)))]
        >>> for epoch in range(1, 3):
        ...     for x, y in batches:
        ...         loss = F.cross_entropy(qmodel(x), y) + controller.regularization()
        ...         optimizer.zero_grad(); loss.backward(); optimizer.step()
        ...     records = controller.epoch_end(epoch, batches, F.cross_entropy)
        >>> controller.compression() > 32 / 8
        True
    """

    def __init__(self, qmodel: nn.Module, config: MSQConfig | None = None) -> None:
        self.model = _unwrap(qmodel)
        self.config = _checked_config(self.model, config)
        weights = [w for w in iter_quantized_weights(self.model)
                   if isinstance(w.quantizer, WeightFakeQuant)]
        if not weights:
            # The error convert() raises for the same mistake.
            raise MSQError(f"MSQController needs a model returned by msq_fx.prepare(); "
                           f"{type(self.model).__name__} holds no trainable MSQ quantizer (a "
                           f"float model, or one already converted). Pass the prepared model.")
        by_group: dict[str, list[QuantizedWeight]] = {}
        for weight in weights:
            by_group.setdefault(weight.quantizer.group, []).append(weight)
        self.groups = [PrecisionGroup(name, members) for name, members in by_group.items()]
        for group in self.groups:  # one decision per group: start every member at the same width
            group.set_bits(min(m.quantizer.num_bits for m in group.members))
        self.last_epoch = 0
        self.last_step = 0
        self.prune_count = 0
        self.done = self.compression() >= self.config.target_compression
        self.history: list[PruneRecord] = []
        #: Names of the groups the LSB penalty pulls, or None for every group still pruning
        #: (``pruning.penalty_scope``).
        self.penalized: set[str] | None = None
        target, min_bits = self.config.target_compression, self.config.quantization.min_bits
        if target >= 0.95 * 32 / min_bits:
            # At 32/min_bits the target is met only when every weight sits at min_bits: the run
            # ends in uniform precision however the Hessian ranked the layers.
            logger.warning("target_compression %gx is %s 32/min_bits = %gx: it is reached only "
                           "with (nearly) every layer at min_bits=%d, i.e. uniform precision; "
                           "lower the target or min_bits for a mixed-precision result",
                           target, "equal to" if target * min_bits == 32 else "close to",
                           32 / min_bits, min_bits)

    # ------------------------------------------------------------------ per step
    def regularization(self) -> Tensor:
        """lambda * sum of |B_p| over the groups still pruning; zero once the target is reached,
        and throughout under ``pruning.schedule="one_shot"``.

        Returns:
            A scalar tensor to add to the training loss (it has gradients for the latents).

        Example:
            >>> import torch, msq_fx
            >>> from torch import nn
            >>> controller = msq_fx.MSQController(msq_fx.prepare(nn.Linear(4, 2)))
            >>> penalty = controller.regularization()
            >>> penalty.shape, penalty.requires_grad
            (torch.Size([]), True)
        """
        device = self.groups[0].members[0].latent.device
        active = [g for g in self._active_groups()
                  if self.penalized is None or g.name in self.penalized]
        if self.done or self.config.pruning.reg_strength == 0 or not active \
                or self.config.pruning.schedule == "one_shot":
            return torch.zeros((), device=device)
        floor = self.config.quantization.min_bits
        units = self.config.pruning.penalty_units
        terms = [m.quantizer.lsb_l1(m.latent, g.droppable_lsbs(floor), units)
                 for g in active for m in g.members]
        return self.config.pruning.reg_strength * torch.stack(terms).sum()

    def compression(self) -> float:
        """32 * sum(params) / sum(bits * params) over the quantized weights (paper convention).

        Returns:
            The compression of the current widths, e.g. 4.0 with every weight at 8 bits.

        Example:
            >>> import msq_fx
            >>> from torch import nn
            >>> msq_fx.MSQController(msq_fx.prepare(nn.Linear(4, 2))).compression()
            4.0
        """
        return self._compression_saving(0)

    def _compression_saving(self, bits_saved: int) -> float:
        """The compression with ``bits_saved`` fewer weight bits than the current widths hold."""
        params = sum(g.params for g in self.groups)
        return 32.0 * params / (sum(g.bits * g.params for g in self.groups) - bits_saved)

    # ------------------------------------------------------------------ per epoch
    def epoch_end(self, epoch: int, batches: Iterable, loss_fn: Callable[[Any, Any], Tensor],
                  ) -> list[PruneRecord]:
        """Run Algorithm 1's pruning step if ``epoch`` (counted from 1) is a multiple of I.

        With ``pruning.interval_unit="step"`` pruning happens in :meth:`step_end` instead.

        Args:
            epoch: the epoch just completed, counted from 1; each is processed once.
            batches: yields ``(inputs, targets)``; the first ``hessian.batches`` of them feed
                the Hessian (and the first ``pruning.bn_recalibration_batches`` the BatchNorm
                statistics).
            loss_fn: ``loss_fn(model(inputs), targets)`` gives the loss whose Hessian is taken.

        Returns:
            The ``PruneRecord`` of each group this step decided on (empty when nothing was
            decided).

        Raises:
            MSQError: a latent, learned scale, LSB rate or Hessian trace of some group is NaN or
                infinite; nothing was decided and the epoch can be run again once the batch or
                learning rate is fixed.

        Example:
            >>> import torch, torch.nn.functional as F, msq_fx
            >>> from torch import nn
            >>> _ = torch.manual_seed(0)
            >>> config = msq_fx.MSQConfig(pruning={"interval": 1, "threshold": 1.0})
            >>> qmodel = msq_fx.prepare(nn.Sequential(nn.Linear(4, 8), nn.ReLU(),
            ...                                       nn.Linear(8, 2)), config=config)
            >>> controller = msq_fx.MSQController(qmodel, config)
            >>> batches = [(torch.randn(16, 4), torch.randint(0, 2, (16,)))]
            >>> records = controller.epoch_end(1, batches, F.cross_entropy)
            >>> [(r.group, r.bits_before, r.bits_after) for r in records]
            [('0.weight', 8, 7), ('2.weight', 8, 7)]
        """
        _check_count("epoch_end", "epoch", epoch, self.last_epoch)
        due = self.config.pruning.interval_unit == "epoch" \
            and epoch % self.config.pruning.interval == 0
        records = self._prune_step(epoch, None, batches, loss_fn) if due and not self.done \
            else []
        # Only a step that completed uses up its epoch, so a failed one can be retried.
        self.last_epoch = epoch
        return records

    def step_end(self, step: int, batches: Iterable, loss_fn: Callable[[Any, Any], Tensor],
                 ) -> list[PruneRecord]:
        """Call after optimizer step ``step`` (counted from 1 over the whole run): with
        ``pruning.interval_unit="step"``, runs the pruning step every I-th step.

        Costs nothing on the steps between prunes.

        Args:
            step: the optimizer step just taken, counted from 1 over the whole run.
            batches: as for :meth:`epoch_end`; read only when a prune is due (pass a list, or
                an iterable that starts afresh).
            loss_fn: as for :meth:`epoch_end`.

        Returns:
            That step's ``PruneRecord`` list (empty between prunes).

        Raises:
            MSQError: as :meth:`epoch_end`, on a non-finite value found by a due prune.

        Example:
            >>> import torch, torch.nn.functional as F, msq_fx
            >>> from torch import nn
            >>> _ = torch.manual_seed(0)
            >>> config = msq_fx.MSQConfig(pruning={"interval": 2, "interval_unit": "step",
            ...                                    "threshold": 1.0})
            >>> controller = msq_fx.MSQController(msq_fx.prepare(nn.Linear(4, 2), config=config))
            >>> batches = [(torch.randn(16, 4), torch.randint(0, 2, (16,)))]
            >>> [len(controller.step_end(step, batches, F.cross_entropy)) for step in (1, 2)]
            [0, 1]
        """
        _check_count("step_end", "step", step, self.last_step)
        due = self.config.pruning.interval_unit == "step" \
            and step % self.config.pruning.interval == 0
        records = self._prune_step(self.last_epoch, step, batches, loss_fn) \
            if due and not self.done else []
        self.last_step = step
        return records

    def _prune_step(self, epoch: int, step: int | None, batches: Iterable,
                    loss_fn) -> list[PruneRecord]:
        groups = self._active_groups()
        if not groups:
            self.done = True
            logger.warning("no group can lose more bits; compression %.2fx stays below the target "
                           "%.2fx", self.compression(), self.config.target_compression)
            return []
        where = f"epoch_end(epoch={epoch})" if step is None else f"step_end(step={step})"
        _require_finite_latents(self.groups, where)
        recalibration = self.config.pruning.bn_recalibration_batches
        chosen = take(batches, max(self.config.hessian.batches, recalibration))
        traces, hessian_method = self._hessian_traces(groups, chosen, loss_fn)
        betas = {g.name: g.lsb_nonzero_rate(self.config.quantization.min_bits) for g in groups}
        omegas = {g.name: self._omega(g, traces) for g in groups} if traces else {}
        # Checked before any width changes, so a failed prune can be retried as it was.
        _require_finite_measures(where, betas, {g.name: g.trace(traces) for g in groups}
                                 if traces else {}, omegas)
        before = {g.name: g.bits for g in groups}
        restore = self._restore_point(groups)
        try:
            measured = self._change_widths(where, groups, chosen, loss_fn, betas, traces, omegas,
                                           before)
        except BaseException:
            # A prune that fails part-way (a batch that only the BatchNorm re-estimate reads, an
            # interrupt) leaves widths, p, scales and the plan as they were, so the call can be
            # run again and prunes once.
            restore()
            raise
        self.prune_count += 1
        records = [PruneRecord(
            epoch=epoch, group=g.name, kind=g.kind, params=g.params, beta=betas[g.name],
            hessian_trace=g.trace(traces) if traces else None,
            omega=omegas.get(g.name), lsbs_dropped=before[g.name] - g.bits,
            bits_before=before[g.name], bits_after=g.bits, next_prune_step=g.prune_step,
            compression=self.compression(), hessian_method=hessian_method, step=step,
            drop_loss_increase=_measured_cost(measured.get(g.name), before[g.name] - g.bits))
            for g in groups]
        self.history.extend(records)
        logger.info("%s %d: pruned %d of %d groups, compression %.2fx%s",
                    "epoch" if step is None else "step", epoch if step is None else step,
                    sum(r.lsbs_dropped > 0 for r in records), len(groups), self.compression(),
                    " (target reached: plain QAT from here)" if self.done else "")
        return records

    def _change_widths(self, where: str, groups: list[PrecisionGroup], chosen: list, loss_fn,
                       betas: dict[str, float], traces: dict[int, float],
                       omegas: dict[str, float], before: dict[str, int]) -> dict[str, list[float]]:
        """The part of a prune that changes the model: the new widths and p, the plan, the
        re-fitted scales and the re-estimated BatchNorm statistics (``before``: each group's
        width as the prune began). Returns the measured finish's loss increases (empty unless
        it ran)."""
        measured: dict[str, list[float]] = {}
        if self.config.pruning.schedule == "one_shot":
            lower_widths_by_omega(groups, traces, self.config, self.compression)
            self.done = True
            if self.compression() < self.config.target_compression:
                logger.warning("one-shot allocation: every group is at min_bits=%d and the "
                               "compression %.2fx stays below the target %.2fx; lower the "
                               "target or quantization.min_bits",
                               self.config.quantization.min_bits, self.compression(),
                               self.config.target_compression)
        else:
            ordered = self._drop_order(groups, betas, traces)
            if self.penalized is not None:
                # The groups left out were not pulled: their LSB rate says nothing about
                # whether their LSBs were emptied, so it cannot qualify them for the drop.
                ordered = [g for g in ordered if g.name in self.penalized]
            if self.config.pruning.last_prune == "measured" \
                    and self._reaches_target(self._waiting(ordered, betas)):
                measured = self._measured_finish(where, groups, chosen, loss_fn)
            else:
                self._drop_lsbs(ordered, betas, traces)
            self._reassign_prune_steps(groups, omegas)
        pruned = [g for g in groups if g.bits != before[g.name]]
        if not measured:  # a measured finish did not read the traces to choose its drops
            warn_of_negative_traces(where, pruned, traces, self.config.hessian.trace_margin)
        # A plan holds until a prune changes a width: re-planning on every prune's fresh (noisy)
        # traces can switch the pull to another group and waste the LSBs the penalty had
        # already emptied. (The one-shot schedule is done here, so it never plans.)
        if self.config.pruning.penalty_scope == "planned" and not self.done \
                and (pruned or self.penalized is None):
            self.penalized = self._planned_prune(betas, traces)
        if self.config.pruning.scale_after_prune == "refit":
            for member in (m for g in pruned for m in g.members):
                member.quantizer.refit_scale(member.latent)
        recalibration = self.config.pruning.bn_recalibration_batches
        if recalibration and pruned:
            self._recalibrate_batchnorm(chosen[:recalibration])
        return measured

    def _restore_point(self, groups: list[PrecisionGroup]) -> Callable[[], None]:
        """What :meth:`_change_widths` may change, copied, and a function that puts it back
        (the BatchNorm statistics put themselves back when their re-estimate fails)."""
        restore_widths = saved_widths(groups)
        done, penalized = self.done, self.penalized

        def restore() -> None:
            restore_widths()
            self.done, self.penalized = done, penalized
        return restore

    def _recalibrate_batchnorm(self, batches: list) -> None:
        """Re-estimate the BN statistics after a prune; batches too small for BatchNorm's train
        mode (one value per channel) leave the statistics as they were, with a warning."""
        try:
            recalibrate_batchnorm(self.model, batches)
        except ValueError as error:
            if "more than 1 value per channel" not in str(error):
                raise
            logger.warning("BatchNorm statistics not re-estimated after the prune (%s); pass "
                           "larger batches to the prune, or set "
                           "MSQConfig(pruning={'bn_recalibration_batches': 0})", error)

    def _drop_order(self, groups: list[PrecisionGroup], betas: dict[str, float],
                    traces: dict[int, float]) -> list[PrecisionGroup]:
        """``groups`` in the order they lose LSBs (``pruning.drop_order``); ties keep the
        model's order."""
        if self.config.pruning.drop_order == "omega":
            floor = self.config.quantization.min_bits
            per_weight = self.config.pruning.omega_scale == "per_weight"
            growth = {g.name: g.omega_growth_per_bit(traces, floor, per_weight) for g in groups}
            return sorted(groups, key=lambda g: growth[g.name])
        return sorted(groups, key=lambda g: betas[g.name])

    def _drop_lsbs(self, ordered: list[PrecisionGroup], betas: dict[str, float],
                   traces: dict[int, float]) -> None:
        target, floor = self.config.target_compression, self.config.quantization.min_bits
        waiting = self._waiting(ordered, betas)
        while waiting:
            group = self._cheapest_finish(waiting, traces) or waiting[0]
            waiting.remove(group)
            self._lower_width(group, target, floor)
            if self.compression() >= target:
                self.done = True
                return

    def _waiting(self, ordered: list[PrecisionGroup], betas: dict[str, float],
                 ) -> list[PrecisionGroup]:
        """The groups of ``ordered`` whose LSB rate is under alpha, in that order."""
        return [g for g in ordered if betas[g.name] < self.config.pruning.threshold]

    def _reaches_target(self, waiting: list[PrecisionGroup]) -> bool:
        """Whether dropping the next p LSBs of every group in ``waiting`` reaches the target."""
        floor = self.config.quantization.min_bits
        saved = sum(g.droppable_lsbs(floor) * g.params for g in waiting)
        return self._compression_saving(saved) >= self.config.target_compression

    def _measured_finish(self, where: str, groups: list[PrecisionGroup], batches: list,
                         loss_fn) -> dict[str, list[float]]:
        """With ``pruning.last_prune="measured"``, the prune that reaches the target: of every
        group still pruning, each dropping up to its p LSBs, the drops whose measured loss
        increases (msq_fx.finish), each clipped at zero, sum least among those that reach the
        target, and of those the one that saves the fewest bits. Returns the
        measured increases, per group the drops of 1, 2, ... LSBs.

        Every group is a candidate, also one whose LSBs have not emptied (beta >= alpha): the
        measurement sees what dropping non-zero LSBs costs, and on ResNet-20 at 16x the layers
        whose LSBs resist the pull (the first conv and fc, 1,072 weights) would otherwise force
        a whole 2,304-36,864-weight layer to 1 bit to close a gap of about 1,100 bits."""
        pruning, floor = self.config.pruning, self.config.quantization.min_bits
        if not batches:
            raise MSQError(f"MSQController.{where}: the prune that reaches the target measures "
                           f"the loss of each drop (pruning.last_prune='measured') on the "
                           f"batches given to this call, and none were given. Nothing was "
                           f"pruned; pass at least one (inputs, targets) batch, then call "
                           f"{where[:-1]}, ...) again.")
        costs = measured_drop_costs(
            self.model, groups, floor, batches, loss_fn,
            refit=pruning.scale_after_prune == "refit",
            recalibration=pruning.bn_recalibration_batches,
            training=self.config.hessian.model_mode == "train", all_reduce=distributed_mean())
        _require_finite_drop_costs(where, costs)
        needed = self._bits_to_save()
        # A drop measured to lower the loss counts as free, not as a gain: the finish reaches
        # the target and does not go past it for a difference seen on a few batches.
        options = {g.name: [(k * g.params, max(cost, 0.0))
                            for k, cost in enumerate(costs[g.name], 1)] for g in groups}
        chosen = cheapest_cover(options, needed) or {}
        by_name = {g.name: g for g in groups}
        for name, index in chosen.items():
            by_name[name].set_bits(by_name[name].bits - (index + 1))
        self.done = self.compression() >= self.config.target_compression
        logger.info("measured finish: dropped %s (loss +%s)",
                    {name: index + 1 for name, index in chosen.items()},
                    {name: f"{costs[name][index]:.4f}" for name, index in chosen.items()})
        return costs

    def _bits_to_save(self) -> int:
        """The fewest weight bits whose removal reaches the target."""
        params = sum(g.params for g in self.groups)
        held = sum(g.bits * g.params for g in self.groups)
        needed = max(0, math.floor(held - 32.0 * params / self.config.target_compression))
        while self._compression_saving(needed) < self.config.target_compression:
            needed += 1
        return needed

    def _planned_prune(self, betas: dict[str, float], traces: dict[int, float],
                       ) -> set[str] | None:
        """The names of the groups the next prune would lower if every group still pruning
        passed alpha, when that prune reaches the target; None (every group) when it does not.

        Runs the prune's own rules (``drop_order``, ``last_prune``) on the current widths, with
        this prune's betas and traces for the ordering, and puts every width back."""
        groups = self._active_groups()
        widths = {g.name: g.bits for g in groups}
        done = self.done
        try:
            self._drop_lsbs(self._drop_order(groups, betas, traces),
                            {g.name: 0.0 for g in groups}, traces)
            reached = self.done
            planned = {g.name for g in groups if g.bits != widths[g.name]}
        finally:
            for group in groups:
                group.set_bits(widths[group.name])
            self.done = done
        return planned if reached else None

    def _cheapest_finish(self, waiting: list[PrecisionGroup],
                         traces: dict[int, float]) -> PrecisionGroup | None:
        """With ``pruning.last_prune="cheapest"``: of the waiting groups whose drop alone reaches
        the target, the one whose drop (as few LSBs as reaching it takes) adds the least Omega;
        None when no single drop reaches it, or under the other policies.

        Why: the drop order ranks by Omega per bit saved, right while many bits remain to be
        saved; for the last few it can take a large layer whose drop overshoots the target
        (ResNet-20 at 15.97x for a 16x target: a 36,864-weight layer to 1 bit, ending at
        17.14x) where a small one would have closed the gap."""
        if self.config.pruning.last_prune != "cheapest" or not traces:
            return None
        target, floor = self.config.target_compression, self.config.quantization.min_bits
        per_weight = self.config.pruning.omega_scale == "per_weight"
        costs = {}
        for group in waiting:
            for lsbs in range(1, group.droppable_lsbs(floor) + 1):
                if self._compression_saving(lsbs * group.params) >= target:
                    costs[group.name] = group.omega_growth(traces, lsbs, per_weight)
                    break
        finishing = [g for g in waiting if g.name in costs]
        return min(finishing, key=lambda g: costs[g.name]) if finishing else None

    def _lower_width(self, group: PrecisionGroup, target: float, floor: int) -> None:
        """Drop the group's p LSBs (clipped at ``floor``); unless ``pruning.last_prune="full"``
        drop fewer when fewer already reach ``target``, so the last prune does not overshoot
        it (dropping 1 of the p zero LSBs is as exact as dropping all p)."""
        lowest = max(group.bits - group.prune_step, floor)
        fit = self.config.pruning.last_prune != "full"
        for width in range(group.bits - 1, lowest - 1, -1) if fit else [lowest]:
            group.set_bits(width)
            if self.compression() >= target:
                return

    def _omega(self, group: PrecisionGroup, traces: dict[int, float]) -> float:
        """The group's Omega as ``pruning.omega_scale`` defines it."""
        omega = group.omega(traces)
        return omega / group.params**2 if self.config.pruning.omega_scale == "per_weight" \
            else omega

    def _reassign_prune_steps(self, groups: list[PrecisionGroup], omegas: dict[str, float]) -> None:
        if self.config.pruning.step_policy != "hessian" or not omegas:
            return
        mean_omega = sum(omegas.values()) / len(omegas)
        for group in groups:
            group.set_prune_step(2 if omegas[group.name] < mean_omega else 1)

    def _active_groups(self) -> list[PrecisionGroup]:
        return [g for g in self.groups if g.prunable and g.bits > self.config.quantization.min_bits]

    # ------------------------------------------------------------------ Hessian
    def _hessian_traces(self, groups: list[PrecisionGroup], batches: Iterable, loss_fn,
                        ) -> tuple[dict[int, float], str | None]:
        """Tr(H) per member latent (keyed by id) and the method that computed it.

        ({}, None) when nothing the prune decides is Hessian-guided.
        """
        pruning = self.config.pruning
        if pruning.step_policy != "hessian" and pruning.drop_order != "omega" \
                and pruning.last_prune != "cheapest" and pruning.schedule != "one_shot":
            return {}, None
        members = [m for g in groups for m in g.members]
        return group_traces(self.model, members, batches, loss_fn, self.config, self.prune_count)

    # ------------------------------------------------------------------ reporting and resume
    def history_table(self, tablefmt: str = "simple") -> str:
        """Every decision so far, one row per group and prune.

        Args:
            tablefmt: a ``tabulate`` table format ("simple", "github", ...).

        Returns:
            The table as text: epoch (completed epochs, for a prune counted in steps), step
            (for prunes counted in steps), group, kind, params, beta, Omega, bits before and
            after, the next p and the compression after the prune.

        Example:
            >>> import msq_fx
            >>> from torch import nn
            >>> controller = msq_fx.MSQController(msq_fx.prepare(nn.Linear(4, 2)))
            >>> controller.history_table().split()[:6]  # nothing pruned yet: the header
            ['epoch', 'group', 'kind', 'params', 'beta', 'Omega']
        """
        # Prunes counted in steps record the epochs completed before them, so several rows
        # can share an epoch: their step tells them apart.
        steps = any(r.step is not None for r in self.history)
        rows = [(r.epoch, *([r.step] if steps else []), r.group, r.kind, r.params,
                 f"{r.beta:.3f}", "-" if r.omega is None else f"{r.omega:.3g}", r.bits_before,
                 r.bits_after, r.next_prune_step, f"{r.compression:.2f}") for r in self.history]
        return tabulate(rows, headers=["epoch", *(["step"] if steps else []), "group", "kind",
                                       "params", "beta", "Omega", "bits before", "bits after",
                                       "next p", "compression"],
                        tablefmt=tablefmt, disable_numparse=True)

    def bit_widths(self) -> dict[str, int]:
        """The current width of each group.

        Returns:
            group name (its first weight's name) -> bits.

        Example:
            >>> import msq_fx
            >>> from torch import nn
            >>> qmodel = msq_fx.prepare(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
            >>> msq_fx.MSQController(qmodel).bit_widths()
            {'0.weight': 8, '2.weight': 8}
        """
        return {g.name: g.bits for g in self.groups}

    def state_dict(self) -> dict[str, Any]:
        """Counters and history; bits and p live in the model's buffers (its own state_dict).

        Returns:
            Plain data (ints, bools, lists of dicts) for ``torch.save`` beside the model's and
            the optimizer's state_dicts; :meth:`load_state_dict` reads it back.

        Example:
            >>> import msq_fx
            >>> from torch import nn
            >>> msq_fx.MSQController(msq_fx.prepare(nn.Linear(4, 2))).state_dict()
            {'last_epoch': 0, 'last_step': 0, 'prune_count': 0, 'done': False, 'history': [],
             'penalized': None}
        """
        return {"last_epoch": self.last_epoch, "last_step": self.last_step,
                "prune_count": self.prune_count,
                "done": self.done, "history": [asdict(r) for r in self.history],
                "penalized": None if self.penalized is None else sorted(self.penalized)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`'s output (load the model's state_dict as well).

        Args:
            state: what :meth:`state_dict` returned.

        Returns:
            None; a resumed run makes the same decisions as an uninterrupted one.

        Example:
            >>> import msq_fx
            >>> from torch import nn
            >>> qmodel = msq_fx.prepare(nn.Linear(4, 2))
            >>> resumed = msq_fx.MSQController(qmodel)
            >>> resumed.load_state_dict({'last_epoch': 3, 'last_step': 0, 'prune_count': 1,
            ...                          'done': False, 'history': []})
            >>> resumed.last_epoch
            3
        """
        missing = {"last_epoch", "prune_count", "done", "history"} - set(state)
        if missing:
            raise KeyError(f"MSQController.load_state_dict: missing {sorted(missing)}")
        self.last_epoch = int(state["last_epoch"])
        self.last_step = int(state.get("last_step", 0))  # absent from older checkpoints
        self.prune_count = int(state["prune_count"])
        self.done = bool(state["done"])
        self.history = [PruneRecord(**row) for row in state["history"]]
        penalized = state.get("penalized")  # absent from older checkpoints: every group
        self.penalized = None if penalized is None else set(penalized)


def _require_finite_latents(groups: list[PrecisionGroup], where: str) -> None:
    """MSQError naming the groups whose latent weights (or learned scales) hold NaN or inf."""
    found = []
    for group in groups:
        for member in group.members:
            for role, tensor in (("latent", member.latent),
                                 ("learned scale", member.quantizer.learned_scale)):
                summary = None if tensor is None else non_finite_summary(tensor)
                if summary is not None:
                    found.append(f"{group.name} ({role} of {member.name}: {summary})")
    if found:
        raise MSQError(
            f"MSQController.{where}: the latent weights of these groups hold NaN or infinite "
            f"values: {'; '.join(found)}. Nothing was pruned: the widths and the controller's "
            f"state are as they were. Training diverged before this prune (a learning rate too "
            f"large, a loss that overflowed, a batch with NaN or inf values): restore the last "
            f"good checkpoint of the model and optimizer, lower the learning rate or clip the "
            f"gradients, and call {where[:-1]}, ...) again; torch.isfinite(loss) after each "
            f"step finds the step where it began.")


def _require_finite_measures(where: str, betas: dict[str, float], traces: dict[str, float],
                             omegas: dict[str, float]) -> None:
    """MSQError naming the groups whose LSB rate beta, Hessian trace or Omega is not finite."""
    bad_traces = _not_finite(traces)
    found = [f"{what} of {', '.join(names)}" for what, names in (
        ("the LSB non-zero rate beta", _not_finite(betas)), ("the Hessian trace", bad_traces),
        ("Omega = Tr(H) * ||W_q - W||^2", _not_finite(omegas))) if names]
    if not found:
        return
    if bad_traces:
        cause = ("The Hessian was taken on the batches given to this call: one of them holds NaN "
                 "or inf inputs or targets, or the loss overflows on it (torch.isfinite(x).all() "
                 "and torch.isfinite(loss) find it); pass finite batches")
    else:
        cause = ("The latent weights are finite, so their quantization is not (a scale out of "
                 "range): restore the last good checkpoint or lower the learning rate")
    raise MSQError(f"MSQController.{where}: not finite: {'; '.join(found)}. Nothing was pruned: "
                   f"the widths and the controller's state are as they were. {cause}, then call "
                   f"{where[:-1]}, ...) again.")


def _require_finite_drop_costs(where: str, costs: dict[str, list[float]]) -> None:
    """MSQError naming each trial of the measured finish whose loss is not finite."""
    found = _not_finite({f"{name} {k} LSB(s) narrower": cost for name, values in costs.items()
                         for k, cost in enumerate(values, 1)})
    if found:
        raise MSQError(f"MSQController.{where}: the measured finish's loss is not finite with "
                       f"{', '.join(found)}. Nothing was pruned: the widths and the controller's "
                       f"state are as they were. The loss overflows on the batches given to this "
                       f"call at that width; pass finite batches, or set "
                       f"MSQConfig(pruning={{'last_prune': 'cheapest'}}), then call "
                       f"{where[:-1]}, ...) again.")


def _not_finite(values: dict[str, float]) -> list[str]:
    return [name for name, value in values.items() if not math.isfinite(value)]


def _measured_cost(costs: list[float] | None, dropped: int) -> float | None:
    """For the prune record: the measured loss increase of the drop a group took, or of its
    1-LSB drop when it took none; None when the prune measured nothing for it."""
    if not costs:
        return None
    return costs[max(dropped, 1) - 1]


def _check_count(method: str, unit: str, count: Any, last: int) -> None:
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"{method}({unit}={count!r}): {unit}s count completed {unit}s from 1, as "
                         f"in Algorithm 1; pass {unit} + 1 when looping over range().")
    if count <= last:
        raise ValueError(f"{method}({unit}={count}): {unit} {last} was already processed; "
                         f"continue with {unit} {last + 1}.")


def _checked_config(model: nn.Module, config: MSQConfig | None) -> MSQConfig:
    """``config``, or the one ``prepare`` stored on the model when None.

    The quantization section decided how the model was rewritten (widths, floor, grid, which
    layers), so a controller given another one would prune a model it does not describe; the
    schedule (target, pruning, Hessian) is the controller's alone and may differ.
    """
    state = prepared_state(model)
    stored = None if state is None else state.config
    prepared = MSQConfig.from_dict(stored) if stored is not None else None
    if config is None:
        return prepared if prepared is not None else MSQConfig()
    if not isinstance(config, MSQConfig):
        raise TypeError(f"MSQController: config must be an msq_fx.MSQConfig, got "
                        f"{type(config).__name__}")
    if prepared is not None and config.quantization != prepared.quantization:
        given, used = config.quantization.to_dict(), prepared.quantization.to_dict()
        differences = ", ".join(f"{name}={given[name]!r} (prepared with {used[name]!r})"
                                for name in given if given[name] != used[name])
        raise MSQError(f"MSQController: the config's quantization section differs from the one "
                       f"{type(model).__name__} was prepared with: {differences}. Pass the "
                       f"config given to msq_fx.prepare, or none (the prepared one is used); "
                       f"only target_compression, pruning, hessian and seed may differ.")
    return config


def _unwrap(model: nn.Module) -> nn.Module:
    """The module under a DistributedDataParallel/DataParallel wrapper
    (the Hessian needs it bare)."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model
