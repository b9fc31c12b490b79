"""The check's verdict on the conversion: the converted model's eval outputs must reproduce the
fake-quant model's, within RELATIVE_TOLERANCE of the largest output, and be finite."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..utils import call_model, eval_mode
from ..zoo.outputs import output_tensors
from .stages import Findings, in_stage

__all__ = ["RELATIVE_TOLERANCE", "eval_outputs", "largest_difference", "compare"]

#: Converted and fake-quant outputs may differ by at most this fraction of the largest output.
RELATIVE_TOLERANCE = 1e-5


def eval_outputs(findings: Findings, model: nn.Module, inputs: Tensor | tuple) -> list[Tensor]:
    """Every tensor of ``model``'s eval-mode output on ``inputs``; a failure is the check's, at
    compare."""
    with in_stage(findings, "compare"), torch.no_grad(), eval_mode(model):
        return output_tensors(call_model(model, inputs))


def largest_difference(reference: list[Tensor], other: list[Tensor]) -> tuple[float, float]:
    """max |reference - other| over all outputs, and max |reference|."""
    scale = max(float(t.detach().abs().max()) for t in reference)
    diff = max(float((a.double() - b.double()).abs().max()) for a, b in zip(reference, other))
    return diff, scale


def compare(findings: Findings, fake_quant: list[Tensor], lowered: list[Tensor]) -> None:
    """Eval outputs of the converted and fake-quant models must match and be finite."""
    with in_stage(findings, "compare"):
        if not fake_quant or [t.shape for t in fake_quant] != [t.shape for t in lowered]:
            raise ValueError(f"output structures differ: fake-quant "
                             f"{[tuple(t.shape) for t in fake_quant]}, converted "
                             f"{[tuple(t.shape) for t in lowered]}")
    diff, scale = largest_difference(fake_quant, lowered)
    findings.fields.update(max_abs_diff=diff, rel_diff=diff / scale if scale > 0 else diff)
    if not all(bool(torch.isfinite(t).all()) for t in fake_quant + lowered):
        findings.problem("compare", "compare: eval output is not finite")
    elif not diff <= RELATIVE_TOLERANCE * scale or math.isnan(diff):
        findings.problem("compare", f"compare: converted output differs from the fake-quant "
                                    f"output by {diff:.3g} (max |output| {scale:.3g}, allowed "
                                    f"{RELATIVE_TOLERANCE:g} of it)")
