"""Where a training step spends its time (``--profile N``): the ops of a few steps by
``torch.profiler``, each with its self CPU time per step (time in the op itself, not in the ops
it calls) and its calls per step, for every contender.

Autograd Functions written in Python (msq_fx's ``_StraightThrough`` and ``_LsbL1``, their
backward nodes) appear under their own names; their self time is mostly the Python around the
tensor ops they call.
"""
from __future__ import annotations

from torch import Tensor
from torch.profiler import ProfilerActivity, profile

from .contenders import Contender, train_step

__all__ = ["op_times", "top_ops"]


def op_times(contender: Contender, batch: tuple[Tensor, Tensor], steps: int) -> dict[str, dict]:
    """``{op: {"self_ms": per step, "calls": per step}}`` over ``steps`` profiled steps."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            train_step(contender, *batch)
    return {event.key: {"self_ms": event.self_cpu_time_total / 1e3 / steps,
                        "calls": event.count / steps}
            for event in prof.key_averages()}


def top_ops(times: dict[str, dict[str, dict]], reference: str, count: int) -> list[str]:
    """The ``count`` ops with the most self time in contender ``reference``, most first."""
    ops = times[reference]
    return sorted(ops, key=lambda op: ops[op]["self_ms"], reverse=True)[:count]
