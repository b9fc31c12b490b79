"""The conditions a run was measured under: the machine, and how busy its CPUs were with other
work while it ran.

Timings on a shared machine depend on what else runs. Beside the load average, the run records
the CPU time the whole machine spent busy (``/proc/stat``) minus this process's own CPU time,
per second of the run: how many cores other processes kept busy on average.
"""
from __future__ import annotations

import os
import platform
import resource
import time
from dataclasses import dataclass

__all__ = ["Conditions", "machine_description"]


def _busy_seconds() -> float | None:
    """Seconds all CPUs spent not idle since boot (Linux), or None."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(value) for value in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _load_average() -> list[float] | None:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


def machine_description() -> str:
    """CPU model and core count, e.g. 'AMD EPYC, 2 cores'."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


@dataclass
class Conditions:
    """Start with :meth:`start`, end with :meth:`as_dict` (which reads the end state)."""

    wall: float
    own_cpu: float
    busy: float | None
    load_average: list[float] | None

    @classmethod
    def start(cls) -> "Conditions":
        return cls(time.perf_counter(), _own_cpu_seconds(), _busy_seconds(), _load_average())

    def as_dict(self) -> dict:
        wall = time.perf_counter() - self.wall
        own = _own_cpu_seconds() - self.own_cpu
        busy = _busy_seconds()
        other = None
        if busy is not None and self.busy is not None and wall > 0:
            other = round(max(0.0, (busy - self.busy - own) / wall), 2)
        return {"machine": machine_description(), "wall_seconds": round(wall, 1),
                "own_cpu_seconds": round(own, 1), "other_processes_cores": other,
                "load_average_start": self.load_average, "load_average_end": _load_average()}
