"""check_model(): run the whole MSQ pipeline on one model and say whether it holds up.

The pipeline is the one a user runs, shortened to a few steps on random data:

    build -> eager forward -> trace -> prepare -> train (SGD + LSB regularization)
          -> prune (one Algorithm 1 step, Hessian included) -> convert -> compare
          [-> export:torch / export:onnx, when asked for]

A model PASSes when nothing raises, every conv / linear / attention weight is either quantized or
listed as float with a reason, and the converted integer model reproduces the fake-quant model's
eval output (max |diff| <= 1e-5 * max |output|, all finite). A model that cannot be built, or does
not run eagerly at the requested input, is a SKIP: that is a property of the model, not of the
quantization. Every other exception is a FAIL naming the stage and the error.

Models are named by a spec (``timm:NAME``, ``torchvision:NAME``, ``package.module:factory``; see
:mod:`msq_fx.zoo.specs`). A factory may return ``(model, example_inputs)`` instead of a model, for
models whose input is not one float batch of the declared size: token ids, several inputs. The
check then runs on those inputs (a tensor, or a tuple of positional tensors, each batched along
its first dimension).

The modules: :mod:`.entry` (check_model, assert_quantizes, check_config), :mod:`.result`
(CheckResult, JUnit XML), :mod:`.stages` (the bookkeeping of a run), :mod:`.pipeline` (one run),
:mod:`.inputs`, :mod:`.coverage`, :mod:`.train`, :mod:`.compare` and :mod:`.exports` (its
stages), :mod:`.memory` (the retries of a run that runs out of memory).
"""
from __future__ import annotations

from ..zoo.specs import SpecError
from .compare import RELATIVE_TOLERANCE
from .entry import assert_quantizes, check_config, check_model
from .exports import EXPORT_FORMATS, EXPORT_TOLERANCE
from .result import FAIL, PASS, SKIP, STAGES, CheckResult, junit_xml

__all__ = ["check_model", "assert_quantizes", "check_config", "CheckResult", "junit_xml",
           "SpecError", "PASS", "FAIL", "SKIP", "STAGES", "RELATIVE_TOLERANCE", "EXPORT_FORMATS",
           "EXPORT_TOLERANCE"]
