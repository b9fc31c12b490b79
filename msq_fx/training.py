"""A minimal MSQ training loop shared by the CLI demo, the worked examples and the checks."""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .controller import MSQController
from .utils import eval_mode
from .weight_cache import cached_quantized_weights

__all__ = ["train_epoch", "accuracy", "cosine_schedule", "distillation_loss"]


def train_epoch(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]],
                optimizer: torch.optim.Optimizer, controller: MSQController | None = None,
                loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
                scheduler=None, progress=None, prune_batches: list | None = None) -> float:
    """One epoch of (MSQ) training: task loss + the controller's LSB regularization.

    With ``pruning.interval_unit="step"`` the controller's ``step_end`` runs after every
    optimizer step, its prunes taking the Hessian (and BN statistics) on ``prune_batches``
    (default: the step's own batch). Returns the mean task loss. ``progress`` is an optional
    tqdm bar advanced per batch.
    """
    counts_steps = controller is not None and controller.config.pruning.interval_unit == "step"
    model.train()
    total, count = 0.0, 0
    for inputs, targets in batches:
        task_loss = loss_fn(model(inputs), targets)
        loss = task_loss if controller is None else task_loss + controller.regularization()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if counts_steps and not controller.done:
            controller.step_end(controller.last_step + 1, prune_batches or [(inputs, targets)],
                                loss_fn)
            model.train()
        total += task_loss.item() * len(targets)
        count += len(targets)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{task_loss.item():.3f}")
    return total / max(count, 1)


@torch.no_grad()
def accuracy(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]]) -> float:
    """Top-1 accuracy in percent, in eval mode (the mode is restored afterwards).

    Each quantized weight is computed once for all batches, not once per batch.
    """
    correct = total = 0
    with eval_mode(model), cached_quantized_weights(model):
        for inputs, targets in batches:
            correct += int((model(inputs).argmax(1) == targets).sum())
            total += len(targets)
    return 100.0 * correct / max(total, 1)


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int,
                    warmup_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine annealing to zero (the paper's 'warm-start cosine')."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor,
                      temperature: float = 1.0) -> Tensor:
    """KL(teacher || student) of the two softened class distributions, times ``temperature``^2.

    The usual distillation term for fine-tuning a quantized model from its own float weights:
    the float model (the teacher, its logits detached here) gives a target for every class,
    not only the label. Scaling by ``temperature``^2 keeps the gradient's size independent of
    the temperature (Hinton et al., 2015). Averaged over the batch; 0 where the two agree.
    """
    if temperature <= 0:
        raise ValueError(f"distillation temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape: give both models the "
                         f"same batch")
    student = F.log_softmax(student_logits / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.detach() / temperature, dim=-1)
    return F.kl_div(student, teacher, reduction="batchmean", log_target=True) * temperature ** 2
