"""The check's verdict on the conversion: the converted model's eval outputs must reproduce the
fake-quant model's, within RELATIVE_TOLERANCE of the largest output, and be finite."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..utils import call_model, eval_mode
from ..zoo.outputs import output_tensors
from .stages import Findings, in_stage

__all__ = ["RELATIVE_TOLERANCE", "eval_outputs", "require_same_shapes", "largest_difference",
           "difference_fields", "compare"]

#: Converted and fake-quant outputs may differ by at most this fraction of the largest output.
RELATIVE_TOLERANCE = 1e-5


def eval_outputs(findings: Findings, model: nn.Module, inputs: Tensor | tuple) -> list[Tensor]:
    """Every tensor of ``model``'s eval-mode output on ``inputs``; a failure is the check's, at
    compare."""
    with in_stage(findings, "compare"), torch.no_grad(), eval_mode(model):
        return output_tensors(call_model(model, inputs))


def require_same_shapes(reference: tuple[str, list[Tensor]],
                        other: tuple[str, list[Tensor]]) -> None:
    """Raise ValueError, naming both sides (``(name, outputs)`` each) and their shapes, unless
    they hold the same number of outputs with the same shapes, at least one."""
    (reference_name, reference_outputs), (other_name, other_outputs) = reference, other
    if not reference_outputs or ([t.shape for t in reference_outputs]
                                 != [t.shape for t in other_outputs]):
        raise ValueError(f"output shapes differ: {reference_name} "
                         f"{[tuple(t.shape) for t in reference_outputs]}, {other_name} "
                         f"{[tuple(t.shape) for t in other_outputs]}")


def largest_difference(reference: list[Tensor], other: list[Tensor]) -> tuple[float, float]:
    """max |reference - other| over all outputs, and max |reference|."""
    scale = max(float(t.detach().abs().max()) for t in reference)
    diff = max(float((a.double() - b.double()).abs().max()) for a, b in zip(reference, other))
    return diff, scale


def difference_fields(diff: float, scale: float) -> dict[str, float]:
    """What a result records of a difference: the largest absolute one and its fraction of the
    largest reference output (the absolute one again when that output is zero)."""
    return {"max_abs_diff": diff, "rel_diff": diff / scale if scale > 0 else diff}


def compare(findings: Findings, fake_quant: list[Tensor], lowered: list[Tensor]) -> None:
    """Eval outputs of the converted and fake-quant models must match and be finite."""
    with in_stage(findings, "compare"):
        require_same_shapes(("fake-quant", fake_quant), ("converted", lowered))
    diff, scale = largest_difference(fake_quant, lowered)
    findings.fields.update(difference_fields(diff, scale))
    if not all(bool(torch.isfinite(t).all()) for t in fake_quant + lowered):
        findings.problem("compare", "compare: eval output is not finite")
    elif not diff <= RELATIVE_TOLERANCE * scale or math.isnan(diff):
        findings.problem("compare", f"compare: converted output differs from the fake-quant "
                                    f"output by {diff:.3g} (max |output| {scale:.3g}, allowed "
                                    f"{RELATIVE_TOLERANCE:g} of it)")
