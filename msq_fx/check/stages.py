"""The bookkeeping of one check while it runs: the findings gathered so far (problems, timings,
peak memory, result fields), and the stage context that turns an exception into the check's
finding at that stage."""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Iterator

from ..utils import is_out_of_memory
from ..zoo.errors import describe_error
from .result import FAIL, PASS, CheckResult

__all__ = ["Findings", "StageFailed", "in_stage", "peak_resident_mib"]


class Findings:
    """The facts gathered so far while one check runs; becomes a CheckResult at the end."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.start = time.perf_counter()
        self.status = PASS
        self.problems: list[tuple[str, str]] = []  # (stage, one-line reason)
        self.out_of_memory = False  # the first problem was an allocation failure
        self.fields: dict[str, Any] = {"stage_seconds": {}, "peak_memory_mib": {}}

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Add the wall time spent inside to ``stage_seconds[stage]``, even when it raises."""
        start = time.perf_counter()
        try:
            yield
        finally:
            seconds = self.fields["stage_seconds"].get(stage, 0.0) + time.perf_counter() - start
            self.fields["stage_seconds"][stage] = round(seconds, 3)
            peak = peak_resident_mib()
            if peak is not None:
                self.fields["peak_memory_mib"][stage] = peak

    def problem(self, stage: str, reason: str, status: str = FAIL,
                error: BaseException | None = None) -> None:
        if not self.problems:
            self.status = status
            self.out_of_memory = error is not None and is_out_of_memory(error)
        self.problems.append((stage, reason))

    def result(self) -> CheckResult:
        return CheckResult(
            model=self.name, status=self.status,
            reason="; ".join(reason for _, reason in self.problems),
            stage=self.problems[0][0] if self.problems else None,
            seconds=round(time.perf_counter() - self.start, 3), **self.fields)


class StageFailed(Exception):
    """Ends a check early; the failure is already recorded in the findings."""


@contextmanager
def in_stage(findings: Findings, stage: str, status: str = FAIL,
             prefix: str = "") -> Iterator[None]:
    """Record any exception raised inside as the check's failure at ``stage``, then stop."""
    try:
        with findings.timed(stage):
            yield
    except StageFailed:
        raise
    except Exception as error:  # any error of the model or the library is the check's finding
        findings.problem(stage, f"{stage}: {prefix}{describe_error(error)}", status, error)
        raise StageFailed from error


def peak_resident_mib() -> float | None:
    """The process's peak resident memory so far in MiB (None where the OS does not say)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux
