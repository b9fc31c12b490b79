"""One model of a zoo sweep: ``msq-fx check --json`` in a subprocess under a wall-clock timeout
and an address-space cap, tried once more lean in a fresh process when it runs out of memory,
and the CSV row of what happened (the check's PASS / FAIL / SKIP, or TIMEOUT, OOM, CRASH)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from ..utils import OUT_OF_MEMORY_MESSAGES

__all__ = ["COLUMNS", "CHECK_STATUSES", "SWEEP_STATUSES", "Limits", "LEAN_RETRY",
           "LEAN_WAY_ALWAYS", "LEAN_WAY", "LEAN_ENV", "check_env", "check_command", "Children",
           "CHILDREN", "run_check", "run_check_once", "kill_group"]

#: The columns of a sweep's CSV, one row per model (see msq_fx.zoo.sweep for what each holds).
COLUMNS = ["model", "graph_nodes", "leaves", "quantized_weights", "float_leftovers", "seconds",
           "status", "reason", "stage", "max_abs_diff", "input_size", "float_details",
           "peak_mib", "hessian", "note", "exports", "stage_seconds", "limits", "compiled"]
#: A row's status: the check's own, or what the sweep saw of a check that gave no result.
CHECK_STATUSES = ("PASS", "FAIL", "SKIP")
SWEEP_STATUSES = ("TIMEOUT", "OOM", "CRASH")
OOM_PATTERN = re.compile("|".join(map(re.escape, OUT_OF_MEMORY_MESSAGES)))
STDERR_LINES_KEPT = 40


@dataclass(frozen=True)
class Limits:
    """What every check of a sweep runs with: its limits, input size, exports and whether it
    runs the prepared model through torch.compile."""

    timeout: float
    memory_bytes: int
    threads: int
    input_size: str | None
    exports: tuple[str, ...] = ()
    compile: bool = False

    def describe(self) -> str:
        """``900 s, 10 GiB, 1 thread``: what a row was checked under (column limits)."""
        return (f"{self.timeout:g} s, {self.memory_bytes / 2**30:g} GiB, {self.threads} "
                f"thread{'s' if self.threads != 1 else ''}")


# The child caps its own address space before importing anything, then runs the CLI; this avoids
# preexec_fn, which is unsafe when the sweep runs several checks from threads (--jobs).
_CHILD = ("import resource, runpy, sys; limit = int(sys.argv[1]); "
          "resource.setrlimit(resource.RLIMIT_AS, (limit, limit)); "
          "sys.argv = ['msq-fx'] + sys.argv[2:]; "
          "runpy.run_module('msq_fx.cli', run_name='__main__')")


#: The options a check that ran out of memory is tried again with, in a fresh process: the
#: smallest batch, the Hessian that needs a training step's memory, and the activations saved
#: for the backward in files (``msq_fx.offload.offload_saved_tensors``), so that a step holds
#: little more than the weights however large the input. A fresh process, because
#: the memory a failed attempt leaves mapped still counts against the address-space cap (the
#: check's own in-process retry at batch 1 was seen failing to rebuild the model after it).
LEAN_RETRY = ("--batch-size", "1", "--hessian-method", "finite_difference",
              "--offload-activations")

#: What every version of LEAN_RETRY had; the activations went to disk from a later one on.
LEAN_WAY_ALWAYS = "at batch 1 with the finite-difference Hessian"

#: How a row's note names LEAN_RETRY.
LEAN_WAY = f"{LEAN_WAY_ALWAYS} and activations on disk"

#: The environment a lean check runs with besides. glibc's malloc raises its mmap threshold as
#: large blocks are freed (up to 32 MiB), after which freed activations and weight-sized
#: temporaries stay in its heap, fragmented, counting against the cap; a fixed threshold of
#: 1 MiB maps every such block on its own and unmaps it when it is freed. It trades time (a page
#: fault per fresh page) for memory, which is what a lean check is for. ``--offload-activations``
#: makes the check fix the threshold itself too, but only once it runs; the environment fixes it
#: from the start, while the model is built. Without a fixed threshold the offloaded
#: activations' memory stays in the heap (eva02_large_patch14_224 at batch 1: the training
#: steps' peak 1045 MiB above the prepared model's with the activations on disk alone, 35 MiB
#: with both).
LEAN_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**20)}


def check_env(limits: Limits, lean: bool = False) -> dict[str, str]:
    """The environment of a check subprocess: ours, with the thread limits (and LEAN_ENV)."""
    return {**os.environ, "OMP_NUM_THREADS": str(limits.threads),
            "MKL_NUM_THREADS": str(limits.threads), "PYTHONWARNINGS": "ignore",
            **(LEAN_ENV if lean else {})}


def check_command(spec: str, limits: Limits, options: tuple[str, ...] = ()) -> list[str]:
    command = [sys.executable, "-c", _CHILD, str(limits.memory_bytes), "check", "--json",
               "--threads", str(limits.threads), *options, spec]
    if limits.input_size:
        command += ["--input-size", limits.input_size]
    for target in limits.exports:
        command += ["--export", target]
    if limits.compile:
        command.append("--compile")
    return command


class Children:
    """The check subprocesses running now, so an interrupted sweep can stop them all."""

    def __init__(self) -> None:
        self._running: set[subprocess.Popen] = set()
        self._lock = threading.Lock()

    def start(self, command: list[str], env: dict[str, str]) -> subprocess.Popen:
        with self._lock:
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True, env=env,
                                       start_new_session=True)  # own group: killed as a whole
            self._running.add(process)
        return process

    def finished(self, process: subprocess.Popen) -> None:
        with self._lock:
            self._running.discard(process)

    def kill_all(self) -> None:
        with self._lock:
            running = list(self._running)
        for process in running:
            kill_group(process)


CHILDREN = Children()


def run_check(spec: str, limits: Limits, lean_option: str | None = None) -> dict:
    """Check one model in a subprocess, and once more with LEAN_RETRY in a fresh one if it ran
    out of memory (with ``lean_option``, the sweep option that sent the model lean: with
    LEAN_RETRY only); the CSV row of what happened (never raises)."""
    start = time.perf_counter()
    if lean_option:
        row = run_check_once(spec, limits, start, lean=True)
        row["note"] = "; ".join(filter(None, [
            row["note"], f"checked {LEAN_WAY} from the start ({lean_option})"]))
        return row
    row = run_check_once(spec, limits, start)
    if row["status"] != "OOM":
        return row
    retry = run_check_once(spec, limits, start, lean=True)
    if retry["status"] != "PASS":
        row["note"] = "; ".join(filter(None, [
            row["note"], f"fresh process {LEAN_WAY}: {retry['status']} "
                         f"({_clipped(retry['reason'])})"]))
        row["seconds"] = retry["seconds"]  # both attempts
        return row
    retry["note"] = (f"passed in a fresh process {LEAN_WAY}; batch 2 ran out of memory in "
                     f"{row['stage'] or 'the check'}")
    return retry


def _clipped(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def run_check_once(spec: str, limits: Limits, start: float, lean: bool = False) -> dict:
    """One check subprocess (``lean``: with LEAN_RETRY and LEAN_ENV); ``seconds`` in its row
    counts from ``start``."""
    process = CHILDREN.start(check_command(spec, limits, LEAN_RETRY if lean else ()),
                             check_env(limits, lean))
    try:
        stdout, stderr = process.communicate(timeout=limits.timeout)
    except subprocess.TimeoutExpired:
        kill_group(process)
        process.communicate()  # reap it and close the pipes
        return _row(spec, "TIMEOUT", f"no result within {limits.timeout:g} s", start)
    finally:
        CHILDREN.finished(process)
    result = _last_json_line(stdout)
    if result is None:
        return _crash_row(spec, process.returncode, stderr, start)
    return _result_row(result, start)


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the check subprocess and whatever it started (its own process group). Only
    signals: the thread that started it is reading its pipes and reaps it."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _last_json_line(stdout: str) -> dict | None:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def _crash_row(spec: str, returncode: int, stderr: str, start: float) -> dict:
    tail = [line for line in stderr.strip().splitlines()[-STDERR_LINES_KEPT:] if line.strip()]
    last = tail[-1].strip() if tail else ""
    if OOM_PATTERN.search("\n".join(tail)):
        return _row(spec, "OOM", f"out of memory under the cap: {last}", start)
    if returncode < 0:
        name = signal.Signals(-returncode).name
        reason = f"killed by {name}" + (" (likely the kernel's OOM killer)"
                                         if name == "SIGKILL" else "")
        return _row(spec, "CRASH", reason, start)
    return _row(spec, "CRASH", f"exit status {returncode} without a result: {last}", start)


def _result_row(result: dict, start: float) -> dict:
    status, reason = result["status"], result["reason"]
    # Running out of memory is a limit of the sweep, not a property of the model (a larger
    # --memory-gib may pass it), also where the check calls it a model that does not run.
    if status in ("FAIL", "SKIP") and OOM_PATTERN.search(reason):
        status = "OOM"
    floats = result["float_weights"]
    return _row(
        result["model"], status, reason, start, stage=result["stage"] or "",
        graph_nodes=result["graph_nodes"], leaves=result["leaves"],
        quantized_weights=result["quantized_weights"], float_leftovers=len(floats),
        max_abs_diff="" if result["max_abs_diff"] is None else f"{result['max_abs_diff']:.3g}",
        input_size="x".join(map(str, result["input_size"] or [])),
        peak_mib=_peak_mib(result.get("peak_memory_mib") or {}),
        hessian=result.get("hessian_method") or "",
        note=result.get("note") or "",
        exports=_exports_text(result.get("exports") or {}),
        compiled=_compiled_text(result.get("compiled")),
        stage_seconds="; ".join(f"{stage} {seconds:.1f}" for stage, seconds
                                in (result.get("stage_seconds") or {}).items()),
        float_details="; ".join(f"{f['name']} [{f['kind']}]: {f['reason']}" for f in floats))


def _exports_text(exports: dict[str, dict]) -> str:
    """``torch 0; onnx 1.3e-06``: each export's max |exported - converted| / max |converted|."""
    return "; ".join(f"{target} {found['rel_diff']:.2g}" for target, found in exports.items())


def _compiled_text(compiled: dict | None) -> str:
    """``1 graph`` or ``3 graphs, 2 breaks: <first break>``; "" where it was not asked for."""
    if not compiled:
        return ""
    graphs, breaks = compiled["graphs"], compiled["graph_breaks"]
    text = f"{graphs} graph{'s' if graphs != 1 else ''}"
    if breaks:
        text += f", {breaks} break{'s' if breaks != 1 else ''}: {compiled['break_reasons'][0]}"
    return text


def _peak_mib(per_stage: dict[str, float]) -> str:
    """The check process's resident high-water mark over all stages, in MiB."""
    return f"{max(per_stage.values()):.0f}" if per_stage else ""


def _row(spec: str, status: str, reason: str, start: float, **fields) -> dict:
    row = {column: "" for column in COLUMNS}
    row.update(model=spec, status=status, reason=reason,
               seconds=f"{time.perf_counter() - start:.1f}", **fields)
    return row
