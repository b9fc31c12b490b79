"""The inputs a check runs on: the example inputs a factory or the caller gives, else a random
batch of the requested or declared size, cut to one sample for the batch-1 retry; and random
labels for the classes the model predicts."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..utils import call_model, eval_mode
from ..zoo.outputs import primary_output
from ..zoo.specs import ModelSpec, input_size_of_module, normalize_input_size
from .result import SKIP
from .stages import Findings, in_stage

__all__ = ["first_rows", "input_shapes", "model_and_inputs", "inputs_to_check", "random_labels"]


def first_rows(inputs: Tensor | tuple, count: int = 1) -> Tensor | tuple:
    """The first ``count`` samples of every input."""
    if isinstance(inputs, tuple):
        return tuple(first_rows(value, count) for value in inputs)
    return inputs[:count]


def input_shapes(inputs: Tensor | tuple, per_sample: bool = False) -> tuple:
    """The shape of the inputs: a tensor's, or a tuple of them; ``per_sample`` drops the batch
    dimension."""
    start = 1 if per_sample else 0
    if isinstance(inputs, tuple):
        return tuple(tuple(value.shape[start:]) for value in inputs)
    return tuple(inputs.shape[start:])


def model_and_inputs(built: Any, name: str) -> tuple[nn.Module, Tensor | tuple | None]:
    """Split what a spec built into the model and its example inputs (None when it gave none).
    TypeError, naming the spec, when it is neither a module nor ``(module, example_inputs)``
    with batched tensor inputs."""
    if isinstance(built, nn.Module):
        return built, None
    if isinstance(built, tuple) and len(built) == 2 and isinstance(built[0], nn.Module):
        model, inputs = built
        tensors = inputs if isinstance(inputs, tuple) else (inputs,)
        if tensors and all(isinstance(t, Tensor) and t.dim() >= 1 for t in tensors) and len(
                {t.shape[0] for t in tensors}) == 1:
            return model, inputs
        raise TypeError(f"{name}: the example inputs must be a tensor or a tuple of tensors "
                        f"with the same batch size along their first dimension; got "
                        f"{_describe_value(inputs)}")
    raise TypeError(f"{name}: expected an nn.Module or a (nn.Module, example_inputs) pair, got "
                    f"{_describe_value(built)}")


def _describe_value(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of ({', '.join(_describe_value(v) for v in value)})"
    return f"a {type(value).__name__}"


def inputs_to_check(findings: Findings, spec: ModelSpec | None, model: nn.Module,
                    input_size: Any, batch_size: int, generator: torch.Generator,
                    given: Tensor | tuple | None) -> Tensor | tuple:
    """The batch to check with: the given example inputs (their first sample at batch 1), else
    a random one of the requested or declared size."""
    if given is None:
        shape = _input_shape(findings, spec, model, input_size)
        return torch.randn((batch_size, *shape), generator=generator)
    if input_size is not None:
        findings.fields["note"] = (f"input_size {input_size} not used: the factory gave its own "
                                   f"example inputs")
    inputs = first_rows(given) if batch_size == 1 else given
    findings.fields["input_size"] = input_shapes(inputs, per_sample=True)
    findings.fields["batch_size"] = len(_first_tensor(inputs))
    return inputs


def _input_shape(findings: Findings, spec: ModelSpec | None, model: nn.Module,
                 input_size: Any) -> tuple[int, ...]:
    """The per-sample input shape: the requested one, else the one the model declares."""
    default = spec.default_input_size(model) if spec else input_size_of_module(model)
    shape = normalize_input_size(input_size, default)
    if shape is None:
        raise ValueError(f"{findings.name} declares no input size (no pretrained_cfg / "
                         f"default_cfg 'input_size'); pass input_size (--input-size on the "
                         f"command line)")
    findings.fields["input_size"] = shape
    return shape


def random_labels(findings: Findings, model: nn.Module, inputs: Tensor | tuple,
                  generator: torch.Generator) -> Tensor | None:
    """Random labels for the classes the model predicts (None when its output is not (batch,
    classes): one row per sample). Runs the model once in eval mode on ``inputs``: a model
    that fails here is a SKIP."""
    with in_stage(findings, "forward", SKIP,
                  f"model does not run eagerly at input {input_shapes(inputs)}: "):
        with torch.no_grad(), eval_mode(model):
            logits = primary_output(call_model(model, inputs))
    batch_size = len(_first_tensor(inputs))
    if logits.dim() != 2 or logits.shape[0] != batch_size:  # e.g. a detector's boxes
        return None
    return torch.randint(0, logits.shape[1], (batch_size,), generator=generator)


def _first_tensor(inputs: Tensor | tuple) -> Tensor:
    return inputs[0] if isinstance(inputs, tuple) else inputs
