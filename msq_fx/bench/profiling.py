"""Where a training step spends its time (``--profile N``): the ops of a few steps by
``torch.profiler``, each with its self CPU time per step (time in the op itself, not in the ops
it calls) and its calls per step, for every contender.

The profiler times ops by the wall clock, so on a shared machine an op the scheduler paused
looks slow. Each step is profiled on its own, its op times are scaled by the step's CPU time
over its wall time (this process's share of a CPU while it ran, taken as the same for every
op), and each op's time is the lowest over the profiled steps.

Autograd Functions written in Python (msq_fx's ``_StraightThrough`` and ``_LsbL1``, their
backward nodes) appear under their own names; their self time is mostly the Python around the
tensor ops they call.
"""
from __future__ import annotations

import time

from torch import Tensor
from torch.profiler import ProfilerActivity, profile

from .contenders import Contender, train_step

__all__ = ["op_times", "top_ops"]


def op_times(contender: Contender, batch: tuple[Tensor, Tensor], steps: int) -> dict[str, dict]:
    """``{op: {"self_ms": per step, "calls": per step}}`` over ``steps`` steps, each profiled
    on its own (self_ms scaled to the step's CPU time, the lowest over the steps)."""
    times: dict[str, dict] = {}
    for _ in range(steps):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            wall, cpu = time.perf_counter(), time.process_time()
            train_step(contender, *batch)
            share = min(1.0, (time.process_time() - cpu) / (time.perf_counter() - wall))
        for event in prof.key_averages():
            self_ms = share * event.self_cpu_time_total / 1e3
            seen = times.setdefault(event.key, {"self_ms": self_ms, "calls": event.count})
            seen["self_ms"] = min(seen["self_ms"], self_ms)
    return times


def top_ops(times: dict[str, dict[str, dict]], reference: str, count: int) -> list[str]:
    """The ``count`` ops with the most self time in contender ``reference``, most first."""
    ops = times[reference]
    return sorted(ops, key=lambda op: ops[op]["self_ms"], reverse=True)[:count]
