"""Specification of tools/fine_tune_cifar10 on a generated CIFAR-shaped archive (no data
needed)."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import torch

import msq_fx
from conftest import load_tool, write_cifar_like
from msq_fx.fidelity.run import FLOAT_WEIGHTS

TOOL_PATH = Path(__file__).resolve().parents[1] / "tools" / "fine_tune_cifar10"


def test_the_tool_fine_tunes_the_float_start_and_records_a_converted_exact_result(tmp_path):
    archive = write_cifar_like(tmp_path / "cifar_like.npz", train=64, test=40, exact=10)
    torch.manual_seed(0)
    torch.save(msq_fx.resnet20().state_dict(), tmp_path / FLOAT_WEIGHTS)
    tool = load_tool(TOOL_PATH, "msq_fine_tune_tool")
    with contextlib.redirect_stdout(io.StringIO()):
        assert tool.main(["--data", str(archive), "--start", str(tmp_path), "--epochs", "1",
                          "--batch-size", "2", "--target", "8", "--threads", "1",
                          "--json", str(tmp_path / "result.json")]) == 0
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["converted_max_abs_diff"] == 0.0
    assert [record["epoch"] for record in result["epochs"]] == [1]
    assert set(result["epochs"][0]["metric"]) == {"test_acc", "exact_acc"}
    assert result["compression"] == result["epochs"][0]["compression"] >= 32 / 5
    assert result["command"].startswith("tools/fine_tune_cifar10 ")
    # 32 steps: one prune, at step 25, in the history.
    assert result["history"] and {record["step"] for record in result["history"]} == {25}
    assert all({"group", "hessian_trace", "bits_after"} <= set(record)
               for record in result["history"])
