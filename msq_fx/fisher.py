"""Per-layer traces of the Fisher information, the never-negative stand-in for Tr(H_l).

For a classifier trained with cross-entropy, the loss Hessian splits into the Gauss-Newton
part J^T (diag p - p p^T) J, which equals the Fisher information F of the model's own predictive
distribution, and a part weighted by the residuals p - y that vanishes where the model fits its
data. F is positive semi-definite block by block, so Tr(F_l) >= 0 for every layer, where a
Hutchinson estimate of Tr(H_l) can come out below zero by noise alone (docs/hessian.md).

Estimator. With labels y_j drawn from the model's own distribution p(. | x_j), the score
g_j = grad log p(y_j | x_j) has mean zero, so for independent draws E[g_j . g_k] = 0 (j != k)
and, for any weights w_j,

    E || sum_j sqrt(w_j) g_j ||^2 = sum_j w_j E || g_j ||^2.

With w_j the weight of draw j in the mean loss, the right-hand side is Tr(F). So each sample
is one first-order backward of the sampled log-likelihood, weighted by sqrt(w_j), and block l of
its squared gradient norm is a sample of Tr(F_l): no second derivative, no cross-layer term,
never negative. A "draw" is one position of the class axis: one per image for a classifier,
one per pixel for a segmentation model.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from .trace_sampling import (HessianTraces, check_settings, checked_params, draw_until_stable,
                             summarize)

__all__ = ["OutputPiece", "fisher_traces"]


class OutputPiece(NamedTuple):
    """A batch (or part of one) the Fisher is taken over.

    outputs: builds the model's class scores (logits) for the piece, classes along dim 1.
    weight: the piece's share of the mean loss (1 for a single batch; each of B batches 1 / B;
        a chunk of r rows out of a batch of n, r / n of that batch's share).
    """

    outputs: Callable[[], torch.Tensor]
    weight: float


def fisher_traces(
    pieces: Sequence[OutputPiece],
    params: Sequence[torch.Tensor],
    *,
    max_samples: int = 64,
    min_samples: int = 4,
    tol: float = 1e-2,
    generator: torch.Generator | None = None,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> HessianTraces:
    """Estimate Tr(F_l), the Fisher information's trace per tensor in ``params``.

    Reads:
        pieces: the batches, each as an :class:`OutputPiece`; every sample calls each piece's
            ``outputs`` once, with autograd enabled, and draws fresh labels from its softmax.
        params: distinct tensors that require grad (the latent weights of quantized layers).
        max_samples, min_samples, tol, generator, all_reduce: as for
            msq_fx.hessian.hutchinson_traces; the generator draws the labels.

    Returns:
        HessianTraces (traces, their standard errors, the sample count); every trace is >= 0.
        Neither ``params`` nor their ``.grad`` are touched.

    Raises:
        ValueError naming the piece whose output is not floating-point class scores of at least
        two dimensions (a batch axis and a class axis), holds NaN or infinite scores, or depends
        on none of the weights.
    """
    check_settings(max_samples, min_samples, tol, generator)
    params = checked_params(params)
    pieces = _checked_pieces(pieces)
    with torch.enable_grad():
        samples = draw_until_stable(
            lambda _nothing: _squared_score_norms(pieces, params, generator),
            params, max_samples, min_samples, tol, generator, all_reduce, _no_probes)
    return summarize(samples)


def _no_probes(params: list[torch.Tensor], generator: torch.Generator | None) -> list:
    # The randomness of a Fisher sample is in its labels, drawn where the outputs are known.
    return []


def _checked_pieces(pieces: Sequence[OutputPiece]) -> list[OutputPiece]:
    pieces = list(pieces)
    if not pieces:
        raise ValueError("pieces is empty: need at least one batch to take the Fisher over")
    for index, piece in enumerate(pieces):
        if not callable(piece.outputs) or not (piece.weight > 0 and math.isfinite(piece.weight)):
            raise ValueError(f"pieces[{index}] needs a callable `outputs` and a finite weight "
                             f"> 0, got {piece!r}")
    return pieces


def _squared_score_norms(pieces: list[OutputPiece], params: list[torch.Tensor],
                         generator: torch.Generator | None) -> torch.Tensor:
    """One sample: || block l of grad sum_j sqrt(w_j) log p(y_j | x_j) ||^2 for every l."""
    total: list[torch.Tensor | None] = [None] * len(params)
    for index, piece in enumerate(pieces):
        log_likelihood = _sampled_log_likelihood(piece, index, generator)
        blocks = torch.autograd.grad(log_likelihood, params, allow_unused=True)
        total = [block if sum_ is None else (sum_ if block is None else sum_ + block)
                 for sum_, block in zip(total, blocks)]
    device = params[0].device
    return torch.stack([torch.zeros((), dtype=torch.float64, device=device) if block is None
                        else block.double().pow(2).sum() for block in total])


def _sampled_log_likelihood(piece: OutputPiece, index: int,
                            generator: torch.Generator | None) -> torch.Tensor:
    """sum_j sqrt(w_j) log p(y_j | x_j) over the piece's draws, y_j drawn from the model."""
    logits = piece.outputs()
    if not isinstance(logits, torch.Tensor) or logits.dim() < 2 \
            or not logits.is_floating_point():
        described = (f"a {type(logits).__name__}" if not isinstance(logits, torch.Tensor)
                     else f"a {logits.dtype} tensor of shape {tuple(logits.shape)}")
        raise ValueError(
            f"the Fisher's batch {index}: the model returned {described}; the Fisher needs class "
            f"scores (logits) with a batch axis and the classes along dim 1; for a model whose "
            f"output is something else use MSQConfig(hessian={{'curvature': 'hessian'}})")
    if not bool(torch.isfinite(logits).all()):
        raise ValueError(f"the Fisher's batch {index}: the model's class scores are not all "
                         f"finite, so no labels can be drawn from them; check the batch's "
                         f"inputs for NaN or infinite values")
    log_probs = F.log_softmax(logits.float(), dim=1).movedim(1, -1)
    flat = log_probs.reshape(-1, log_probs.shape[-1])
    # Drawn on CPU so a seed gives the same labels on any device.
    labels = torch.multinomial(flat.detach().exp().cpu(), 1, generator=generator)
    chosen = flat.gather(1, labels.to(flat.device)).sum()
    if not chosen.requires_grad:
        raise ValueError(f"the Fisher's batch {index}: the model's output depends on none of "
                         f"the weights (or was built with autograd disabled)")
    return chosen * math.sqrt(piece.weight / flat.shape[0])
