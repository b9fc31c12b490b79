"""What a check does when it runs out of memory: check again at batch 1, then name (or, with
``lean_retry``, try) the options that lower the memory of the stage that ran out: the
finite-difference Hessian, and the saved activations on disk."""
from __future__ import annotations

import gc
from typing import Callable, Sequence

from ..config import MSQConfig
from .result import PASS, CheckResult
from .stages import Findings

__all__ = ["with_less_memory_retries"]


def with_less_memory_retries(run: Callable[..., Findings], batch_size: int, config: MSQConfig,
                             offload_activations: bool, lean_retry: bool) -> CheckResult:
    """The result of ``run(batch_size)``, a check run at that batch, with the retries of a run
    that ran out of memory (see :func:`msq_fx.check.check_model`): ``run(1)`` at batch 1, and
    with ``lean_retry`` ``run(1, config=..., offload=...)`` with the options not yet in effect
    (``config`` and ``offload_activations`` being those of the first run)."""
    first = run(batch_size)
    if not first.out_of_memory:
        return first.result()
    stage = first.problems[0][0]
    at_one = first
    if batch_size != 1:
        # Whether an architecture quantizes does not depend on the batch; a batch of 1 halves
        # the activations, so a model too big for this machine at the batch may still be checked.
        gc.collect()
        at_one = run(1)
        if at_one.status == PASS:
            at_one.start = first.start  # the time of both runs
            at_one.fields["note"] = f"at batch 1: batch {batch_size} ran out of memory in {stage}"
            return at_one.result()
    untried = _untried_less_memory_options(at_one, config, offload_activations)
    notes = [] if at_one is first else [f"at batch 1: {_outcome(at_one)}"]
    if lean_retry and untried:
        gc.collect()
        lean = run(1, config=(config.replace(hessian=dict(method="finite_difference"))
                              if "finite_difference" in untried else config),
                   offload=offload_activations or "offload" in untried)
        way = ", ".join(_LESS_MEMORY_OPTIONS[option][0] for option in untried)
        if lean.status == PASS:
            lean.start = first.start  # the time of every run
            ran_out = (f"batch {batch_size} ran out of memory in {stage}, batch 1 in "
                       f"{at_one.problems[0][0]}" if at_one is not first
                       else f"it ran out of memory in {stage}")
            lean.fields["note"] = f"at batch 1 with {way}: {ran_out}"
            return lean.result()
        notes.append(f"at batch 1 with {way}: {_outcome(lean)}")
    else:
        notes.append(_less_memory_hint(untried))
    first.fields["note"] = "; ".join(filter(None, notes))
    return first.result()


def _outcome(findings: Findings) -> str:
    """``STATUS (first reason)`` of a run that did not pass, for the note of the first run."""
    return f"{findings.status} ({findings.problems[0][1] if findings.problems else ''})"


#: The check's options that lower its memory: (check_model's, msq-fx check's) spelling.
_LESS_MEMORY_OPTIONS = {
    "finite_difference": ("config hessian={'method': 'finite_difference'}",
                          "--hessian-method finite_difference"),
    "offload": ("offload_activations=True", "--offload-activations"),
}

#: Which of them lower the memory of each stage.
_LESS_MEMORY_BY_STAGE = {"train": ("offload",), "prune": ("finite_difference", "offload")}


def _untried_less_memory_options(findings: Findings, config: MSQConfig,
                                 offload: bool) -> list[str]:
    """The keys of ``_LESS_MEMORY_OPTIONS`` that lower the memory of the stage where
    ``findings`` ran out of memory and were not in effect; [] when it did not run out."""
    if not findings.out_of_memory:
        return []
    in_effect = {"offload": offload,
                 "finite_difference": config.hessian.method == "finite_difference"}
    return [option for option in _LESS_MEMORY_BY_STAGE.get(findings.problems[0][0], ())
            if not in_effect[option]]


def _less_memory_hint(options: Sequence[str]) -> str:
    """What to try, in both spellings, for the ``_LESS_MEMORY_OPTIONS`` keys given."""
    if not options:
        return ""
    spellings = [_LESS_MEMORY_OPTIONS[option] for option in options]
    return (f"to check it in less memory, try {', '.join(api for api, _ in spellings)} "
            f"(msq-fx check {' '.join(cli for _, cli in spellings)} or --lean-retry)")
