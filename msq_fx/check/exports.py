"""The exports a check may be asked for: ``torch.export`` of the converted model, and
``msq_fx.export_onnx`` run by ONNX Runtime; each exported model must reproduce the converted
model's outputs within its EXPORT_TOLERANCE."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..utils import eval_mode
from ..zoo.outputs import output_tensors
from .compare import (RELATIVE_TOLERANCE, difference_fields, largest_difference,
                      require_same_shapes)
from .stages import Findings, in_stage

__all__ = ["EXPORT_FORMATS", "EXPORT_TOLERANCE", "check_export", "add_export_option"]

#: What ``exports`` may ask for: ``torch.export`` of the converted model, and
#: ``msq_fx.export_onnx`` run by ONNX Runtime (float32 compute).
EXPORT_FORMATS = ("torch", "onnx")

#: An exported model's outputs may differ from the converted model's by at most this fraction of
#: the largest output. torch.export runs the same kernels; ONNX Runtime's float kernels round
#: differently, while a wrong weight moves outputs by their own order of magnitude.
EXPORT_TOLERANCE = {"torch": RELATIVE_TOLERANCE, "onnx": 1e-3}


def check_export(findings: Findings, target: str, int_model: nn.Module,
                 inputs: Tensor | tuple, converted: list[Tensor]) -> None:
    """Export ``int_model`` to ``target``, run the result on ``inputs`` and record how far its
    outputs are from ``converted``; a failure or a difference beyond EXPORT_TOLERANCE fails."""
    stage = f"export:{target}"
    found: dict[str, Any] = {}
    with in_stage(findings, stage), torch.no_grad(), eval_mode(int_model):
        if target == "torch":
            args = inputs if isinstance(inputs, tuple) else (inputs,)
            exported = output_tensors(torch.export.export(int_model, args).module()(*args))
        else:
            exported = _onnx_outputs(int_model, inputs, found)
        require_same_shapes(("converted", converted), ("exported", exported))
    diff, scale = largest_difference(converted, exported)
    found.update(difference_fields(diff, scale))
    findings.fields.setdefault("exports", {})[target] = found
    allowed = EXPORT_TOLERANCE[target]
    if not diff <= allowed * scale:
        findings.problem(stage, f"{stage}: exported output differs from the converted output by "
                                f"{diff:.3g} (max |output| {scale:.3g}, allowed {allowed:g} of it)")


def _onnx_outputs(int_model: nn.Module, inputs: Tensor | tuple,
                  found: dict[str, Any]) -> list[Tensor]:
    """``int_model`` through ``export_onnx`` and ONNX Runtime; what was written goes to
    ``found``."""
    from ..onnx_export import export_onnx, onnx_runtime_outputs  # onnx is an optional extra

    with tempfile.TemporaryDirectory() as directory:
        written = export_onnx(int_model, inputs, Path(directory) / "model.onnx")
        found.update(int4_weights=len(written.int4_weights), int8_weights=len(written.int8_weights),
                     float_weights=len(written.float_weights), file_bytes=written.file_bytes)
        return onnx_runtime_outputs(written.path, inputs)


def add_export_option(parser, help: str) -> None:
    """The repeatable ``--export torch|onnx`` option that ``msq-fx check`` and the zoo sweep share
    (``help`` says what it does in each)."""
    parser.add_argument("--export", action="append", choices=EXPORT_FORMATS, default=[],
                        help=help)
