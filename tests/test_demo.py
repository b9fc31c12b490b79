"""Specification of ``msq-fx demo``, the main job the README's first command runs."""

from __future__ import annotations

import re

import pytest

from msq_fx.cli import main as cli_main


@pytest.fixture(scope="module")
def demo_output() -> str:
    import contextlib
    import io

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert cli_main(["demo", "--epochs", "2", "--train-size", "400", "--threads", "1"]) == 0
    return stdout.getvalue()


def test_demo_prints_one_line_per_epoch_with_the_compression_and_bits(demo_output):
    epochs = [line for line in demo_output.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 2
    assert all(re.search(r"compression \d+\.\d+x, bits \[[\d ]+\]", line) for line in epochs)


def test_demo_converted_model_equals_the_fake_quant_model(demo_output):
    assert "max |converted - fake-quant| = 0\n" in demo_output


def test_demo_reports_the_packed_file_and_the_onnx_export(demo_output):
    assert "msq_fx.save: quantized weights take" in demo_output
    onnx_line = next(line for line in demo_output.splitlines()
                     if line.startswith("msq_fx.export_onnx:"))
    assert float(onnx_line.rsplit("max |diff| ", 1)[1]) < 1e-5
