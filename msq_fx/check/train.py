"""The check's training steps: a few SGD steps on task loss + LSB regularization, each
parameter stepped inside the backward pass, and the verdict on a failure there (the model's own
when the float model fails the same way eagerly)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from ..controller import MSQController
from ..utils import call_model, is_out_of_memory
from ..zoo.errors import describe_error
from ..zoo.outputs import task_loss
from .inputs import input_shapes
from .result import SKIP
from .stages import Findings, StageFailed

__all__ = ["train_steps", "sgd_steps_in_backward"]


def train_steps(findings: Findings, qmodel: nn.Module, controller: MSQController,
                inputs: Tensor | tuple, targets: Tensor | None, steps: int,
                rebuild: Callable[[], nn.Module]) -> None:
    """``steps`` SGD steps on task loss + LSB regularization, in train mode.

    Each parameter takes its SGD step as soon as its gradient is complete, inside the backward
    pass, and its gradient is freed at once (``sgd_steps_in_backward``): the check never holds a
    whole gradient, which on the largest models is the difference between fitting and not.
    A failure here is a SKIP when the float model fails the same way eagerly in train mode
    (``rebuild`` gives a fresh float model to try, never the caller's own).
    """
    qmodel.train()
    try:
        with sgd_steps_in_backward(qmodel, lr=1e-3, max_norm=1.0):
            for step in range(1, steps + 1):
                # Two backward passes, because in one the regularizer's gradient of every weight
                # (its nodes run first) would wait in autograd's buffers for the task gradient
                # of the same weight: a whole gradient's memory, which the in-backward steps
                # are there to avoid. Alone, each weight's term is stepped on and dropped. The
                # regularizer is taken after the task step, at the weights that step moved.
                for name, make_loss in (("loss",
                                         lambda: task_loss(call_model(qmodel, inputs), targets)),
                                        ("LSB regularization", controller.regularization)):
                    loss = make_loss()
                    if not torch.isfinite(loss):
                        findings.problem("train", f"train: {name} is {float(loss.detach())} at "
                                                  f"step {step}")
                        raise StageFailed
                    if loss.requires_grad:
                        loss.backward()
    except StageFailed:
        raise
    except Exception as error:  # decide whose failure it is before recording it
        # Out of memory is a limit of the machine, not a property of the float model: rebuilding
        # it to try eagerly would only fail the same way and turn the finding into a SKIP.
        eager_error = None if is_out_of_memory(error) else _eager_train_error(rebuild, inputs,
                                                                              targets)
        if eager_error is not None:
            findings.problem("train", f"train: model does not run eagerly in train mode at input "
                                      f"{input_shapes(inputs)}: {eager_error}", SKIP)
        else:
            findings.problem("train", f"train: {describe_error(error)}", error=error)
        raise StageFailed from error


@contextmanager
def sgd_steps_in_backward(model: nn.Module, lr: float, max_norm: float) -> Iterator[None]:
    """Inside, a backward pass also applies ``p -= lr * clip(grad)`` to each parameter as its
    gradient lands, then drops the gradient.

    Each gradient is clipped to norm ``max_norm`` on its own (a global norm would need every
    gradient at once): the steps are there to drive gradients through the quantizers, not to
    learn, and batch-2 batch norm over 1x1 feature maps gives gradient norms of 1e6 that would
    otherwise blow the weights up. A parameter's gradient lands after every use of it in the
    pass, so no op still needs its old value.
    """
    def step(param: Tensor) -> None:
        with torch.no_grad():
            grad = param.grad
            scale = min(1.0, max_norm / (float(grad.norm()) + 1e-12))
            param.add_(grad, alpha=-lr * scale)
        param.grad = None

    params = {id(p): p for p in model.parameters() if p.requires_grad}.values()
    handles = [param.register_post_accumulate_grad_hook(step) for param in params]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for param in params:
            param.grad = None


def _eager_train_error(rebuild: Callable[[], nn.Module], inputs: Tensor | tuple,
                       targets: Tensor | None) -> str | None:
    """The error the float model raises in one train-mode step, or None if it runs."""
    try:
        model = rebuild().train()
        task_loss(call_model(model, inputs), targets).backward()
    except Exception as error:  # the float model's own failure is what we are looking for
        return describe_error(error)
    return None
