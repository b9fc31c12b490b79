"""The cost of the pruning step (``--hessian``): ``MSQController.epoch_end``, i.e. Hutchinson
traces with ``--probes`` probes on the batch in eval mode, once per H v method: the double
backward ("autograd", also in chunks with ``--hessian-chunk-size``) and the central difference
of gradients ("finite_difference"); and the Fisher's trace in place of the Hessian's ("fisher",
``--probes`` label draws). The LSB threshold is set so that no group is pruned, so every repeat
computes the traces at the same widths.
"""
from __future__ import annotations

import argparse
import functools
import statistics
from typing import Callable

import torch
from torch import Tensor, nn

from .. import MSQConfig, MSQController
from ..zoo import task_loss
from .memory import between_epochs_bytes, peak_bytes
from .timing import mean_seconds

__all__ = ["pruning_step", "hessian_costs"]


def pruning_step(qmodel: nn.Module, method: str, probes: int, batch: tuple[Tensor, Tensor],
                 chunk_size: int | None = None) -> Callable[[], None]:
    """One ``epoch_end`` per call: the Hessian by ``method`` ("fisher": the Fisher's trace),
    then a prune that drops nothing."""
    curvature = dict(curvature="fisher") if method == "fisher" else dict(method=method)
    config = MSQConfig(pruning=dict(interval=1, threshold=1e-9),
                       hessian=dict(**curvature, min_samples=probes, max_samples=probes,
                                    chunk_size=chunk_size))
    controller = MSQController(qmodel, config)
    epochs = iter(range(1, 1_000_000))

    def run() -> None:
        records = controller.epoch_end(next(epochs), [batch], task_loss)
        if not records or records[0].hessian_method != method:
            raise RuntimeError(f"the pruning step did not take the Hessian by {method}")

    return run


def hessian_costs(qmodel: nn.Module, optimizer: torch.optim.Optimizer,
                  batch: tuple[Tensor, Tensor], args: argparse.Namespace,
                  device: torch.device) -> dict[str, dict]:
    """Median time and peak bytes of one pruning step per H v method (after one warm-up call,
    ``args.repeats`` timed calls each)."""
    optimizer.zero_grad(set_to_none=True)  # the pruning step runs between epochs, without them
    variants = {"autograd": ("autograd", None), "finite_difference": ("finite_difference", None),
                "fisher": ("fisher", None)}
    if args.hessian_chunk_size is not None:
        variants[f"autograd, chunks of {args.hessian_chunk_size}"] = (
            "autograd", args.hessian_chunk_size)
    results = {}
    for name, (method, chunk_size) in variants.items():
        run = pruning_step(qmodel, method, args.probes, batch, chunk_size)
        run()  # warm-up
        times = [mean_seconds(run, 1, device) for _ in range(args.repeats)]
        resident = functools.partial(between_epochs_bytes, qmodel, optimizer, batch)
        results[name] = {"median_ms": 1e3 * statistics.median(times),
                         "repeat_ms": [1e3 * t for t in times],
                         "peak_bytes": peak_bytes(run, resident, device)}
    return results
