"""The check's ``compile`` stage (``torch_compile=True``, ``msq-fx check --compile``): the prepared
model, at the mixed widths the prune left, run through ``torch.compile``.

TorchDynamo traces its eval forward on the check's inputs and the ``aot_eager`` backend builds
the graphs as the default backend would, without generating kernels (so the stage takes
seconds and needs no C++ compiler). Its eval outputs must equal the eager fake-quant model's
within the compare stage's tolerance; graph breaks are recorded, with their first reasons, and
are not a failure: a break costs speed, not correctness.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..utils import call_model, eval_mode
from ..zoo.outputs import output_tensors
from .compare import (RELATIVE_TOLERANCE, difference_fields, largest_difference,
                      require_same_shapes)
from .stages import Findings, in_stage

__all__ = ["check_compiled", "BREAK_REASONS_KEPT"]

#: How many graph breaks a result describes (their count is always given).
BREAK_REASONS_KEPT = 3


def check_compiled(findings: Findings, qmodel: nn.Module, inputs: Tensor | tuple,
                   fake_quant: list[Tensor]) -> None:
    """Trace ``qmodel`` with TorchDynamo, run it compiled and compare its eval outputs with
    ``fake_quant`` (the eager ones); records ``compiled`` in the findings, fails the check when
    compiling raises or the outputs differ."""
    found: dict = {}
    with in_stage(findings, "compile"), torch.no_grad(), eval_mode(qmodel):
        torch._dynamo.reset()  # what another model compiled in this process must not count
        explanation = torch._dynamo.explain(call_model)(qmodel, inputs)
        found.update(graphs=explanation.graph_count, graph_breaks=explanation.graph_break_count,
                     break_reasons=[_one_line(reason) for reason in
                                    explanation.break_reasons[:BREAK_REASONS_KEPT]])
        compiled = torch.compile(qmodel, backend="aot_eager")
        outputs = output_tensors(call_model(compiled, inputs))
        torch._dynamo.reset()
        require_same_shapes(("eager", fake_quant), ("compiled", outputs))
    diff, scale = largest_difference(fake_quant, outputs)
    found.update(difference_fields(diff, scale))
    findings.fields["compiled"] = found
    if not diff <= RELATIVE_TOLERANCE * scale:
        findings.problem("compile", f"compile: the compiled model's output differs from the "
                                    f"eager one by {diff:.3g} (max |output| {scale:.3g}, allowed "
                                    f"{RELATIVE_TOLERANCE:g} of it)")


def _one_line(reason) -> str:
    """A graph break as "what broke (file:line of the user code)"."""
    text = str(reason.reason).strip().splitlines()[0]
    frame = reason.user_stack[-1] if reason.user_stack else None
    return f"{text} ({frame.filename}:{frame.lineno})" if frame else text
