"""Quantize a trained network in one call: ``msq_fx.fine_tune``.

The recipe is the one measured in docs/fidelity.md: ``MSQConfig.fine_tuning(target)`` (a start
one bit above the target's uniform width, a prune every 25 optimizer steps on a few fixed
batches, learned per-channel scales), SGD with momentum, the learning rate annealed by a cosine
to zero over the whole budget, a few epochs. It is the loop a user would otherwise write around
``prepare``, ``MSQController.step_end`` and ``epoch_end``, with a checkpoint per epoch to resume
from after a crash.
"""
from __future__ import annotations

import dataclasses
import itertools
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .api import prepare
from .config import MSQConfig, _is_int, _is_number
from .controller import MSQController
from .io import atomic_write
from .training import cosine_schedule, train_epoch
from .utils import is_distributed

__all__ = ["FineTuneConfig", "FineTuned", "fine_tune"]


@dataclass(frozen=True)
class FineTuneConfig:
    """The budget and optimizer of :func:`fine_tune` (the defaults are the measured ones:
    CIFAR-10 ResNet-20 from a trained float model, docs/fidelity.md).

    Attributes:
        epochs: passes over the training batches.
        lr: the peak learning rate of SGD, annealed by a cosine to zero at the last step.
        momentum, weight_decay: SGD's.
        warmup_steps: optimizer steps of linear warm-up before the cosine (0: none).
        prune_batches: how many of the first training batches every prune reads (Hessian
            traces, BatchNorm re-estimation, the measured finish); taken once and kept, so
            the decisions do not follow the data order.
        compile: run the training forward through ``torch.compile`` (one graph; a prune that
            changes a width traces it again).
    """

    epochs: int = 3
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = 0
    prune_batches: int = 4
    compile: bool = False

    def __post_init__(self) -> None:
        counts = {"epochs": 1, "warmup_steps": 0, "prune_batches": 1}  # name: least value
        for name, least in counts.items():
            value = getattr(self, name)
            _require(_is_int(value) and value >= least,
                     name, value, f"an int >= {least}")
        rates = {"lr": (lambda v: v > 0, "a number > 0"),
                 "momentum": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
                 "weight_decay": (lambda v: v >= 0, "a number >= 0")}
        for name, (in_range, expected) in rates.items():
            value = getattr(self, name)
            _require(_is_number(value) and in_range(value), name, value, expected)
        _require(isinstance(self.compile, bool), "compile", self.compile, "True or False")


def _require(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise ValueError(f"FineTuneConfig.{name}={value!r} is invalid: expected {expected}.")


@dataclass
class FineTuned:
    """What :func:`fine_tune` returns.

    Attributes:
        model: the prepared model, trained (fake-quantized weights); ``msq_fx.convert(model)``
            lowers it to integer codes with the same outputs.
        controller: its MSQ controller (bit widths, compression, ``history_table()``).
        epochs: one record per epoch: ``epoch``, mean training ``loss``, ``compression``,
            ``bits`` (per group), and ``metric`` where an ``evaluate`` function was given.
        target_step: the optimizer step at which the target compression was reached (None if
            it was not, also when pruning stopped short of it because no layer could lose
            more bits).
    """

    model: nn.Module
    controller: MSQController
    epochs: list[dict[str, Any]] = field(default_factory=list)
    target_step: int | None = None


def fine_tune(model: nn.Module, example_inputs: Any, train_batches: Iterable,
              target: float | None = None, *, config: MSQConfig | None = None,
              schedule: FineTuneConfig = FineTuneConfig(),
              loss_fn: Callable[[Any, Tensor], Tensor] = F.cross_entropy,
              evaluate: Callable[[nn.Module], Any] | None = None,
              checkpoint: str | Path | None = None,
              make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
              wrap_model: Callable[[nn.Module], nn.Module] | None = None) -> FineTuned:
    """Quantize a trained ``model`` with MSQ in a few epochs of training.

    ``model`` is prepared on a copy (it is not changed) with ``MSQConfig.fine_tuning(target)``,
    or with ``config``, and trained by SGD on ``train_batches`` for ``schedule.epochs``, the
    prunes due after every optimizer step (``interval_unit="step"``) or epoch taking the first
    ``schedule.prune_batches`` batches. Under ``torch.distributed`` every rank calls it with
    its own batches and ``wrap_model`` (DistributedDataParallel): the Hessian traces are
    averaged across ranks, so every rank makes the same decisions, and rank 0 alone writes
    the checkpoint.

    Args:
        model: a trained float model.
        example_inputs: as for :func:`msq_fx.prepare`.
        train_batches: ``(inputs, targets)`` pairs on the model's device, iterated once per
            epoch: a DataLoader or a list, not a one-shot iterator; ``len()`` must give the
            batches per epoch (the cosine runs over the whole budget).
        target: the compression to reach (8.0 for 4 bits on average); give it or ``config``.
        config: the full MSQ configuration, in place of the preset for ``target``.
        schedule: the budget and the optimizer.
        loss_fn: ``loss_fn(model(inputs), targets)``, the task loss.
        evaluate: called with the model after each epoch (in train mode; switch it as you
            need); what it returns is kept in that epoch's record as ``metric``, as plain
            data (tensors and NumPy values become numbers or lists, named tuples dicts).
        checkpoint: a file written after each epoch (model, optimizer, schedule, controller,
            and the random state of torch, Python and NumPy, which dropout, a shuffling
            DataLoader and augmentations draw from); if it exists, training resumes from it
            after the last epoch it holds, and ends as an uninterrupted run would. Refused if
            it was written with other settings. Under ``torch.distributed`` it must be on a
            file system every rank reads (rank 0 writes it; each rank's random state is in it).
        make_optimizer: builds the optimizer from the prepared model's parameters (latent
            weights, learned scales and the rest), in place of SGD with ``schedule``'s lr,
            momentum and weight decay; its learning rates are the peaks the cosine anneals
            (for example ``lambda params: torch.optim.AdamW(params, lr=1e-4)``; the
            recipe's SGD settings were measured on a CNN only).
        wrap_model: wraps the prepared model for training, e.g.
            ``lambda m: DistributedDataParallel(m)``; required under ``torch.distributed``,
            where ranks would otherwise train apart. ``FineTuned.model`` stays the unwrapped
            prepared model.

    Returns:
        A :class:`FineTuned`: the trained prepared model, its controller, the epoch records.

    Example:
        >>> import torch, msq_fx
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(288, 10))
        >>> batches = [(torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,)))] * 4
        >>> config = msq_fx.MSQConfig.fine_tuning(8.0, pruning={"interval": 2, "threshold": 1.0})
        >>> tuned = msq_fx.fine_tune(net, batches[0][0], batches, config=config,
        ...                          schedule=msq_fx.FineTuneConfig(epochs=2))
        >>> tuned.controller.done, tuned.target_step, tuned.epochs[-1]["compression"]
        (True, 2, 8.0)
        >>> int_model = msq_fx.convert(tuned.model)
    """
    config = _config_for(target, config)
    steps_per_epoch = _batches_per_epoch(train_batches)
    if wrap_model is None and is_distributed():
        raise ValueError("fine_tune: torch.distributed is initialized but wrap_model is not "
                         "given, so each rank would train its own copy; pass wrap_model="
                         "lambda m: torch.nn.parallel.DistributedDataParallel(m)")
    prune_batches = list(itertools.islice(train_batches, schedule.prune_batches))
    qmodel = prepare(model, example_inputs, config)
    controller = MSQController(qmodel, config)
    optimizer = (torch.optim.SGD(qmodel.parameters(), lr=schedule.lr,
                                 momentum=schedule.momentum, weight_decay=schedule.weight_decay)
                 if make_optimizer is None else _made_optimizer(make_optimizer, qmodel))
    scheduler = cosine_schedule(optimizer, schedule.epochs * steps_per_epoch,
                                warmup_steps=schedule.warmup_steps)
    result = FineTuned(qmodel, controller, target_step=0 if controller.done else None)
    # What a resumed run must share with the run that wrote the checkpoint. Compiling is left
    # out: a run stopped eagerly may continue compiled, and the other way round.
    budget = {key: value for key, value in dataclasses.asdict(schedule).items()
              if key != "compile"}
    settings = {"config": config.to_dict(), "schedule": budget,
                "steps_per_epoch": steps_per_epoch,
                # SGD's settings are the schedule's; a user's optimizer records its own.
                "optimizer": "sgd" if make_optimizer is None else _optimizer_settings(optimizer)}
    path = None if checkpoint is None else Path(checkpoint)

    def save() -> None:
        if path is not None:
            rng = _gathered(_rng_state())  # every rank takes part; rank 0 writes
            if _rank() == 0:
                _save(path, settings, qmodel, optimizer, scheduler, controller, result, rng)

    def score_last_epoch() -> None:
        # The training state is saved before ``evaluate`` runs, so a failing evaluation loses
        # no training; a resumed run scores the epoch it was missing (the model is as that
        # epoch left it).
        if evaluate is not None and "metric" not in result.epochs[-1]:
            result.epochs[-1]["metric"] = _plain(evaluate(qmodel))
            qmodel.train()
            save()

    if path is not None and _checkpoint_exists(path):
        _resume(path, settings, qmodel, optimizer, scheduler, controller, result)
        if result.epochs:
            score_last_epoch()
    runner = qmodel if wrap_model is None else wrap_model(qmodel)
    runner = torch.compile(runner, dynamic=False) if schedule.compile else runner
    for epoch in range(len(result.epochs) + 1, schedule.epochs + 1):
        loss = train_epoch(runner, train_batches, optimizer, controller, loss_fn, scheduler,
                           prune_batches=prune_batches)
        controller.epoch_end(epoch, prune_batches, loss_fn)
        if result.target_step is None \
                and controller.compression() >= config.target_compression:
            result.target_step = _target_step(controller, epoch * steps_per_epoch)
        result.epochs.append({"epoch": epoch, "loss": loss,
                              "compression": controller.compression(),
                              "bits": controller.bit_widths()})
        save()
        score_last_epoch()
    return result


def _target_step(controller: MSQController, epoch_end_step: int) -> int:
    """The optimizer step of the prune that reached the target: the last that lowered a
    width. A prune counted in epochs runs after the epoch's last step, ``epoch_end_step``."""
    last = next(record for record in reversed(controller.history) if record.lsbs_dropped > 0)
    return last.step or epoch_end_step


def _rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def _gathered(value: Any) -> list:
    """``value`` of every rank, in rank order (``[value]`` outside torch.distributed)."""
    if not is_distributed():
        return [value]
    values: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(values, value)
    return values


def _checkpoint_exists(path: Path) -> bool:
    """Whether to resume from ``path``; under torch.distributed every rank must see the same
    answer, or the ranks would start from different epochs and wait on each other."""
    seen = _gathered(path.exists())
    if any(seen) and not all(seen):
        missing = [rank for rank, there in enumerate(seen) if not there]
        raise ValueError(f"fine_tune: the checkpoint {path} exists on some ranks and not on "
                         f"rank(s) {', '.join(map(str, missing))}; rank 0 writes it and every "
                         f"rank resumes from it, so put it on a file system all ranks share")
    return seen[0]


def _rng_state() -> dict[str, Any]:
    """The random state the rest of a run draws from (dropout, a shuffling DataLoader,
    augmentations), as data a checkpoint loads with ``weights_only=True``."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        kind, keys, position, has_gauss, cached = numpy.random.get_state()
        state["numpy"] = (kind, keys.tolist(), position, has_gauss, cached)
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy
        kind, keys, position, has_gauss, cached = state["numpy"]
        numpy.random.set_state((kind, numpy.array(keys, dtype=numpy.uint32), position,
                                has_gauss, cached))


def _made_optimizer(make_optimizer: Callable, qmodel: nn.Module) -> torch.optim.Optimizer:
    optimizer = make_optimizer(list(qmodel.parameters()))
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"fine_tune: make_optimizer returned {type(optimizer).__name__}, not a "
                        f"torch.optim.Optimizer; return one built on the parameters it is given")
    return optimizer


def _optimizer_settings(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's kind and hyperparameters (its groups without their parameters), as
    plain data: a checkpoint resumes only under the same."""
    groups = [{key: _plain(value) for key, value in group.items() if key != "params"}
              for group in optimizer.param_groups]
    return {"kind": type(optimizer).__name__,
            "groups": [{key: value for key, value in group.items()
                        if value is None or isinstance(value, (bool, int, float, str, list, tuple))}
                       for group in groups]}


def _plain(value: Any) -> Any:
    """``value`` as plain data (tensors and NumPy values as numbers or lists, inside dicts,
    lists and tuples too), so the checkpoint loads with ``weights_only=True``."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_asdict"):  # a named tuple
        return _plain(dict(value._asdict()))
    if isinstance(value, (list, tuple)):
        return (list if isinstance(value, list) else tuple)(_plain(item) for item in value)
    if isinstance(value, torch.Tensor) or type(value).__module__ == "numpy":
        return value.tolist() if hasattr(value, "tolist") else value
    return value


def _config_for(target: float | None, config: MSQConfig | None) -> MSQConfig:
    if target is not None and config is not None:
        raise ValueError("fine_tune: give target (the fine-tuning preset for it) or config, "
                         "not both")
    if config is not None:
        if not isinstance(config, MSQConfig):
            raise TypeError(f"fine_tune: config must be an MSQConfig, got "
                            f"{type(config).__name__}")
        return config
    return MSQConfig.fine_tuning(8.0 if target is None else target)


def _batches_per_epoch(train_batches: Iterable) -> int:
    if iter(train_batches) is train_batches:
        raise ValueError("fine_tune: train_batches is a one-shot iterator, which would be empty "
                         "after the first epoch; pass something iterated afresh each epoch (a "
                         "DataLoader, a list of (inputs, targets) batches)")
    try:
        count = len(train_batches)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"fine_tune: train_batches ({type(train_batches).__name__}) has no "
                         f"len(), which the learning-rate schedule needs to span the whole "
                         f"budget; pass a DataLoader or a list") from None
    if count < 1:
        raise ValueError("fine_tune: train_batches is empty")
    return count


def _save(path: Path, settings: dict, qmodel: nn.Module, optimizer, scheduler,
          controller: MSQController, result: FineTuned, rng: list[dict[str, Any]]) -> None:
    snapshot = {"settings": settings, "model": qmodel.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "controller": controller.state_dict(), "epochs": result.epochs,
                "target_step": result.target_step, "rng": rng}
    # A crash while writing leaves the previous epoch's checkpoint whole.
    atomic_write(path, lambda tmp: torch.save(snapshot, tmp))


def _resume(path: Path, settings: dict, qmodel: nn.Module, optimizer, scheduler,
            controller: MSQController, result: FineTuned) -> None:
    saved = torch.load(path, weights_only=True)
    if saved["settings"] != settings:
        differing = sorted(key for key in settings if saved["settings"].get(key) != settings[key])
        raise ValueError(f"fine_tune: {path} was written by a run with other settings (what "
                         f"differs: {', '.join(differing)}); give the same ones to resume it, "
                         f"or another checkpoint path to start afresh")
    qmodel.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    controller.load_state_dict(saved["controller"])
    result.epochs[:] = saved["epochs"]
    result.target_step = saved["target_step"]
    rng = saved.get("rng", [])  # one per rank; ranks beyond those saved keep their own
    if _rank() < len(rng):
        _set_rng_state(rng[_rank()])
