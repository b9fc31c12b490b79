"""One fidelity row: fine-tune from the float ResNet-20, checkpoint every epoch, resume.

In one environment a run is a function of (row, float weights, data, settings): data order
and augmentation are seeded per epoch, so a resumed run takes the same steps as an
uninterrupted one. Across environments it need not be: re-run at another time with the same
command and code, a 15-epoch uniform 2-bit row reached 70.13% after epoch 1 against 69.66%,
and 3-epoch rows with the same decisions ended 0.5-0.9 points apart, most likely from CPU
kernels that round differently (1e-8 on an output, measured between two CPUs), which
thousands of steps grow into another run. So each result records the environment it ran in.
Its result goes to ``<out>/rows/<row>.json`` (read by :mod:`msq_fx.fidelity.table`).
"""
from __future__ import annotations

import hashlib
import json
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Any
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..api import convert
from ..data import TensorDataset, load_npz, random_crop_flip
from ..io import atomic_write
from ..models import resnet20
from ..training import accuracy, cosine_schedule, distillation_loss
from .rows import ROWS, build_row, result_stem

__all__ = ["Settings", "run_row", "run_environment", "float_weights", "start_digest",
           "FLOAT_WEIGHTS"]

#: The float ResNet-20 every row starts from (state_dict only), and the training checkpoint it
#: is taken from while that training is unfinished.
FLOAT_WEIGHTS = "resnet20_float.pt"
FLOAT_CHECKPOINT = "float.pt"


@dataclass(frozen=True)
class Settings:
    """What every row shares: the budget and the data."""

    data: Path
    out: Path
    epochs: int = 3  # 1,173 steps: every row of the table runs in 10-15 min on one thread
    batch_size: int = 128
    lr: float = 0.01
    weight_decay: float = 1e-4
    train_size: int = 50000
    calibration_batches: int = 4
    channels_last: bool = True
    scale: str = "channel"  # the msq_fx rows' quantization.scale
    seed: int = 0
    #: (field, value) pairs that replace the MSQ rows' PruningConfig fields (``--pruning``).
    pruning: tuple[tuple[str, Any], ...] = ()
    #: Weight of the distillation term from the float start (``--distill``): every row's
    #: loss is (1 - distill) * cross-entropy + distill * KL(float start || model). 0: none.
    distill: float = 0.0
    distill_temperature: float = 1.0
    #: Train and score through torch.compile (``--compile``). Like the thread count it is not a
    #: result setting (a run may be continued either way); the result's environment says it.
    compile: bool = False

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr is the peak learning rate, > 0; got {self.lr}")
        if not 0.0 <= self.distill <= 1.0:
            raise ValueError(f"distill is the distillation term's weight, in [0, 1]; got "
                             f"{self.distill}")
        if self.distill_temperature <= 0:
            raise ValueError(f"distill_temperature must be > 0, got {self.distill_temperature}")

    def result_settings(self) -> dict:
        # Without distillation its two fields are left out, so checkpoints written before
        # they existed still resume.
        skipped = {"out", "compile"} | ({"distill", "distill_temperature"} if not self.distill
                                        else set())
        return {k: str(v) for k, v in asdict(self).items() if k not in skipped}


def float_weights(out: Path) -> dict:
    """The float start: ``<out>/resnet20_float.pt``, else the model of ``<out>/float.pt``."""
    final, checkpoint = out / FLOAT_WEIGHTS, out / FLOAT_CHECKPOINT
    if final.exists():
        return torch.load(final, weights_only=True)
    if checkpoint.exists():
        return torch.load(checkpoint, weights_only=False)["model"]
    raise SystemExit(f"no float ResNet-20 in {out}: train it first with "
                     f"`tools/cifar10_resnet20 --run float --epochs 100 --threads 1 --out {out}`")


def start_digest(weights: dict) -> str:
    """A name for the float start ``weights`` (a state_dict): the first 16 hex digits of a
    SHA-256 over every entry's name, dtype, shape and values, in key order. It names the
    values, not a file, so a copy or a re-save of the same weights has the same digest."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        tensor = weights[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _datasets(settings: Settings):
    train = load_npz(settings.data, "train").subset(settings.train_size)
    test = load_npz(settings.data, "test")
    with np.load(settings.data) as archive:
        exact = torch.from_numpy(archive["test_exact"]) if "test_exact" in archive else None
    exact_set = None if exact is None else TensorDataset(test.images[exact], test.labels[exact])
    return train, test, exact_set


def _in_format(images: torch.Tensor, settings: Settings) -> torch.Tensor:
    return images.contiguous(memory_format=torch.channels_last) if settings.channels_last \
        else images


def run_row(name: str, settings: Settings, command: str | None = None) -> dict:
    """Train row ``name`` to the end of the budget (resuming its checkpoint) and return its
    result, also written to ``<out>/rows/<name>.json`` (``<name>.seed<N>.json`` for a seed other
    than 0)."""
    spec = ROWS[name]
    if spec.method == "msq" and settings.pruning:
        spec = replace(spec, pruning={**spec.pruning, **dict(settings.pruning)})
    train, test, exact_set = _datasets(settings)
    calibration = [(_in_format(x, settings), y) for x, y in
                   train.subset(settings.calibration_batches * settings.batch_size)
                   .batches(settings.batch_size)]
    float_start = float_weights(settings.out)
    digest = start_digest(float_start)
    built = build_row(spec, float_start, train.images[:2], calibration,
                      settings.seed, scale=settings.scale)
    model, controller = built.model, built.controller
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
    teacher = _teacher(float_start, settings) if settings.distill else None
    steps_per_epoch = -(-len(train) // settings.batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=0.9,
                                weight_decay=settings.weight_decay)
    scheduler = cosine_schedule(optimizer, settings.epochs * steps_per_epoch)
    rows_dir = settings.out / "rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    stem = result_stem(name, settings.seed)
    checkpoint = rows_dir / f"{stem}.pt"
    state = {"epochs": [], "target_step": 0 if controller is None or controller.done else None,
             "seconds": 0.0, "float_start": digest}
    if checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=False)
        if saved["settings"] != settings.result_settings():
            raise SystemExit(f"{checkpoint}: written with other settings ({saved['settings']}); "
                             f"use them to continue, or delete it to start afresh")
        # A checkpoint written before runs recorded their start has none to compare.
        if saved["state"].get("float_start", digest) != digest:
            raise SystemExit(f"{checkpoint}: started from another float start (digest "
                             f"{saved['state']['float_start']}; {settings.out} now holds "
                             f"{digest}); put that start back to continue, or delete the "
                             f"checkpoint to start afresh from this one")
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if controller is not None:
            controller.load_state_dict(saved["controller"])
        state = saved["state"]
    # One graph per batch shape; a prune that changes a width traces it again.
    runner = torch.compile(model, dynamic=False) if settings.compile else model
    for epoch in range(len(state["epochs"]) + 1, settings.epochs + 1):
        start = time.perf_counter()
        loss = _train_epoch(runner, controller, train, settings, epoch, steps_per_epoch,
                            optimizer, scheduler, calibration, state, teacher)
        row = {"epoch": epoch, "loss": loss, "compression": built.compression(),
               "test_acc": accuracy(runner, test.batches(1000)),
               "exact_acc": None if exact_set is None else accuracy(runner,
                                                                     exact_set.batches(1000)),
               "seconds": time.perf_counter() - start}
        state["epochs"].append(row)
        state["seconds"] += row["seconds"]
        snapshot = {"settings": settings.result_settings(), "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "controller": None if controller is None else controller.state_dict(),
                    "state": state}
        atomic_write(checkpoint, lambda tmp: torch.save(snapshot, tmp))
        print(f"[{stem}] epoch {epoch}: loss {loss:.4f}  test {row['test_acc']:.2f}%  exact "
              f"{row['exact_acc']}%  {row['compression']:.2f}x  {row['seconds']:.0f} s",
              flush=True)
    result = _result(name, spec, model, controller, built, test, state, command, settings)
    (rows_dir / f"{stem}.json").write_text(json.dumps(result, indent=1))
    return result


def _teacher(start: dict, settings: Settings) -> torch.nn.Module:
    """The float start (its state_dict ``start``) as the distillation teacher: frozen, in eval
    mode."""
    teacher = resnet20()
    teacher.load_state_dict(start)
    if settings.channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
    return teacher.eval().requires_grad_(False)


def _row_loss(model, images, labels, teacher, settings) -> tuple[torch.Tensor, torch.Tensor]:
    """The training loss of a step and its cross-entropy (what the row reports)."""
    logits = model(images)
    task_loss = F.cross_entropy(logits, labels)
    if teacher is None:
        return task_loss, task_loss
    with torch.no_grad():
        teacher_logits = teacher(images)
    distilled = distillation_loss(logits, teacher_logits, settings.distill_temperature)
    return (1 - settings.distill) * task_loss + settings.distill * distilled, task_loss


def _train_epoch(model, controller, train, settings, epoch, steps_per_epoch, optimizer,
                 scheduler, calibration, state, teacher=None) -> float:
    model.train()
    generator = torch.Generator().manual_seed(settings.seed * 100_003 + epoch)
    total = count = 0
    for index, (images, labels) in enumerate(train.batches(settings.batch_size, shuffle=True,
                                                          generator=generator)):
        images = _in_format(random_crop_flip(images, generator), settings)
        loss, task_loss = _row_loss(model, images, labels, teacher, settings)
        if controller is not None:
            loss = loss + controller.regularization()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if controller is not None and not controller.done:
            step = (epoch - 1) * steps_per_epoch + index + 1
            controller.step_end(step, calibration, F.cross_entropy)
            if controller.done:
                state["target_step"] = step
            model.train()
        total += task_loss.item() * len(labels)
        count += len(labels)
    if controller is not None:
        controller.epoch_end(epoch, calibration, F.cross_entropy)
    return total / max(count, 1)


def _result(name, spec, model, controller, built, test, state, command, settings) -> dict:
    last = state["epochs"][-1]
    result = {"row": name, "seed": settings.seed, "method": spec.method,
              "description": spec.description,
              "scale": None if spec.method in ("brevitas", "float") else settings.scale,
              "compression": built.compression(), "test_acc": last["test_acc"],
              "exact_acc": last["exact_acc"], "target_step": state["target_step"],
              "seconds": state["seconds"], "epochs": state["epochs"],
              "command": command or " ".join(shlex.quote(a) for a in sys.argv),
              "environment": run_environment()}
    if settings.compile:  # results from before this field ran eagerly
        result["environment"]["compiled"] = True
    if "float_start" in state:
        result["float_start"] = state["float_start"]
    if settings.lr != Settings.lr:  # results from before this field have the default
        result["lr"] = settings.lr
    if settings.distill:
        result["distill"] = {"weight": settings.distill,
                             "temperature": settings.distill_temperature}
    if controller is not None:
        result["bits"] = controller.bit_widths()
        result["pruning"] = controller.config.pruning.to_dict()
        result["hessian"] = controller.config.hessian.to_dict()
        result["history"] = [asdict(record) for record in controller.history]
        model.eval()
        lowered = convert(model)
        with torch.no_grad():
            images = test.images[:256]
            result["converted_max_abs_diff"] = float((model(images) - lowered(images)).abs().max())
    return result


def run_environment() -> dict:
    """What a row's numbers depend on beyond its settings: the torch build, the CPU kernels it
    dispatched to, the thread count and the processor, as the process that finished the run
    saw them (a resumed run's earlier epochs may have run elsewhere). ``cpu`` adds the CPU's
    vendor, name, family, model and stepping and its vector-extension flags where
    /proc/cpuinfo tells them: the same torch build and capability gave runs 0.5-0.9 points
    apart with the same decisions (docs/fidelity.md), and oneDNN picks its kernels by those
    flags."""
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine(), "cpu": cpu_identity()}


def cpu_identity(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict:
    """The first CPU's vendor, name, family, model, stepping and AVX-512 / AMX / VNNI / FMA
    flags from ``cpuinfo`` ({} where there is no such file)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break  # the first processor's block ends here
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = sorted(flag for flag in fields.get("flags", "").split()
                   if flag.startswith(("avx512", "amx", "avx_vnni", "fma")))
    return {"vendor": fields.get("vendor_id"), "name": fields.get("model name"),
            "family": fields.get("cpu family"), "model": fields.get("model"),
            "stepping": fields.get("stepping"), "flags": flags}
