"""Which float training becomes the rows' start (``tools/fidelity choose-start``).

The rule was fixed before the runs it judges had finished an epoch (docs/fidelity.md, "A
200-epoch float start"): of finished float runs, the one more accurate on the 9,000 test images
outside the bit-exact 1,000 (the JPEG-decoded ones) is kept, so the bar is not also what
chooses; it becomes the start only if it reaches FLOAT_START_BAR on the bit-exact 1,000.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from tabulate import tabulate

from .run import FLOAT_WEIGHTS, start_digest

__all__ = ["FLOAT_START_BAR", "FloatRun", "read_float_run", "choose_float_start",
           "float_runs_table", "install_float_start"]

#: The accuracy on the bit-exact 1,000 test images a float start must reach.
FLOAT_START_BAR = 91.5

TEST_IMAGES, EXACT_IMAGES = 10_000, 1_000


@dataclass(frozen=True)
class FloatRun:
    """A float training as its ``float.json`` records it after its last epoch so far."""
    directory: Path
    epochs_planned: int
    epochs_done: int
    all_10k: float
    exact_1k: float

    @property
    def finished(self) -> bool:
        return self.epochs_done == self.epochs_planned

    @property
    def other_9k(self) -> float:
        """Accuracy on the test images outside the bit-exact ones, from the two recorded
        accuracies (each a count of right answers over its set, in percent)."""
        right_all = round(self.all_10k * TEST_IMAGES / 100)
        right_exact = round(self.exact_1k * EXACT_IMAGES / 100)
        return 100 * (right_all - right_exact) / (TEST_IMAGES - EXACT_IMAGES)


def read_float_run(directory: Path) -> FloatRun:
    """The run under ``directory`` (its ``float.json``, as tools/cifar10_resnet20 writes it)."""
    record_path = directory / "float.json"
    try:
        record = json.loads(record_path.read_text())
        planned = int(record["args"]["epochs"])
        last = record["epochs"][-1]
        return FloatRun(directory, planned, int(last["epoch"]), float(last["test_acc"]),
                        float(last["test_exact_acc"]))
    except (OSError, ValueError, KeyError, IndexError) as error:
        raise ValueError(f"{record_path}: not a float run's record with a scored epoch "
                         f"({error!r}); give the directories tools/cifar10_resnet20 --run float "
                         f"wrote") from None


def choose_float_start(runs: list[FloatRun]) -> FloatRun:
    """The finished run most accurate on the 9,000 other test images (on a tie, the first
    named). Refuses, naming them, while any run is unfinished: the rule compares the runs at
    the end of their schedules."""
    if not runs:
        raise ValueError("no float runs to choose from")
    unfinished = [f"{run.directory} ({run.epochs_done} of {run.epochs_planned} epochs)"
                  for run in runs if not run.finished]
    if unfinished:
        raise ValueError(f"not every run has finished: {', '.join(unfinished)}; the command "
                         f"that started a run resumes it from its checkpoint (float.json "
                         f"records its arguments), then choose")
    return max(runs, key=lambda run: run.other_9k)  # max keeps the first of equals


def float_runs_table(runs: list[FloatRun], kept: FloatRun | None) -> str:
    """The runs side by side: epochs, the three accuracies, which is kept, and the bar."""
    lines = [[str(run.directory), f"{run.epochs_done} of {run.epochs_planned}",
              f"{run.all_10k:.2f}", f"{run.other_9k:.2f}", f"{run.exact_1k:.1f}",
              "kept" if run is kept else "",
              "yes" if run.exact_1k >= FLOAT_START_BAR else "no"] for run in runs]
    return tabulate(lines, headers=["run", "epochs", "all 10k", "other 9k", "exact 1k", "",
                                    f"exact 1k >= {FLOAT_START_BAR}"])


def install_float_start(run: FloatRun, into: Path) -> Path:
    """Copies the kept run's final weights and its record into ``into`` (a directory the rows
    then run under). Refuses when ``into`` already holds another start: rows written there
    came from that one."""
    source = run.directory / FLOAT_WEIGHTS
    if not source.exists():
        raise ValueError(f"{run.directory}: no {FLOAT_WEIGHTS}; a float run writes it after its "
                         f"last epoch")
    target = into / FLOAT_WEIGHTS
    if target.exists():
        held, new = (start_digest(torch.load(path, weights_only=True))
                     for path in (target, source))
        if held != new:
            raise ValueError(f"{into} already holds another float start (digest {held}, the "
                             f"kept run's is {new}); choose an empty directory")
    into.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    shutil.copyfile(run.directory / "float.json", into / "float.json")
    return target
