"""The Hessian traces behind a pruning step: the loss, the estimator, the fallback between them.

:func:`group_traces` gives Tr(H_l) for the latent weight of every member of the groups being
pruned, the factor of Omega = Tr(H) * ||W_q - W||^2 (paper Eq. 9). It builds the loss over the
Hessian batches (whole, or in chunks of ``hessian.chunk_size`` rows), seeds the probes by
(seed, prune index) so both estimators draw the same ones, averages across ranks under
torch.distributed, and picks the estimator of msq_fx.hessian: the double backward, or the
central difference of two gradients with the quantized weights displaced
(:func:`displaced_quantized_weights`); "auto" falls back from the first to the second on
out-of-memory or on an op without a second derivative. With ``hessian.curvature="fisher"`` the
trace of the Fisher information (msq_fx.fisher) stands in for Tr(H), over the same batches.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

from .config import MSQConfig
from .fisher import OutputPiece, fisher_traces
from .hessian import (HessianTraces, NoSecondDerivative, finite_difference_traces,
                      hutchinson_traces)
from .recompute import displaced
from .second_order import twice_differentiable
from .utils import call_model, is_distributed, is_out_of_memory, model_mode, take

__all__ = ["group_traces", "displaced_quantized_weights", "warn_of_negative_traces",
           "distributed_mean", "NO_SECOND_DERIVATIVE"]

logger = logging.getLogger("msq_fx")

#: How an op without a second derivative says so in a double backward: PyTorch's autograd
#: ("the derivative for 'X' is not implemented") and torchvision's C++ ops (roi_align,
#: ps_roi_align, deform_conv2d: "double backwards on roi_align not supported"). Ours,
#: NoSecondDerivative, is caught by type.
NO_SECOND_DERIVATIVE = ("derivative for", "double backwards on")


def group_traces(model: nn.Module, members: Sequence, batches: Iterable,
                 loss_fn: Callable[[Any, Any], Tensor], config: MSQConfig,
                 prune_index: int) -> tuple[dict[int, float], str]:
    """Tr(H) of each member's latent weight, and the method that computed it.

    Args:
        model: the prepared model (not a DDP wrapper).
        members: the ``iter_quantized_weights`` entries whose traces are wanted.
        batches: yields ``(inputs, targets)``; the first ``config.hessian.batches`` are used.
        loss_fn: ``loss_fn(model(inputs), targets)`` is the loss whose Hessian is taken.
        config: the controller's config (its ``hessian`` section and ``seed``).
        prune_index: how many prunes came before; seeds the probes with ``config.seed``.

    Returns:
        ``(traces, method)``: ``traces`` maps ``id(member.latent)`` to its trace (the estimate's
        mean plus ``hessian.trace_margin`` standard errors), ``method`` is "autograd",
        "finite_difference" or, with ``hessian.curvature="fisher"``, "fisher".
    """
    chosen = take(batches, config.hessian.batches)
    if not chosen:
        raise ValueError("epoch_end: `batches` yielded no (inputs, targets) pair for the Hessian; "
                         "pass at least one batch, e.g. a list or a fresh iterator (one that "
                         "an earlier loop has not already used up)")
    members = list(members)
    estimate = functools.partial(_estimate_traces, model, config, prune_index, members=members,
                                 chosen=chosen, loss_fn=loss_fn)
    method = "fisher" if config.hessian.curvature == "fisher" else config.hessian.method
    if method in ("fisher", "finite_difference"):
        result = estimate(method)
    else:
        fallback = None
        try:
            result = estimate("autograd")
        except (RuntimeError, MemoryError) as error:
            fallback = _autograd_fallback_reason(error, model, config)
        if fallback is not None:
            # Outside the handler: the traceback would keep the failed graph alive.
            logger.warning(
                "epoch_end: %s; taking the Hessian by finite differences instead "
                "(tools/hessian_agreement measures how closely they match the double "
                "backward on a model; MSQConfig(hessian={'chunk_size': ...}) keeps the double "
                "backward in less memory)",
                fallback)
            method = "finite_difference"
            result = estimate(method)
        else:
            method = "autograd"
            not_finite = [m.name for m, t in zip(members, result.traces) if not math.isfinite(t)]
            if not_finite:
                # The double backward can be NaN where the first-order gradients are finite: the
                # norm of a zero vector (Swin V2's cosine attention on the zero tokens of padded
                # windows). Batches that are themselves not finite stay so by finite differences,
                # and the controller then refuses the prune. The traces are averaged over the
                # ranks, so under torch.distributed every rank falls back together.
                logger.warning(
                    "epoch_end: the double backward gave a non-finite Hessian trace for %s; "
                    "taking the Hessian by finite differences instead (first-order gradients "
                    "stay finite where only a second derivative is not, e.g. at the norm of a "
                    "zero vector)", ", ".join(not_finite))
                method = "finite_difference"
                result = estimate(method)
    margin = config.hessian.trace_margin
    traces = result.traces + margin * result.stderr if margin else result.traces
    return {id(m.latent): float(t) for m, t in zip(members, traces)}, method


def warn_of_negative_traces(where: str, lowered: Sequence, traces: dict[int, float],
                            trace_margin: float) -> None:
    """Log one warning naming every group in ``lowered`` whose Hessian trace, as the decisions
    read it (mean plus ``trace_margin`` standard errors), is below zero.

    Reads each group's name, width and ``trace(traces)``, nothing when ``traces`` is empty (no
    Hessian was taken); changes nothing. Why: a layer's own curvature is seldom negative (never
    when the outputs are piecewise linear in each layer's weights, as in a ReLU net with
    BatchNorm in eval mode, and the loss is convex in the outputs, as cross-entropy is: each
    diagonal Hessian block is then J^T H_out J), and the probes stop once the total trace
    settles, so a negative estimate is mostly noise; as Omega it makes the layer look the
    cheapest to drop (docs/fidelity.md: a 36,864-weight ResNet-20 conv made binary on a trace
    of -114).
    """
    if not traces:
        return
    negative = [(g, trace) for g in lowered if (trace := g.trace(traces)) < 0]
    if not negative:
        return
    named = ", ".join(f"{g.name} (now {g.bits} bits, trace {trace:.3g})" for g, trace in negative)
    remedy = ("set MSQConfig(hessian={'trace_margin': 2.0}) so that a layer counts as cheap only "
              "when its trace is small beyond the estimate's noise" if not trace_margin else
              "raise hessian.min_samples or hessian.batches for a steadier estimate")
    logger.warning("%s: lowered on a negative Hessian trace estimate: %s; the estimate's noise, "
                   "not a low sensitivity, may have chosen the drop: %s", where, named, remedy)


def _estimate_traces(model: nn.Module, config: MSQConfig, prune_index: int, method: str, *,
                     members: list, chosen: list, loss_fn) -> HessianTraces:
    """Traces over ``members``' latents, on ``chosen`` batches, with the model in
    ``hessian.model_mode`` (eval by default), by ``method``: "autograd" or "finite_difference"
    (Hutchinson's estimate of Tr(H)) or "fisher" (Tr(F)).

    Probes (the Fisher's labels) are seeded by (seed, prune index), so both Hessian methods draw
    the same ones.
    """
    hessian = config.hessian
    params = [m.latent for m in members]
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + prune_index)
    limits = dict(max_samples=hessian.max_samples, min_samples=hessian.min_samples,
                  tol=hessian.tol, generator=generator, all_reduce=distributed_mean())
    with model_mode(model, training=hessian.model_mode == "train"):
        if method == "fisher":
            return fisher_traces(_output_pieces(model, chosen, hessian.chunk_size), params,
                                 **limits)
        loss = _loss_pieces(model, chosen, loss_fn, hessian.chunk_size)
        if method == "finite_difference":
            displaced_weights = functools.partial(displaced_quantized_weights,
                                                  [m.quantizer for m in members])
            return finite_difference_traces(
                loss, params, displaced=displaced_weights, relative_step=hessian.relative_step,
                frozen_kinks=hessian.frozen_kinks, **limits)
        with twice_differentiable():
            return hutchinson_traces(loss, params, **limits)


def _autograd_fallback_reason(error: BaseException, model: nn.Module, config: MSQConfig) -> str:
    """Why finite differences should replace the double backward, or re-raise ``error``."""
    no_second_derivative = (isinstance(error, NoSecondDerivative)
                            or any(text in str(error) for text in NO_SECOND_DERIVATIVE))
    distributed = distributed_mean() is not None
    auto = config.hessian.method == "auto"
    if auto and distributed and is_out_of_memory(error):
        # Ranks that fit would be inside the estimator's all-reduce while this one restarts
        # with another method: they cannot agree on a fallback midway.
        raise RuntimeError(
            f"epoch_end: the double backward ran out of memory on this rank "
            f"({_first_line(error)}); under torch.distributed 'auto' does not fall back. "
            f"Set MSQConfig(hessian={{'chunk_size': ...}}) (the same Hessian in chunks) or "
            f"hessian={{'method': 'finite_difference'}} on every rank.") from error
    if auto and not distributed:
        if is_out_of_memory(error):
            return f"the double backward ran out of memory ({_first_line(error)})"
        if no_second_derivative:
            return (f"{type(model).__name__} uses an op without a second derivative "
                    f"({_first_line(error)})")
    if no_second_derivative:
        raise RuntimeError(
            f"epoch_end: the Hessian trace by autograd needs a twice differentiable forward, "
            f"and {type(model).__name__} uses an op without a second derivative "
            f"({error}). Use MSQConfig(hessian={{'method': 'finite_difference'}}) (first-order "
            f"gradients only) or pruning={{'step_policy': 'fixed'}} (p = 1, no Hessian).",
        ) from error
    raise error


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


# ------------------------------------------------------------------------------- the loss

def _mean_loss(model: nn.Module, batches: list, loss_fn) -> Tensor:
    total = None
    for inputs, targets in batches:
        loss = loss_fn(call_model(model, inputs), targets)
        total = loss if total is None else total + loss
    return total / len(batches)


def _loss_pieces(model: nn.Module, batches: list, loss_fn, chunk_size: int | None) -> list:
    """The Hessian's loss: the mean over ``batches``, whole or in chunks of ``chunk_size``."""
    if chunk_size is None:
        return [functools.partial(_mean_loss, model, batches, loss_fn)]
    return [functools.partial(_weighted_loss, model, [chunk], loss_fn, weight)
            for chunk, weight in _chunks(batches, chunk_size)]


def _output_pieces(model: nn.Module, batches: list, chunk_size: int | None) -> list[OutputPiece]:
    """The Fisher's batches: the model's outputs on each batch, or on each chunk of
    ``chunk_size`` rows, with its share of the mean over ``batches``."""
    if chunk_size is None:
        parts = [(batch, 1 / len(batches)) for batch in batches]
    else:
        parts = _chunks(batches, chunk_size)
    return [OutputPiece(functools.partial(call_model, model, inputs), weight)
            for (inputs, _targets), weight in parts]


def _chunks(batches: list, chunk_size: int) -> list[tuple[tuple[Any, Any], float]]:
    """Every batch cut into runs of at most ``chunk_size`` rows, each with its share of the
    mean over ``batches``."""
    chunks = []
    for index, (inputs, targets) in enumerate(batches):
        size = _leading_size(inputs, index)
        for start in range(0, size, chunk_size):
            stop = min(start + chunk_size, size)
            chunk = (_rows(inputs, start, stop, size), _rows(targets, start, stop, size))
            chunks.append((chunk, (stop - start) / size / len(batches)))
    return chunks


def _weighted_loss(model: nn.Module, batches: list, loss_fn, weight: float) -> Tensor:
    return _mean_loss(model, batches, loss_fn) * weight


def _leading_size(inputs: Any, index: int) -> int:
    first = inputs[0] if isinstance(inputs, (tuple, list)) and inputs else inputs
    if not isinstance(first, Tensor) or first.dim() == 0:
        raise ValueError(
            f"epoch_end: hessian.chunk_size splits each batch along the first dimension of its "
            f"inputs, but the inputs of Hessian batch {index} are a {type(first).__name__} "
            f"{'without one' if isinstance(first, Tensor) else 'rather than a tensor'}; pass "
            f"tensor inputs or set hessian.chunk_size=None.")
    return first.shape[0]


def _rows(value: Any, start: int, stop: int, size: int) -> Any:
    """Rows start:stop of every tensor in ``value`` whose first dimension is the batch's."""
    if isinstance(value, Tensor):
        return value[start:stop] if value.dim() > 0 and value.shape[0] == size else value
    if isinstance(value, (tuple, list)):
        return type(value)(_rows(item, start, stop, size) for item in value)
    return value


def distributed_mean() -> Callable[[Tensor], Tensor] | None:
    """Average across ranks under torch.distributed, so every rank makes the same decisions."""
    if not is_distributed():
        return None
    world = torch.distributed.get_world_size()

    def mean(values: Tensor) -> Tensor:
        values = values.clone()
        torch.distributed.all_reduce(values)
        return values / world

    return mean


# ------------------------------------------------------------------ displaced weights

@contextlib.contextmanager
def displaced_quantized_weights(quantizers: Sequence[nn.Module],
                                offsets: Sequence[Tensor]) -> Iterator[None]:
    """Inside, ``quantizers[i]`` returns its quantized weight plus ``offsets[i]``.

    Moves the weights the model computes with, not the latents (a small move of a latent is
    mostly absorbed by rounding), so a finite difference sees the curvature at the quantized
    point. Gradients still reach the latents through the straight-through quantizer.
    ``offsets[i]`` is indexed at each call of the quantizer (and again if the backward pass
    recomputes the weight), so a sequence that makes its items on demand (msq_fx.probes'
    ScaledProbes) is never held whole; it must give the same values each time.
    """
    if len(quantizers) != len(offsets):
        raise ValueError(f"{len(quantizers)} quantizers but {len(offsets)} offsets")
    handles = []
    try:
        for index, quantizer in enumerate(quantizers):
            handles.append(quantizer.register_forward_hook(
                functools.partial(_add_offset, offsets, index)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _add_offset(offsets: Sequence[Tensor], index: int, _module: nn.Module, _inputs: tuple,
                output: Tensor) -> Tensor:
    return displaced(output, offsets, index)
