"""What to make of a zoo model's output: its main prediction, every tensor in it, the number of
classes it predicts, and the task loss a few training steps on random data can take from it."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["primary_output", "output_tensors", "task_loss", "output_classes"]


def primary_output(outputs: Any) -> Tensor:
    """The main prediction of a model output: the tensor itself, ``out`` (or the first tensor)
    of a dict, the first element of a tuple/list (Inception's and GoogLeNet's aux logits)."""
    if isinstance(outputs, Tensor):
        return outputs
    if isinstance(outputs, dict) and outputs:
        return primary_output(outputs["out"] if "out" in outputs else next(iter(outputs.values())))
    if isinstance(outputs, (tuple, list)) and outputs:
        return primary_output(outputs[0])
    raise TypeError(f"the model output ({type(outputs).__name__}) holds no tensor")


def output_tensors(outputs: Any) -> list[Tensor]:
    """Every tensor in a (nested) model output, in order."""
    if isinstance(outputs, Tensor):
        return [outputs]
    if isinstance(outputs, dict):
        return [t for value in outputs.values() for t in output_tensors(value)]
    if isinstance(outputs, (tuple, list)):
        return [t for value in outputs for t in output_tensors(value)]
    return []


def task_loss(outputs: Any, targets: Tensor | None) -> Tensor:
    """Cross-entropy of the primary output against class labels; the mean square of it for
    models whose output is not (batch, classes). A dict of scalars is a model's own losses
    (torchvision detection in train mode): their sum, labels unused."""
    if isinstance(outputs, dict) and outputs and all(
            isinstance(value, Tensor) and value.dim() == 0 for value in outputs.values()):
        return torch.stack([value.float() for value in outputs.values()]).sum()
    logits = primary_output(outputs).float()
    if targets is not None and logits.dim() == 2:
        return F.cross_entropy(logits, targets)
    return logits.pow(2).mean()


def output_classes(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """The width of the model's (batch, classes) output, from one eval forward on zeros; 1 for
    any other output (whose :func:`task_loss` ignores the labels)."""
    with torch.no_grad():
        output = primary_output(model.eval()(torch.zeros(1, *input_shape)))
    return output.shape[1] if output.dim() == 2 else 1
