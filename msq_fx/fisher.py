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
from typing import Callable, Iterable, NamedTuple, Sequence

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
        pieces: the batches, each as an :class:`OutputPiece`, whose ``outputs`` run with
            autograd enabled; every sample draws fresh labels from each piece's softmax. A
            single piece runs once and its graph serves every sample; with several, each runs
            once per sample, so one piece's graph is alive at a time.
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
        if len(pieces) == 1:
            # One batch: its forward is built once and only the backward repeats per draw (the
            # labels, drawn from the same scores, are those a fresh forward would give).
            scores = [(_class_scores(pieces[0], 0), pieces[0].weight)]

            def sample_of(_nothing: list) -> torch.Tensor:
                return _squared_score_norms(scores, params, generator, retain_graph=True)
        else:
            def sample_of(_nothing: list) -> torch.Tensor:
                # A generator, so one piece's graph at a time is alive (what chunks are for).
                return _squared_score_norms(
                    ((_class_scores(piece, index), piece.weight)
                     for index, piece in enumerate(pieces)), params, generator,
                    retain_graph=False)
        samples = draw_until_stable(sample_of, params, max_samples, min_samples, tol, generator,
                                    all_reduce, _no_probes)
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


def _squared_score_norms(scores: Iterable[tuple[torch.Tensor, float]],
                         params: list[torch.Tensor], generator: torch.Generator | None,
                         retain_graph: bool) -> torch.Tensor:
    """One sample: || block l of grad sum_j sqrt(w_j) log p(y_j | x_j) ||^2 for every l, over
    each piece's class scores and weight in ``scores``."""
    total: list[torch.Tensor | None] = [None] * len(params)
    for logits, weight in scores:
        blocks = torch.autograd.grad(_sampled_log_likelihood(logits, weight, generator), params,
                                     allow_unused=True, retain_graph=retain_graph)
        total = [block if sum_ is None else (sum_ if block is None else sum_ + block)
                 for sum_, block in zip(total, blocks)]
    device = params[0].device
    return torch.stack([torch.zeros((), dtype=torch.float64, device=device) if block is None
                        else block.double().pow(2).sum() for block in total])


def _class_scores(piece: OutputPiece, index: int) -> torch.Tensor:
    """The piece's class scores, checked to be finite floating-point scores with a class axis
    that depend on the weights."""
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
    if not logits.requires_grad:
        raise ValueError(f"the Fisher's batch {index}: the model's output depends on none of "
                         f"the weights (or was built with autograd disabled)")
    return logits


def _sampled_log_likelihood(logits: torch.Tensor, weight: float,
                            generator: torch.Generator | None) -> torch.Tensor:
    """sum_j sqrt(w_j) log p(y_j | x_j) over the draws of ``logits`` (a piece of ``weight`` in
    the mean loss), y_j drawn from the model."""
    log_probs = F.log_softmax(logits.float(), dim=1).movedim(1, -1)
    flat = log_probs.reshape(-1, log_probs.shape[-1])
    # Drawn on CPU so a seed gives the same labels on any device.
    labels = torch.multinomial(flat.detach().exp().cpu(), 1, generator=generator)
    return flat.gather(1, labels.to(flat.device)).sum() * math.sqrt(weight / flat.shape[0])
