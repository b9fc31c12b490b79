"""The contenders: the float model and its MSQ-prepared copies, each with its optimizer, and
the training step they all take.

One step is: zero_grad, forward (under ``torch.autocast`` when asked), the task loss
(:func:`msq_fx.zoo.task_loss`), plus the contender's regularizer if it has one (for MSQ the LSB
penalty of an :class:`msq_fx.MSQController` built on the prepared model with the config it was
prepared with, ``regularization()``: lambda times the L1 of the droppable LSBs over the groups
still pruning; for the bit-split peer BSQ's group lasso), backward, optimizer step. The peers of
``--peers`` are in :mod:`.peers`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from .. import MSQConfig, MSQController, prepare
from ..zoo import task_loss
from .workloads import Workload

__all__ = ["AUTOCAST_DTYPES", "LEARNING_RATE", "MOMENTUM", "SAVED_COPIES", "Contender",
           "build_contenders", "enable_grad_checkpointing", "sgd", "train_step"]

LEARNING_RATE = 0.01
MOMENTUM = 0.9
#: The name of the contender that saves its quantized weights for the backward pass.
SAVED_COPIES = "MSQ, weights saved"
AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Contender:
    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    regularizer: Callable[[], Tensor] | None = None
    autocast: torch.dtype | None = None  # the forward runs under torch.autocast to this dtype


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer every contender trains with."""
    return torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)


def build_contenders(workload: Workload, example: Tensor, device: torch.device,
                     compare_recompute: bool = False,
                     autocast: torch.dtype | None = None) -> list[Contender]:
    """"FP32" and "MSQ", plus :data:`SAVED_COPIES` (``recompute_quantized_weights=False``) with
    ``compare_recompute``; all in train mode on ``device``, from the same weights."""
    # prepare() copies the float model, so all start from the same weights.
    float_model = workload.model.to(device).train()
    contenders = [Contender("FP32", float_model, sgd(float_model), autocast=autocast)]
    configs = [("MSQ", MSQConfig())]
    if compare_recompute:
        configs.append((SAVED_COPIES,
                        MSQConfig(quantization=dict(recompute_quantized_weights=False))))
    for name, config in configs:
        qmodel = prepare(float_model, (example[:2],), config).train()
        controller = MSQController(qmodel, config)
        contenders.append(Contender(name, qmodel, sgd(qmodel), controller.regularization,
                                    autocast))
    return contenders


def enable_grad_checkpointing(contenders: list[Contender], spec: str) -> None:
    """Activation checkpointing in every contender; exits unless the model offers it (timm's
    ``set_grad_checkpointing``)."""
    for contender in contenders:
        if not hasattr(contender.model, "set_grad_checkpointing"):
            raise SystemExit(f"--grad-checkpointing: {spec} has no "
                             f"set_grad_checkpointing (timm models do)")
        contender.model.set_grad_checkpointing(True)


def train_step(contender: Contender, inputs: Tensor, targets: Tensor) -> None:
    contender.optimizer.zero_grad(set_to_none=True)
    with torch.autocast(inputs.device.type, dtype=contender.autocast,
                        enabled=contender.autocast is not None):
        outputs = contender.model(inputs)
    loss = task_loss(outputs, targets)
    if contender.regularizer is not None:
        loss = loss + contender.regularizer()
    loss.backward()
    contender.optimizer.step()
