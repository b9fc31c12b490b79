"""The examples in the docstrings of the public entry points run as written."""
from __future__ import annotations

import doctest
import importlib

import pytest
import torch

#: The modules of prepare / convert, MSQController, save / load, report, export_onnx and
#: check_model / assert_quantizes, fine_tune.
MODULES = ("msq_fx.api", "msq_fx.controller", "msq_fx.io", "msq_fx.report", "msq_fx.onnx_export",
           "msq_fx.check.entry", "msq_fx.fine_tune")


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    with torch.random.fork_rng():  # the examples seed the global generator
        result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
