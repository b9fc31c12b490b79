"""Time per training step and per eval forward, interleaved across contenders.

After the warm-up, each repeat times ``steps`` calls of every contender in turn (FP, MSQ, ...,
then the next repeat), so that slow drifts of the machine (frequency scaling, other load) hit
all alike. A repeat gives a mean time per call; the report takes the median over repeats.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import time
from typing import Callable

import torch
from torch import Tensor, nn

from .. import convert
from ..weight_cache import cached_quantized_weights
from .allocator import minor_faults
from .contenders import AUTOCAST_DTYPES, Contender, train_step

__all__ = ["CACHED", "CLOCKS", "synchronize", "mean_seconds", "seconds_per_step",
           "interleaved_step_times", "eval_forward_times"]

#: Suffix of an eval contender that runs inside
#: ``msq_fx.weight_cache.cached_quantized_weights``.
CACHED = ", cached weights"


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels (a no-op on CPU), so a clock reading covers them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: The clocks of ``--clock``: wall-clock time, or the CPU time of this process (all its threads,
#: user and system), which leaves out the time other processes held the CPU it waited for.
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def mean_seconds(run: Callable[[], object], calls: int, device: torch.device,
                 clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds per call of ``run`` over ``calls`` calls in a row, by ``clock`` (see CLOCKS)."""
    synchronize(device)
    start = clock()
    for _ in range(calls):
        run()
    synchronize(device)
    return (clock() - start) / calls


def seconds_per_step(contender: Contender, batch: tuple[Tensor, Tensor], steps: int,
                     device: torch.device, clock: Callable[[], float] = time.perf_counter) -> float:
    return mean_seconds(lambda: train_step(contender, *batch), steps, device, clock)


def interleaved_step_times(contenders: list[Contender], batch: tuple[Tensor, Tensor], repeats: int,
                           steps: int, device: torch.device,
                           clock: Callable[[], float] = time.perf_counter,
                           faults: dict[str, int] | None = None) -> dict[str, list[float]]:
    """Seconds per training step, one figure per repeat, by contender name; ``faults``, if
    given, gets each contender's minor page faults over its timed steps."""
    times: dict[str, list[float]] = {c.name: [] for c in contenders}
    for _ in range(repeats):
        for contender in contenders:
            before = minor_faults()
            times[contender.name].append(seconds_per_step(contender, batch, steps, device, clock))
            if faults is not None:
                faults[contender.name] = faults.get(contender.name, 0) + minor_faults() - before
    return times


def eval_forward_times(float_model: nn.Module, qmodel: nn.Module, inputs: Tensor,
                       args: argparse.Namespace, device: torch.device) -> dict[str, list[float]]:
    """Seconds per eval-mode forward under no_grad, per repeat, for each way of evaluating.

    The float model, the fake-quant model and the converted model, the latter two also inside
    ``msq_fx.weight_cache.cached_quantized_weights`` (entered once around all repeats, as around
    a validation loop). Uses ``args.warmup``, ``args.repeats``, ``args.steps`` and
    ``args.autocast``; the float and fake-quant models are left in the mode they had.
    """
    converted = convert(qmodel)
    models = {"FP32": float_model, "MSQ fake-quant": qmodel,
              "MSQ fake-quant" + CACHED: copy.deepcopy(qmodel),
              "MSQ converted": converted, "MSQ converted" + CACHED: copy.deepcopy(converted)}
    modes = [(model, model.training) for model in (float_model, qmodel)]
    autocast = AUTOCAST_DTYPES.get(args.autocast)

    def forward_seconds(model: nn.Module, steps: int) -> float:
        return mean_seconds(lambda: model(inputs), steps, device)

    times: dict[str, list[float]] = {name: [] for name in models}
    try:
        for model in models.values():
            model.eval()
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            stack.enter_context(torch.autocast(device.type, dtype=autocast,
                                               enabled=autocast is not None))
            for name, model in models.items():
                if name.endswith(CACHED):
                    stack.enter_context(cached_quantized_weights(model))
            for model in models.values():
                if args.warmup:
                    forward_seconds(model, args.warmup)
            for _ in range(args.repeats):
                for name, model in models.items():
                    times[name].append(forward_seconds(model, args.steps))
    finally:
        for model, training in modes:
            model.train(training)
    return times
