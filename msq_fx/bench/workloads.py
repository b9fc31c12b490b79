"""What is benchmarked: a model with its per-sample input shape and class count, and the one
random batch every contender trains on (fixed seed, so no dataset is needed)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import resnet20
from ..zoo import built_from_spec, normalize_input_size, output_classes

__all__ = ["SEED", "Workload", "build_workload", "random_batch"]

#: Seeds the batch and torch's global generator (the float model's initial weights).
SEED = 0


@dataclass(frozen=True)
class Workload:
    model: nn.Module
    input_shape: tuple[int, ...]
    num_classes: int


def build_workload(spec: str, input_size: tuple[int, ...] | None = None) -> Workload:
    """``resnet20`` (CIFAR shapes), ``torchvision:NAME`` (3x224x224, 1000 classes) or any
    ``msq-fx check`` SPEC, built as the check builds it, each at ``input_size`` if given, else at
    the size named here or the size it declares.

    A SPEC that names nothing, or a model that declares no input size when none is given, exits
    with the reason (SystemExit), as a command line does.
    """
    if spec == "resnet20":
        return Workload(resnet20(num_classes=10),
                        normalize_input_size(input_size, (3, 32, 32)), 10)
    if spec.startswith("torchvision:"):
        # The full 1000-class head, at 224 unless told, as the figures in docs/benchmarks.md
        # were measured.
        import torchvision

        name = spec.split(":", 1)[1]
        return Workload(torchvision.models.get_model(name, weights=None),
                        normalize_input_size(input_size, (3, 224, 224)), 1000)
    try:
        model, shape = built_from_spec(spec, input_size)
    except ValueError as error:  # SpecError too: a SPEC that names nothing
        raise SystemExit(f"--model: {error}") from error
    return Workload(model, shape, output_classes(model, shape))


def random_batch(batch_size: int, workload: Workload,
                 device: torch.device) -> tuple[Tensor, Tensor]:
    """Normal inputs and uniform class targets, the same for every run with the same shapes."""
    generator = torch.Generator().manual_seed(SEED)
    inputs = torch.randn(batch_size, *workload.input_shape, generator=generator)
    targets = torch.randint(workload.num_classes, (batch_size,), generator=generator)
    return inputs.to(device), targets.to(device)
