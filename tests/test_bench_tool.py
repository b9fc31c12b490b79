"""Smoke test of tools/bench and the msq_fx.bench package behind it: it runs end to end and
reports what it promises (never timings)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

import msq_fx.bench
from msq_fx.owners import iter_quantized_weights
from conftest import load_tool

BENCH_PATH = Path(__file__).resolve().parents[1] / "tools" / "bench"
TINY_RUN = ["--batch-size", "8", "--repeats", "2", "--steps", "1", "--warmup", "1", "--json"]
CIFAR_INPUT_BYTES_PER_SAMPLE = 3 * 32 * 32 * 4


def load_bench_tool():
    return load_tool(BENCH_PATH, "msq_bench_tool")


@pytest.fixture(scope="module")
def bench():
    return msq_fx.bench


@pytest.fixture(scope="module")
def tiny_report():
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        exit_code = load_bench_tool().main(TINY_RUN)
    assert exit_code == 0
    return json.loads(stdout.getvalue())


def test_tool_is_an_executable_python_script():
    assert BENCH_PATH.read_text().startswith("#!/usr/bin/env python3\n")
    assert BENCH_PATH.stat().st_mode & 0o111


def test_tool_is_the_command_line_of_the_package():
    assert load_bench_tool().main is msq_fx.bench.main


def test_msq_penalty_leaves_out_groups_that_prune_no_further(bench):
    import torch

    workload = bench.build_workload("resnet20")
    _, msq = bench.build_contenders(workload, torch.randn(2, 3, 32, 32), torch.device("cpu"))
    first = next(iter_quantized_weights(msq.model))  # conv1, a group of its own
    with torch.no_grad():
        term = msq_fx.MSQConfig().pruning.reg_strength * first.quantizer.lsb_l1(first.latent)
        before = msq.regularizer()
        first.quantizer.bits.fill_(msq_fx.MSQConfig().quantization.min_bits)
        after = msq.regularizer()
    # MSQController.regularization: a group at min_bits has no LSB left to drop.
    assert term > 0
    assert after.item() == pytest.approx((before - term).item(), rel=1e-5)


def test_json_report_describes_the_run(tiny_report):
    assert tiny_report["model"] == "resnet20"
    assert (tiny_report["batch_size"], tiny_report["repeats"], tiny_report["steps"]) == (8, 2, 1)
    assert tiny_report["threads"] >= 1
    assert tiny_report["torch"]
    assert set(tiny_report["results"]) == {"FP32", "MSQ"}
    assert set(tiny_report["ratio_msq_over_fp"]) == {"time", "peak_memory"}


def test_each_model_has_one_time_per_repeat_and_a_peak(tiny_report):
    for result in tiny_report["results"].values():
        assert len(result["repeat_ms_per_step"]) == 2
        assert isinstance(result["median_ms_per_step"], float)
        assert isinstance(result["peak_bytes"], int)
        # The batch itself is live throughout the step, so any sound peak covers it.
        assert result["peak_bytes"] > 8 * CIFAR_INPUT_BYTES_PER_SAMPLE


def test_table_has_a_row_per_model_and_the_ratio(bench, tiny_report):
    table = bench.format_table(tiny_report)
    header, column_names, rule, *rows = table.splitlines()
    assert "median ms/step" in column_names and "peak MiB" in column_names
    assert [row.split()[0] for row in rows[:2]] == ["FP32", "MSQ"]
    assert rows[2].startswith("MSQ / FP32") and rows[2].count("x") == 2
    assert f"torch {tiny_report['torch']}" in header


def test_any_check_spec_is_benchmarked_at_the_input_size_it_declares(bench):
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert bench.main(["--model", "timm:test_vit", "--batch-size", "2", "--repeats", "1",
                           "--steps", "1", "--warmup", "0", "--json"]) == 0
    report = json.loads(stdout.getvalue())
    assert report["input_shape"] == [3, 160, 160]  # timm's test_vit declares 160x160
    assert set(report["results"]) == {"FP32", "MSQ"}
    assert report["ratio_msq_over_fp"]["peak_memory"] > 0


def test_input_size_overrides_the_declared_one(bench):
    workload = bench.build_workload("timm:test_vit", (3, 64, 64))
    assert workload.input_shape == (3, 64, 64)
    assert workload.num_classes == 10  # the check's 10-class head


def test_a_factory_that_declares_no_input_size_needs_one(bench):
    with pytest.raises(SystemExit, match="declares no input size; give one \\(--input-size"):
        bench.build_workload("msq_fx.models:SmallCNN")
    assert bench.build_workload("msq_fx.models:SmallCNN", (1, 28, 28)).input_shape == (1, 28, 28)


def test_an_unknown_model_is_refused_with_a_suggestion(bench):
    with pytest.raises(SystemExit, match="unknown timm model 'resnet_18'.*did you mean"):
        bench.build_workload("timm:resnet_18")


def test_autocast_runs_every_contenders_forward_in_that_dtype(bench):
    import torch

    workload = bench.build_workload("resnet20")
    inputs, targets = torch.randn(4, 3, 32, 32), torch.randint(10, (4,))
    contenders = bench.build_contenders(workload, inputs, torch.device("cpu"),
                                        autocast=torch.bfloat16)
    output_dtypes = []
    for contender in contenders:
        contender.model.register_forward_hook(lambda m, i, output: output_dtypes.append(output.dtype))
        bench.train_step(contender, inputs, targets)
    assert output_dtypes == [torch.bfloat16, torch.bfloat16]


def test_grad_checkpointing_needs_a_model_that_offers_it(bench):
    with pytest.raises(SystemExit, match="resnet20 has no set_grad_checkpointing"):
        bench.main(TINY_RUN + ["--grad-checkpointing"])


@pytest.fixture(scope="module")
def hessian_report(bench):
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert bench.main(TINY_RUN + ["--hessian", "--probes", "1",
                                      "--hessian-chunk-size", "2"]) == 0
    return json.loads(stdout.getvalue())


def test_hessian_mode_reports_each_method_against_the_msq_step(hessian_report):
    assert hessian_report["probes"] == 1
    assert set(hessian_report["hessian"]) == {"autograd", "finite_difference",
                                              "autograd, chunks of 2"}
    for method, cost in hessian_report["hessian"].items():
        assert len(cost["repeat_ms"]) == 2 and isinstance(cost["peak_bytes"], int)
        ratio = hessian_report["ratio_hessian_over_msq_step"][method]
        msq = hessian_report["results"]["MSQ"]
        assert ratio["peak_memory"] == pytest.approx(cost["peak_bytes"] / msq["peak_bytes"])


def test_finite_differences_need_less_memory_than_the_double_backward(hessian_report):
    # Bytes requested from the allocator, not time: the same on every run of the same model.
    costs = hessian_report["hessian"]
    assert costs["finite_difference"]["peak_bytes"] < costs["autograd"]["peak_bytes"]


def test_the_double_backward_in_chunks_needs_less_memory_than_on_the_whole_batch(hessian_report):
    costs = hessian_report["hessian"]
    assert costs["autograd, chunks of 2"]["peak_bytes"] < costs["autograd"]["peak_bytes"]


def test_without_hessian_the_report_has_no_hessian_part(tiny_report):
    assert "hessian" not in tiny_report and "ratio_hessian_over_msq_step" not in tiny_report


def test_hessian_table_names_both_methods(bench, hessian_report):
    text = bench.format_table(hessian_report)
    assert "H v by autograd" in text and "H v by finite_difference" in text
    assert "peak / MSQ step" in text


@pytest.fixture(scope="module")
def eval_report(bench):
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert bench.main(TINY_RUN + ["--eval"]) == 0
    return json.loads(stdout.getvalue())


def test_eval_mode_times_each_way_of_evaluating_against_the_float_forward(eval_report):
    runs = eval_report["eval"]
    assert set(runs) == {"FP32", "MSQ fake-quant", "MSQ fake-quant, cached weights",
                         "MSQ converted", "MSQ converted, cached weights"}
    for run in runs.values():
        assert len(run["repeat_ms_per_forward"]) == 2
        assert run["time_over_fp"] == pytest.approx(
            run["median_ms_per_forward"] / runs["FP32"]["median_ms_per_forward"])


def test_eval_mode_leaves_the_training_measurements_as_they_were(eval_report):
    assert set(eval_report["results"]) == {"FP32", "MSQ"}
    assert "eval" in eval_report and "hessian" not in eval_report


def test_every_msq_eval_forward_gives_the_fake_quant_output(bench):
    import torch

    workload = bench.build_workload("resnet20")
    inputs = torch.randn(4, 3, 32, 32)
    float_model, qmodel = (c.model for c in bench.build_contenders(workload, inputs,
                                                                    torch.device("cpu")))
    outputs = []
    # Copied with the model: the cached copies and the converted model report through it too.
    qmodel.register_forward_hook(lambda m, i, output: outputs.append(output))
    args = bench.parse_args(["--repeats", "1", "--steps", "1", "--warmup", "0"])
    bench.eval_forward_times(float_model, qmodel, inputs, args, torch.device("cpu"))
    assert qmodel.training  # the mode it had before
    with torch.no_grad():
        expected = qmodel.eval()(inputs)
    assert len(outputs) >= 4  # convert may run the model itself as well
    assert all(torch.equal(output, expected) for output in outputs)


def test_eval_table_gives_the_ratio_to_the_float_forward(bench, eval_report):
    text = bench.format_table(eval_report)
    assert "eval forward, no_grad" in text and "time / FP32" in text
    assert "MSQ fake-quant, cached weights" in text


AGREEMENT_PATH = Path(__file__).resolve().parents[1] / "tools" / "hessian_agreement"


def json_report_of(tool_path: Path, argv: list[str]) -> dict:
    """Run a tool's ``main(argv)`` (argv ends with --json); its exit status must be 0."""
    tool = load_tool(tool_path, f"msq_{tool_path.name}_tool")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert tool.main(argv) == 0
    return json.loads(stdout.getvalue())


def test_hessian_agreement_reports_each_step_against_the_double_backward():
    report = json_report_of(AGREEMENT_PATH, [
        "--model", "msq_fx.models:SmallCNN", "--input-size", "1x28x28", "--batch-size", "4",
        "--steps", "1", "--probes", "1", "--relative-steps", "1e-2", "1e-3", "--json"])
    assert set(report["by_relative_step"]) == {"0.01", "0.001"}
    for row in report["by_relative_step"].values():
        assert row["groups"] > 0 and 0 <= row["same_p"] <= row["groups"]
        assert 0 <= row["median_relative_difference"] <= row["max_relative_difference"]


BENCH_ONNX_PATH = Path(__file__).resolve().parents[1] / "tools" / "bench_onnx"


@pytest.fixture(scope="module")
def onnx_report():
    return json_report_of(BENCH_ONNX_PATH, [
        "--model", "msq_fx.models:resnet20", "--input-size", "32", "--bits", "4", "--repeats",
        "2", "--runs", "1", "--warmup", "0", "--json"])


def test_onnx_bench_times_each_session_once_per_repeat(onnx_report):
    assert set(onnx_report["results"]) == {"float", "MSQ", "MSQ, Q/DQ folded at load"}
    for result in onnx_report["results"].values():
        assert len(result["repeat_ms"]) == 2 and result["median_ms"] > 0
    assert set(onnx_report["ratio_over_float"]) == {"MSQ", "MSQ, Q/DQ folded at load"}


def test_onnx_bench_files_reproduce_the_models_they_came_from(onnx_report):
    for result in onnx_report["results"].values():
        assert result["max_abs_diff_from_pytorch"] < 1e-4


def test_onnx_bench_stores_the_weights_as_int4_and_the_file_is_smaller(onnx_report):
    assert (onnx_report["int4_weights"], onnx_report["int8_weights"]) == (20, 0)
    assert onnx_report["quantized_activations"] == 0
    assert onnx_report["ratio_over_float"]["MSQ"]["file_bytes"] < 0.5


def test_onnx_bench_is_an_executable_python_script():
    assert BENCH_ONNX_PATH.read_text().startswith("#!/usr/bin/env python3\n")
    assert BENCH_ONNX_PATH.stat().st_mode & 0o111
