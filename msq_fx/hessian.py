"""Per-layer Hessian traces by Hutchinson's estimator (MSQ §3.2, Eq. 9).

MSQ ranks layers by Omega_l = Tr(H_l) * ||W_q - W||^2 to decide how many
LSBs each layer may lose at the next pruning step. This module supplies the
Tr(H_l) factor: for every parameter tensor l, the trace of the diagonal block
of the loss Hessian that belongs to that tensor.

Hutchinson: for a Rademacher vector v (entries +-1), E[v^T H v] = Tr(H), and
restricted to block l, E[v_l . (H v)_l] = Tr(H_ll) because the off-diagonal
blocks pair independent entries of v whose product has mean zero. So one
Hessian-vector product over all parameters per sample yields every layer's
trace sample at once.

Two ways to get H v are offered. ``hutchinson_traces`` differentiates the gradient a second
time (exact, but its peak was 2.45 times a training step's on ResNet-20, tools/bench --hessian).
``finite_difference_traces`` takes the central difference of two first-order gradients,
``(g(w + h v) - g(w - h v)) / 2h``, which costs two training-step backwards per probe and about
one step's memory (1.12 times there). The probes come from msq_fx.probes; the sampling loop
and the checks both estimators share are in msq_fx.trace_sampling.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Callable, ContextManager, Iterator, Sequence

import torch
from torch.autograd.function import once_differentiable

from .probes import ScaledProbes, rademacher_signs
from .second_order import FrozenKinks
from .trace_sampling import (HessianTraces, LossPieces, block_dots, check_loss, check_settings,
                             checked_params, draw_until_stable, loss_pieces, summarize)

__all__ = ["HessianTraces", "NoSecondDerivative", "finite_difference_traces",
           "hutchinson_traces"]


class NoSecondDerivative(RuntimeError):
    """The loss's graph holds an op whose backward cannot itself be differentiated."""


def hutchinson_traces(
    loss_fn: LossPieces,
    params: Sequence[torch.Tensor],
    *,
    max_samples: int = 64,
    min_samples: int = 4,
    tol: float = 1e-2,
    generator: torch.Generator | None = None,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> HessianTraces:
    """Estimate Tr(H_l) for every tensor in ``params`` with Rademacher probes.

    Reads:
        loss_fn: called exactly once, with autograd enabled, to build a scalar
            loss from the current ``params``. Which batches it sums over, and
            whether the model is in train or eval mode, is the caller's choice.
            A sequence of such callables stands for the sum of their losses:
            each is then built and differentiated twice per probe, one at a time,
            so the double-backward graph of one piece is alive at a time (less
            memory, more time; the same result up to rounding).
        params: distinct tensors that require grad, normally the latent
            (full-precision) weights of the quantized layers.
        max_samples, min_samples: bounds on the number of probes.
        tol: stop once the running mean of the total trace (sum over tensors)
            moves by less than ``tol`` relative to its previous value.
        generator: CPU generator the probes are drawn from (the global one
            if None); seeding it makes the result reproducible, and since its
            state advances, a later call continues the same random stream.
        all_reduce: applied to each sample's per-tensor vector (float64, on
            the device of ``params[0]``) before it enters the running mean;
            under DDP pass a cross-rank mean so every rank sees identical
            numbers, stops at the same sample and makes the same decision.

    Returns:
        HessianTraces with the mean of the samples, their standard error, and
        the sample count. Tensors that the loss does not depend on (or only
        depends on linearly) get trace 0. Neither ``params`` nor their
        ``.grad`` are touched.

    Design choices:
        * Raw trace, as Eq. 9 writes Tr(H_l). The per-element mean that
          HAWQ-V2 uses is ``traces / numel`` and can be taken by the caller;
          the reverse would need the sizes back.
        * Latent weights with a straight-through quantizer in the loss: the
          STE backward is the identity, so differentiating twice through it
          gives the Hessian of the loss with respect to the quantized weights,
          evaluated at the quantized point W_q -- the curvature of the network
          that is actually run, which is what Omega_l is meant to measure. The
          STE backward must itself be differentiable (no
          ``@once_differentiable``).
        * One gradient with ``create_graph=True``, reused for every probe;
          one Hessian-vector product over all tensors per probe (per piece and
          probe when the loss comes in pieces).
        * The stopping ratio is |new - old| / (|old| + tiny): traces of a
          non-convex loss can be negative, and a negative denominator would
          make the ratio negative, hence always "below tol", and stop early.
          A single sample gives no change to measure, so at least two are
          drawn unless ``max_samples`` is 1.
    """
    check_settings(max_samples, min_samples, tol, generator)
    params = checked_params(params)
    pieces = loss_pieces(loss_fn)
    with torch.enable_grad():
        if len(pieces) == 1:
            grads = _gradients_with_graph(pieces[0], params)

            def sample_of(probes: list[torch.Tensor]) -> torch.Tensor:
                return _trace_sample(grads, params, probes)
        else:
            def sample_of(probes: list[torch.Tensor]) -> torch.Tensor:
                return sum(_trace_sample(_gradients_with_graph(piece, params), params, probes)
                           for piece in pieces)
        samples = draw_until_stable(
            sample_of, params, max_samples, min_samples, tol, generator, all_reduce
        )
    return summarize(samples)


def _gradients_with_graph(
    loss_fn: Callable[[], torch.Tensor], params: list[torch.Tensor]
) -> tuple[torch.Tensor | None, ...]:
    loss = loss_fn()
    check_loss(loss)
    _check_twice_differentiable(loss)
    return torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)


# Every backward wrapped by @once_differentiable runs this one code object.
_ONCE_DIFFERENTIABLE_CODE = once_differentiable(lambda ctx, *grads: grads).__code__


def _check_twice_differentiable(loss: torch.Tensor) -> None:
    """Raise NoSecondDerivative if a custom autograd Function in ``loss``'s graph has a
    backward marked ``@once_differentiable``.

    Autograd does not refuse that double backward: the marked backward runs without a graph, so
    every path through it drops out of H v and the traces come out too small, silently.
    """
    marked, seen, stack = [], set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        function = getattr(node, "_forward_cls", None)
        backward = getattr(function, "backward", None)
        if getattr(backward, "__code__", None) is _ONCE_DIFFERENTIABLE_CODE:
            marked.append(function.__qualname__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    if marked:
        names = ", ".join(sorted(set(marked)))
        raise NoSecondDerivative(
            f"the second derivative for {names} is not available: its backward is marked "
            f"@once_differentiable, so a double backward would count its curvature as zero")


def _trace_sample(
    grads: Sequence[torch.Tensor | None],
    params: list[torch.Tensor],
    probes: list[torch.Tensor],
) -> torch.Tensor:
    """v_l . (H v)_l for every tensor l, from one Hessian-vector product."""
    device = params[0].device
    # A gradient without a graph is constant in params: that block's rows of
    # H are zero, and autograd cannot differentiate it.
    curved = [i for i, grad in enumerate(grads) if grad is not None and grad.requires_grad]
    if not curved:
        return torch.zeros(len(params), dtype=torch.float64, device=device)
    outputs = [grads[i] for i in curved]
    output_probes = [probes[i] for i in curved]
    return block_dots(outputs, output_probes, params, probes, retain_graph=True)


def finite_difference_traces(
    loss_fn: LossPieces,
    params: Sequence[torch.Tensor],
    *,
    displaced: Callable[[list[torch.Tensor]], ContextManager[None]] | None = None,
    relative_step: float = 1e-3,
    frozen_kinks: bool = True,
    max_samples: int = 64,
    min_samples: int = 4,
    tol: float = 1e-2,
    generator: torch.Generator | None = None,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> HessianTraces:
    """Estimate Tr(H_l) like :func:`hutchinson_traces`, with H v from first-order gradients only.

    Reads:
        loss_fn: called twice per probe, with autograd enabled; it must be deterministic (eval
            mode: no dropout, no batch statistics), or the difference measures noise. A
            sequence of callables stands for the sum of their losses, differentiated one at a
            time.
        params: as for :func:`hutchinson_traces`.
        displaced: ``displaced(offsets)`` returns a context inside which ``loss_fn`` evaluates
            the loss at the point moved by ``offsets[l]`` in the direction of ``params[l]``
            (same shape). ``offsets`` is a ScaledProbes sequence: indexing it makes the tensor,
            the same values each time, so hold one only while it is used. The default adds
            the offsets to the tensors in place and restores
            their saved values on exit. A caller whose loss sees the tensors through a
            non-differentiable map (a quantizer) passes a context that displaces the map's
            output instead, so the Hessian is taken where the model actually runs.
        relative_step: the step is h = relative_step * RMS over all entries of ``params``
            (relative_step itself where that is 0).
        frozen_kinks: hold the activation pattern of piecewise-linear ops (ReLU, ReLU6,
            hard-swish, max-pool, ...) at the one recorded at the undisplaced point, so the
            difference sees the curvature the double backward sees rather than the gradient's
            jumps across kinks (msq_fx.second_order.FrozenKinks). Costs one forward without
            gradients per call.
        max_samples, min_samples, tol, generator, all_reduce: as for :func:`hutchinson_traces`;
            the same generator state draws the same probes, so the two estimators compare
            probe for probe.

    Returns:
        HessianTraces as :func:`hutchinson_traces` does. ``params`` and their ``.grad`` are left
        as they were.

    Design choices:
        * Central difference: the error is O(h^2) in the third derivative, against O(h) one-sided.
        * Only ``v_l . g_l`` is kept from each gradient, accumulated in float64 as each block
          lands, and the probes are kept as signs packed eight to a byte, from which each
          offset h v is made where it is used, so the estimator holds a 32nd of a weight-sized
          copy beyond the model, and with ``frozen_kinks`` one bool (one index for max pooling)
          per output of a kinked op; the probe is recovered from the offset as offset / h.
        * The step trades float rounding (the difference of two float32 gradients loses about
          log10(1/relative_step) digits) against the O(h^2) error of the smooth part. Kinks
          are taken out of the trade by ``frozen_kinks``: without it, a step that moves a ReLU
          unit across its kink adds that gradient jump / 2h to the sample, which the double
          backward, seeing a zero second derivative, leaves out. Measured by
          tools/hessian_agreement (same probes, per-group traces, relative step 1e-3):
          ResNet-20 median relative difference 11.6 without frozen kinks, 2.8e-4 with them,
          every p decision the same; ViT-Tiny (GELU) 2.5e-4.
        * One step for all tensors, so each probe's sample equals Hutchinson's up to O(h^2): a
          step per tensor keeps the mean but weights the cross-block terms by h_k / h_l, which
          multiplies the variance wherever layer scales differ.
    """
    check_settings(max_samples, min_samples, tol, generator)
    if not 0 < relative_step < 1:
        raise ValueError(f"relative_step must be in (0, 1), got {relative_step}")
    params = checked_params(params)
    _check_precision(params)
    if displaced is None:
        displaced = functools.partial(_displaced_in_place, params)
    pieces = loss_pieces(loss_fn)
    step = _step_size(params, relative_step)
    pieces = _with_frozen_kinks(pieces) if frozen_kinks else pieces
    with torch.enable_grad():
        samples = draw_until_stable(
            lambda probes: _difference_sample(pieces, params, probes, step, displaced),
            params, max_samples, min_samples, tol, generator, all_reduce, rademacher_signs,
        )
    return summarize(samples)


def _check_precision(params: list[torch.Tensor]) -> None:
    # A difference of two gradients over a step of ~1e-3 keeps ~4 of float32's 7 digits;
    # half precision (3 digits) would keep none.
    for index, param in enumerate(params):
        if param.dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"params[{index}] (shape {tuple(param.shape)}) is {param.dtype}: finite "
                f"differences need float32 or float64 tensors; use the double backward "
                f"(hutchinson_traces / MSQConfig.hessian.method='autograd') "
                f"or keep the weights in float32")


def _with_frozen_kinks(
    pieces: list[Callable[[], torch.Tensor]]
) -> list[Callable[[], torch.Tensor]]:
    """Each piece, recorded once at the current point and replaying that activation pattern."""
    kinks = FrozenKinks()
    for index, piece in enumerate(pieces):
        with torch.no_grad(), kinks.recording(index):
            piece()
    return [functools.partial(_replayed, kinks, index, piece) for index, piece in enumerate(pieces)]


def _replayed(kinks: FrozenKinks, index: int, piece: Callable[[], torch.Tensor]) -> torch.Tensor:
    with kinks.replaying(index):
        return piece()


def _difference_sample(
    pieces: list[Callable[[], torch.Tensor]],
    params: list[torch.Tensor],
    probes: list[torch.Tensor],
    step: float,
    displaced: Callable[[list[torch.Tensor]], ContextManager[None]],
) -> torch.Tensor:
    """v_l . (H v)_l for every tensor l, from the gradients at w + h v and w - h v
    (``probes`` are packed signs; each offset h v is made from them where it is used)."""
    dtypes = [param.dtype for param in params]
    ahead = _offset_gradient_dots(pieces, params, ScaledProbes(probes, step, dtypes),
                                  displaced)  # (h v) . g(w + h v)
    behind = _offset_gradient_dots(pieces, params, ScaledProbes(probes, -step, dtypes),
                                   displaced)  # -(h v) . g(w - h v)
    # (h v) . (g(w + h v) - g(w - h v)) = 2 h^2 v . H v up to O(h^4).
    return (ahead + behind) / (2 * step**2)


def _offset_gradient_dots(
    pieces: list[Callable[[], torch.Tensor]],
    params: list[torch.Tensor],
    offsets: Sequence[torch.Tensor],
    displaced: Callable[[list[torch.Tensor]], ContextManager[None]],
) -> torch.Tensor:
    """offsets[l] . dL/dparams[l] with the loss (the sum of the pieces) at the displaced point."""
    with displaced(offsets):
        return sum(_piece_gradient_dots(piece, params, offsets) for piece in pieces)


def _piece_gradient_dots(
    piece: Callable[[], torch.Tensor], params: list[torch.Tensor], offsets: Sequence[torch.Tensor]
) -> torch.Tensor:
    loss = piece()
    check_loss(loss)
    return block_dots([loss], [None], params, offsets, retain_graph=False)


@contextlib.contextmanager
def _displaced_in_place(
    params: list[torch.Tensor], offsets: Sequence[torch.Tensor]
) -> Iterator[None]:
    """Add ``offsets`` to ``params`` in place; put the saved values back on exit.

    The values are saved rather than the offsets subtracted again, because ``(w + h) - h`` need
    not round back to ``w``.
    """
    saved = [param.detach().clone() for param in params]
    try:
        with torch.no_grad():
            for param, offset in zip(params, offsets):
                param.add_(offset)
        yield
    finally:
        with torch.no_grad():
            for param, value in zip(params, saved):
                param.copy_(value)


def _step_size(params: list[torch.Tensor], relative_step: float) -> float:
    squares = sum(float(param.detach().double().pow(2).sum()) for param in params)
    rms = math.sqrt(squares / sum(param.numel() for param in params))
    return relative_step * rms if rms > 0 else relative_step
