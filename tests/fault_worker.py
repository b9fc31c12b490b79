"""A small, deterministic MSQ training job that tests/test_faults.py starts, kills and restarts.

    python tests/fault_worker.py RUN_DIR [--hold-after-step EPOCH:STEP]
                                         [--hold-in-save NAME:EPOCH] [--forget-rng]

It trains a conv + linear network (with BatchNorm and dropout) on generated data for
``EPOCHS`` epochs under a controller that prunes every ``PRUNE_EVERY`` optimizer steps, so
prunes fall inside epochs. After every epoch it writes, in this order and each through
``msq_fx.io.atomic_write``:

* ``model.msq``: the model converted and saved with ``msq_fx.save``;
* ``checkpoint.pt``: the epoch, the model's, optimizer's and controller's ``state_dict()`` and the
  global RNG state (data order and dropout draw from it).

Started again on the same RUN_DIR it resumes after the checkpoint's epoch. At the end it writes
``final.pt``: the model's and controller's ``state_dict()``, the bit widths and the history.

Progress goes to ``RUN_DIR/events.log``, one line per event (``step``, ``wrote``, ``hold``,
``resumed``, ``done``), flushed as it happens, so a test can wait for a point and kill the job
there. The hold options stop the job at such a point until it is killed:

* ``--hold-after-step E:S``: after optimizer step S of epoch E (counted from 1);
* ``--hold-in-save NAME:E``: inside the write of file NAME at the end of epoch E, once the
  temporary file holds the first half of the new content (what a write cut off halfway leaves
  on disk), before it would be renamed over NAME.

``--forget-rng`` resumes without restoring the RNG state (the tests show that this matters).
A held job gives up and exits with status 3 after ``HOLD_SECONDS``.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import msq_fx
import msq_fx.io
from msq_fx.data import synthetic_patterns
from msq_fx.training import train_epoch

EPOCHS = 5
BATCH = 16
SAMPLES = 64                      # 4 steps per epoch
PRUNE_EVERY = 3                   # optimizer steps: prunes at steps 3, 6, 9, ... cross epochs
HOLD_SECONDS = 120
CONFIG = msq_fx.MSQConfig(
    target_compression=7.0,
    pruning=dict(interval=PRUNE_EVERY, interval_unit="step", threshold=0.6, reg_strength=1e-3,
                 bn_recalibration_batches=1),
    hessian=dict(max_samples=4, min_samples=2))
DATA = synthetic_patterns(SAMPLES, classes=4, size=12, seed=0)
PRUNE_BATCHES = [next(synthetic_patterns(32, classes=4, size=12, seed=1).batches(32))]


class Net(nn.Module):
    """Conv-BN-ReLU, a depthwise conv, dropout and two linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.depthwise = nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6)
        self.drop = nn.Dropout(0.25)
        self.hidden = nn.Linear(6 * 6 * 6, 24)
        self.head = nn.Linear(24, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        x = self.drop(F.relu(self.depthwise(x)).flatten(1))
        return self.head(F.relu(self.hidden(x)))


class Events:
    """Appends one line per event to RUN_DIR/events.log, flushed at once."""

    def __init__(self, path: Path) -> None:
        self.file = path.open("a", buffering=1)

    def __call__(self, *words) -> None:
        self.file.write(" ".join(str(w) for w in words) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())


def hold(events: Events, *words) -> None:
    """Announce the point reached and wait there to be killed."""
    events("hold", *words)
    time.sleep(HOLD_SECONDS)
    events("gave up waiting to be killed")
    sys.exit(3)


class StepHook:
    """Passed to ``train_epoch`` as its progress bar: called after every optimizer step."""

    def __init__(self, events: Events, epoch: int, hold_at: tuple[int, int] | None) -> None:
        self.events, self.epoch, self.hold_at, self.step = events, epoch, hold_at, 0

    def update(self, count: int) -> None:
        self.step += count
        self.events("step", self.epoch, self.step)
        if self.hold_at == (self.epoch, self.step):
            hold(self.events, "after step", self.epoch, self.step)

    def set_postfix(self, **values) -> None:
        pass


def hold_inside_writes(name: str, epoch: int, events: Events, current_epoch) -> None:
    """Make ``msq_fx.io.atomic_write`` of ``name`` at ``epoch`` stop halfway through the write."""
    original = msq_fx.io.atomic_write

    def atomic_write(path, write) -> None:
        if Path(path).name != name or current_epoch() != epoch:
            return original(path, write)

        def half_written(tmp: str) -> None:
            write(tmp)
            size = os.path.getsize(tmp)
            os.truncate(tmp, size // 2)
            hold(events, "in save", Path(path).name, Path(tmp).name, size // 2, size)
        return original(path, half_written)

    msq_fx.io.atomic_write = atomic_write


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_checkpoint(path: Path, epoch: int, qmodel, optimizer, controller) -> None:
    snapshot = {"epoch": epoch, "model": qmodel.state_dict(), "optimizer": optimizer.state_dict(),
                "controller": controller.state_dict(), "rng": torch.get_rng_state()}
    msq_fx.io.atomic_write(path, lambda tmp: torch.save(snapshot, tmp))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--hold-after-step", type=lambda s: tuple(map(int, s.split(":"))))
    parser.add_argument("--hold-in-save", type=lambda s: (s.split(":")[0], int(s.split(":")[1])))
    parser.add_argument("--forget-rng", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    events = Events(args.run_dir / "events.log")
    checkpoint, saved_model = args.run_dir / "checkpoint.pt", args.run_dir / "model.msq"

    torch.manual_seed(0)
    qmodel = msq_fx.prepare(Net(), DATA.images[:2], CONFIG)
    controller = msq_fx.MSQController(qmodel)
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    first = 1
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True)
        qmodel.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        controller.load_state_dict(state["controller"])
        if not args.forget_rng:
            torch.set_rng_state(state["rng"])
        first = state["epoch"] + 1
        events("resumed after epoch", state["epoch"])

    epoch = first
    if args.hold_in_save:
        hold_inside_writes(*args.hold_in_save, events, lambda: epoch)
    for epoch in range(first, EPOCHS + 1):
        train_epoch(qmodel, DATA.batches(BATCH, shuffle=True), optimizer, controller,
                    progress=StepHook(events, epoch, args.hold_after_step),
                    prune_batches=PRUNE_BATCHES)
        controller.epoch_end(epoch, PRUNE_BATCHES, F.cross_entropy)
        msq_fx.save(msq_fx.convert(qmodel.eval()), saved_model)
        qmodel.train()
        events("wrote", saved_model.name, epoch, sha256(saved_model))
        write_checkpoint(checkpoint, epoch, qmodel, optimizer, controller)
        events("wrote", checkpoint.name, epoch, sha256(checkpoint))

    final = {"model": qmodel.state_dict(), "controller": controller.state_dict(),
             "bits": controller.bit_widths()}
    msq_fx.io.atomic_write(args.run_dir / "final.pt", lambda tmp: torch.save(final, tmp))
    events("done")
    events.file.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
