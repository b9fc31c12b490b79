"""What both Hessian-trace estimators share: argument checks, drawing samples until the mean
of the total trace settles, the per-block dot products of a gradient with the probes, and the
summary of the samples (msq_fx.hessian has the estimators).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .probes import rademacher_like

__all__ = ["HessianTraces", "LossPieces", "check_settings", "checked_params", "check_loss",
           "loss_pieces", "draw_until_stable", "block_dots", "summarize"]

#: A loss, or pieces whose sum is the loss: each piece is built and differentiated on its own, so
#: only one piece's graph is alive at a time (the Hessian is linear in the loss).
LossPieces = Callable[[], torch.Tensor] | Sequence[Callable[[], torch.Tensor]]

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


def loss_pieces(loss_fn: LossPieces) -> list[Callable[[], torch.Tensor]]:
    pieces = [loss_fn] if callable(loss_fn) else list(loss_fn)
    if not pieces:
        raise ValueError("loss_fn is an empty sequence: need at least one loss to differentiate")
    for index, piece in enumerate(pieces):
        if not callable(piece):
            raise ValueError(f"loss_fn[{index}] is a {type(piece).__name__}, not a callable")
    return pieces


def check_settings(
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


def checked_params(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
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


def check_loss(loss: object) -> None:
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


def draw_until_stable(
    sample_of: Callable[[list[torch.Tensor]], torch.Tensor],
    params: list[torch.Tensor],
    max_samples: int,
    min_samples: int,
    tol: float,
    generator: torch.Generator | None,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None,
    draw: Callable[..., list[torch.Tensor]] | None = None,
) -> list[torch.Tensor]:
    """Draw per-tensor trace samples until the total trace's mean settles."""
    draw = rademacher_like if draw is None else draw
    samples: list[torch.Tensor] = []
    total_sum = 0.0
    previous_mean: float | None = None
    for count in range(1, max_samples + 1):
        probes = draw(params, generator)
        sample = sample_of(probes)
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


def block_dots(
    outputs: list[torch.Tensor],
    output_grads: list[torch.Tensor | None],
    params: list[torch.Tensor],
    probes: list[torch.Tensor],
    retain_graph: bool,
) -> torch.Tensor:
    """probes[l] . (the gradient of outputs, weighted by output_grads, w.r.t. params[l])."""
    device = params[0].device
    if all(param.is_leaf for param in params):
        return _streamed_products(outputs, output_grads, params, probes, retain_graph)
    blocks = torch.autograd.grad(
        outputs, params, grad_outputs=output_grads, retain_graph=retain_graph, allow_unused=True
    )
    return torch.stack([_dot(probe, block, device) for probe, block in zip(probes, blocks)])


def _streamed_products(
    outputs: list[torch.Tensor],
    output_grads: list[torch.Tensor | None],
    params: list[torch.Tensor],
    probes: list[torch.Tensor],
    retain_graph: bool,
) -> torch.Tensor:
    """probes[l] . block l of the gradient, taken as the block lands in ``params[l].grad``.

    ``autograd.grad`` would hold the whole gradient (one more copy of every weight) until the
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
        torch.autograd.backward(outputs, output_grads, retain_graph=retain_graph, inputs=params)
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


def summarize(samples: list[torch.Tensor]) -> HessianTraces:
    stacked = torch.stack(samples)
    count = stacked.shape[0]
    if count > 1:
        stderr = stacked.std(dim=0, correction=1) / math.sqrt(count)
    else:
        stderr = torch.zeros_like(stacked[0])
    return HessianTraces(traces=stacked.mean(dim=0), stderr=stderr, samples=count)
