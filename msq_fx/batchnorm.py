"""Re-estimating BatchNorm running statistics after the weights feeding them changed."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from .utils import call_model

__all__ = ["recalibrate_batchnorm", "tracking_batchnorms", "saved_statistics"]


def tracking_batchnorms(model: nn.Module) -> list[nn.Module]:
    """Every BatchNorm in ``model`` that keeps running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.track_running_stats]


def saved_statistics(norms: Iterable[nn.Module]) -> Callable[[], None]:
    """Copy the running mean, variance and batch count of each of ``norms``; the returned
    function puts them back."""
    saved = [(norm, norm.running_mean.clone(), norm.running_var.clone(),
              norm.num_batches_tracked.clone()) for norm in norms]

    def restore() -> None:
        for norm, mean, var, count in saved:
            norm.running_mean.copy_(mean)
            norm.running_var.copy_(var)
            norm.num_batches_tracked.copy_(count)
    return restore


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable) -> int:
    """Replace the running mean and variance of every BatchNorm in ``model`` by their average
    over ``batches`` (``(inputs, targets)`` pairs; targets are ignored).

    The rest of the model runs in eval mode (no dropout, no other state moves); the model's
    modes and each BatchNorm's momentum are restored afterwards. Returns the number of
    BatchNorm layers recalibrated (0 when the model has none, or no batch was given).
    """
    norms = tracking_batchnorms(model)
    batches = list(batches)
    if not norms or not batches:
        return 0
    modes = {m: m.training for m in model.modules()}
    momenta = {norm: norm.momentum for norm in norms}
    restore_statistics = saved_statistics(norms)
    try:
        model.eval()
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # a cumulative average over the batches
            norm.train()
        for inputs, _ in batches:
            call_model(model, inputs)
    except BaseException:
        # A failed recalibration leaves the statistics as they were.
        restore_statistics()
        raise
    finally:
        for norm, momentum in momenta.items():
            norm.momentum = momentum
        for module, training in modes.items():
            module.train(training)
    return len(norms)
