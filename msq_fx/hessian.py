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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

__all__ = ["HessianTraces", "hutchinson_traces"]

# Guards the relative-change ratio against 0/0 only; any larger value would
# impose a scale on traces, which have none (they scale with the loss).
_ZERO_GUARD = torch.finfo(torch.float64).tiny


@dataclass(frozen=True)
class HessianTraces:
    """Hutchinson estimates of the per-tensor Hessian traces.

    Attributes:
        traces: float64 CPU tensor of shape ``[len(params)]``; entry l is the
            estimated raw trace Tr(H_l) of the Hessian block of ``params[l]``
            (a sum over its diagonal, not a per-element mean).
        stderr: float64 CPU tensor of the same shape; the standard error of
            each estimate, sample standard deviation / sqrt(samples). It is 0
            when only one sample was drawn (no spread can be measured).
        samples: how many Rademacher samples were drawn.
    """

    traces: torch.Tensor
    stderr: torch.Tensor
    samples: int


def hutchinson_traces(
    loss_fn: Callable[[], torch.Tensor],
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
          one Hessian-vector product over all tensors per probe.
        * The stopping ratio is |new - old| / (|old| + tiny): traces of a
          non-convex loss can be negative, and a negative denominator would
          make the ratio negative, hence always "below tol", and stop early.
          A single sample gives no change to measure, so at least two are
          drawn unless ``max_samples`` is 1.
    """
    _check_settings(max_samples, min_samples, tol, generator)
    params = _checked_params(params)
    with torch.enable_grad():
        loss = loss_fn()
        _check_loss(loss)
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        samples = _draw_until_stable(
            grads, params, max_samples, min_samples, tol, generator, all_reduce
        )
    return _summarize(samples)


def _check_settings(
    max_samples: int, min_samples: int, tol: float, generator: torch.Generator | None
) -> None:
    if min_samples < 1:
        raise ValueError(f"min_samples must be at least 1, got {min_samples}")
    if max_samples < min_samples:
        raise ValueError(
            f"max_samples ({max_samples}) must be >= min_samples ({min_samples})"
        )
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(
            f"generator must be a CPU generator, got one on {generator.device}"
        )


def _checked_params(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    params = list(params)
    if not params:
        raise ValueError("params is empty: need at least one tensor to take traces for")
    seen: dict[int, int] = {}
    for index, param in enumerate(params):
        if not isinstance(param, torch.Tensor):
            raise ValueError(f"params[{index}] is a {type(param).__name__}, not a tensor")
        if not param.requires_grad:
            raise ValueError(
                f"params[{index}] (shape {tuple(param.shape)}) does not require grad"
            )
        # The same tensor twice would have its probes summed into one block.
        if id(param) in seen:
            raise ValueError(
                f"params[{index}] is the same tensor as params[{seen[id(param)]}]"
            )
        seen[id(param)] = index
    return params


def _check_loss(loss: object) -> None:
    if not isinstance(loss, torch.Tensor):
        raise ValueError(f"loss_fn must return a tensor, got {type(loss).__name__}")
    if loss.dim() != 0:
        raise ValueError(
            f"loss_fn must return a scalar (0-dim) loss, got shape {tuple(loss.shape)}"
        )
    if not loss.requires_grad:
        raise ValueError(
            "the loss does not require grad: it depends on none of params "
            "(or was built with autograd disabled)"
        )


def _draw_until_stable(
    grads: Sequence[torch.Tensor | None],
    params: list[torch.Tensor],
    max_samples: int,
    min_samples: int,
    tol: float,
    generator: torch.Generator | None,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None,
) -> list[torch.Tensor]:
    """Draw per-tensor trace samples until the total trace's mean settles."""
    samples: list[torch.Tensor] = []
    total_sum = 0.0
    previous_mean: float | None = None
    for count in range(1, max_samples + 1):
        probes = _rademacher_like(params, generator)
        sample = _trace_sample(grads, params, probes)
        if all_reduce is not None:
            sample = _reduced(all_reduce, sample)
        sample = sample.detach().to("cpu", torch.float64)
        samples.append(sample)
        total_sum += float(sample.sum())
        mean = total_sum / count
        if count >= min_samples and previous_mean is not None:
            if abs(mean - previous_mean) / (abs(previous_mean) + _ZERO_GUARD) < tol:
                break
        previous_mean = mean
    return samples


def _rademacher_like(
    params: list[torch.Tensor], generator: torch.Generator | None
) -> list[torch.Tensor]:
    # Drawn on CPU for every tensor, used or not, so the random stream depends
    # only on the shapes and a seed reproduces results on any device.
    probes = []
    for param in params:
        bits = torch.randint(0, 2, param.shape, generator=generator, dtype=torch.int8)
        probes.append((bits * 2 - 1).to(device=param.device, dtype=param.dtype))
    return probes


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
    if all(param.is_leaf for param in params):
        return _streamed_products(outputs, output_probes, params, probes)
    hessian_times_probe = torch.autograd.grad(
        outputs, params, grad_outputs=output_probes, retain_graph=True, allow_unused=True
    )
    return torch.stack([_dot(probe, hv, device) for probe, hv in zip(probes, hessian_times_probe)])


def _streamed_products(
    outputs: list[torch.Tensor],
    output_probes: list[torch.Tensor],
    params: list[torch.Tensor],
    probes: list[torch.Tensor],
) -> torch.Tensor:
    """v_l . (H v)_l taken as each block of H v lands in ``params[l].grad`` and dropped there.

    ``autograd.grad`` would hold the whole product (one more copy of every weight) until the
    pass ends; consuming each block as it is accumulated keeps only the blocks in flight. The
    callers' own ``.grad`` tensors are set aside for the pass and put back.
    """
    device = params[0].device
    products = torch.zeros(len(params), dtype=torch.float64, device=device)
    position = {id(param): index for index, param in enumerate(params)}

    def consume(param: torch.Tensor) -> None:
        index = position[id(param)]
        products[index] = _dot(probes[index], param.grad, device)
        param.grad = None

    stashed = [param.grad for param in params]
    handles = []
    try:
        for param in params:
            param.grad = None
            handles.append(param.register_post_accumulate_grad_hook(consume))
        torch.autograd.backward(outputs, output_probes, retain_graph=True, inputs=params)
    finally:
        for handle in handles:
            handle.remove()
        for param, grad in zip(params, stashed):
            param.grad = grad
    return products


def _dot(probe: torch.Tensor, hv: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    if hv is None:  # the loss does not reach this tensor
        return torch.zeros((), dtype=torch.float64, device=device)
    return (probe.double() * hv.double()).sum().to(device)


def _reduced(
    all_reduce: Callable[[torch.Tensor], torch.Tensor], sample: torch.Tensor
) -> torch.Tensor:
    reduced = all_reduce(sample)
    if not isinstance(reduced, torch.Tensor) or reduced.shape != sample.shape:
        got = tuple(reduced.shape) if isinstance(reduced, torch.Tensor) else type(reduced).__name__
        raise ValueError(
            f"all_reduce must return a tensor of shape {tuple(sample.shape)}, got {got}"
        )
    return reduced


def _summarize(samples: list[torch.Tensor]) -> HessianTraces:
    stacked = torch.stack(samples)
    count = stacked.shape[0]
    if count > 1:
        stderr = stacked.std(dim=0, correction=1) / math.sqrt(count)
    else:
        stderr = torch.zeros_like(stacked[0])
    return HessianTraces(traces=stacked.mean(dim=0), stderr=stderr, samples=count)
