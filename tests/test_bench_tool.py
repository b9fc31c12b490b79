"""Smoke test of tools/bench and the msq_fx.bench package behind it: it runs end to end and
reports what it promises (never timings)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

import msq_fx.bench
from msq_fx.bench.doc import block_key
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


def test_table_has_a_row_per_model_with_its_ratios_to_float(bench, tiny_report):
    table = bench.format_table(tiny_report)
    header, column_names, rule, *rows = table.splitlines()
    assert "median ms/step" in column_names and "peak MiB" in column_names
    assert "time / FP32" in column_names and "peak / FP32" in column_names
    assert [row.split()[0] for row in rows[:2]] == ["FP32", "MSQ"]
    assert "page faults/step" in column_names
    assert rows[0].split()[-3:-1] == ["1.00x", "1.00x"]
    ratio = tiny_report["ratio_msq_over_fp"]
    assert rows[1].split()[-3:-1] == [f"{ratio['time']:.2f}x", f"{ratio['peak_memory']:.2f}x"]
    faults = tiny_report["results"]["MSQ"]["minor_faults_per_step"]
    assert rows[1].split()[-1] == f"{faults:.0f}"
    assert f"torch {tiny_report['torch']}" in header


def test_the_report_says_what_else_ran_on_the_machine(tiny_report):
    conditions = tiny_report["conditions"]
    assert conditions["machine"] and conditions["wall_seconds"] > 0
    other = conditions["other_processes_cores"]
    assert other is None or other >= 0


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
        contender.model.register_forward_hook(
            lambda m, i, output: output_dtypes.append(output.dtype))
        bench.train_step(contender, inputs, targets)
    assert output_dtypes == [torch.bfloat16, torch.bfloat16]


def test_grad_checkpointing_needs_a_model_that_offers_it(bench):
    with pytest.raises(SystemExit, match="resnet20 has no set_grad_checkpointing"):
        bench.main(TINY_RUN + ["--grad-checkpointing"])


def test_compile_times_every_contender_under_torch_compile(bench, compiled_models):
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert bench.main(TINY_RUN + ["--compile"]) == 0
    report = json.loads(stdout.getvalue())
    assert report["compile"] is True and set(report["results"]) == {"FP32", "MSQ"}
    assert len(compiled_models) == 2
    assert block_key(report).endswith("batch 8 compiled")


@pytest.mark.parametrize("other", ["--peers", "--eval", "--hessian"])
def test_compile_with_the_modes_it_does_not_time_is_a_usage_error(bench, other, capsys):
    with pytest.raises(SystemExit):
        bench.main(TINY_RUN + ["--compile", other])
    assert "--compile" in capsys.readouterr().err


@pytest.fixture(scope="module")
def hessian_report(bench):
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert bench.main(TINY_RUN + ["--hessian", "--probes", "1",
                                      "--hessian-chunk-size", "2"]) == 0
    return json.loads(stdout.getvalue())


def test_hessian_mode_reports_each_method_against_the_msq_step(hessian_report):
    assert hessian_report["probes"] == 1
    assert set(hessian_report["hessian"]) == {"autograd", "finite_difference", "fisher",
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


def test_the_fishers_trace_needs_less_memory_than_the_double_backward(hessian_report):
    costs = hessian_report["hessian"]
    assert costs["fisher"]["peak_bytes"] < costs["autograd"]["peak_bytes"]


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


# ---------------------------------------------------------------- peers

PEER_RUN = ["--model", "msq_fx.models:SmallCNN", "--input-size", "1x16x16", "--batch-size", "4",
            "--repeats", "1", "--steps", "1", "--warmup", "1", "--peers", "--json"]


@pytest.fixture(scope="module")
def peers_report(bench):
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert bench.main(PEER_RUN) == 0
    return json.loads(stdout.getvalue())


def test_peers_run_beside_float_and_msq_on_a_tiny_model(bench, peers_report):
    assert peers_report["peers"] == list(bench.PEERS) and not peers_report["skipped_peers"]
    assert set(peers_report["results"]) == {"FP32", "MSQ", *bench.PEERS}
    for name in bench.PEERS:
        ratio = peers_report["ratios_over_fp"][name]
        result = peers_report["results"][name]
        assert ratio["time"] > 0 and ratio["peak_memory"] > 0
        assert isinstance(result["peak_bytes"], int) and len(result["repeat_ms_per_step"]) == 1
        against = peers_report["msq_against_peers"][name]
        assert against["peer_time_over_msq"] == pytest.approx(
            result["median_ms_per_step"] / peers_report["results"]["MSQ"]["median_ms_per_step"])


def test_the_peer_table_compares_msq_with_each_peer(bench, peers_report):
    text = bench.format_table(peers_report)
    assert "MSQ against" in text and "step time / MSQ's" in text
    for name in bench.PEERS:
        assert sum(line.startswith(name) for line in text.splitlines()) == 2


def test_the_bit_split_peer_holds_eight_planes_per_weight(bench):
    import torch

    workload = bench.build_workload("resnet20")
    model = workload.model
    weights = sum(m.weight.numel() for m in model.modules()
                  if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    split = bench.bit_split(model)
    layers = bench.bit_split_layers(split)
    assert sum(m.weight_planes.numel() for m in layers) == bench.PLANES * weights
    assert set(torch.cat([m.weight_planes.flatten() for m in layers]).tolist()) == {0.0, 1.0}
    x = torch.randn(2, 3, 32, 32)
    (split(x).square().mean() + bench.group_lasso(layers)).backward()
    assert all(m.weight_planes.grad is not None and m.weight_scale.grad is not None
               for m in layers)


def test_bit_planes_start_at_the_float_weights_8_bit_code():
    import torch
    from torch import nn

    from msq_fx.bench.bit_split import bit_split

    torch.manual_seed(0)
    layer = nn.Linear(16, 4, bias=False)
    split = bit_split(nn.Sequential(layer))[0]
    x = torch.randn(3, 16)
    scale = layer.weight.abs().max()
    expected = (torch.round(layer.weight / scale * 128 + 128).clamp(0, 255) - 128) * (scale / 128)
    with torch.no_grad():
        assert torch.allclose(split(x), x @ expected.t(), atol=1e-6)
    assert not hasattr(split, "weight")  # only during its forward


def test_the_weight_only_torch_ao_peer_fake_quantizes_weights_and_nothing_else(bench):
    import torch
    from torch.ao.quantization import FakeQuantize

    from msq_fx.models import SmallCNN

    model = bench.torch_ao_qat(SmallCNN(), torch.randn(2, 1, 16, 16),
                               bench.weight_only_qconfig_mapping())
    fake_quants = [m for m in model.modules() if isinstance(m, FakeQuantize)]
    assert len(fake_quants) == 6  # four convs, two linears
    assert all((fq.quant_min, fq.quant_max) == (-8, 7) for fq in fake_quants)
    assert "activation_post_process" not in model.code


def test_the_brevitas_peer_starts_from_the_float_weights(bench):
    import torch
    from brevitas.nn import QuantConv2d, QuantLinear

    from msq_fx.models import SmallCNN

    torch.manual_seed(0)
    model = SmallCNN().eval()
    peer = bench.brevitas_weight_only(model)
    swapped = [m for m in peer.modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    assert len(swapped) == 6
    originals = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert all(torch.equal(a.weight, b.weight) for a, b in zip(swapped, originals))


def test_the_doc_writer_replaces_its_own_block_and_keeps_the_rest(bench, tiny_report,
                                                                 peers_report, tmp_path):
    from msq_fx.bench.doc import write_doc

    path = tmp_path / "benchmarks.md"
    path.write_text("# Benchmarks\n\nhand-written text\n")
    write_doc(path, tiny_report, ["--batch-size", "8"])
    write_doc(path, peers_report, ["--peers"])
    write_doc(path, tiny_report, ["--batch-size", "8", "--repeats", "2"])
    text = path.read_text()
    assert text.startswith("# Benchmarks\n\nhand-written text\n")
    assert text.count("<!-- tools/bench: resnet20 3x32x32 batch 8 -->") == 1
    assert text.count("<!-- tools/bench: msq_fx.models:SmallCNN 1x16x16 batch 4 peers -->") == 1
    assert "`tools/bench --batch-size 8 --repeats 2`" in text
    assert "`tools/bench --batch-size 8`," not in text
    assert "| MSQ against |" in text and "| Brevitas 4-bit weights |" in text
    assert text.index("resnet20 3x32x32") < text.index("SmallCNN 1x16x16")  # replaced in place


def test_cpu_clock_kept_heap_and_profile_are_reported(bench):
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert bench.main(["--batch-size", "4", "--repeats", "1", "--steps", "1", "--warmup", "1",
                           "--clock", "cpu", "--keep-freed-heap", "--profile", "5",
                           "--profile-steps", "1", "--json"]) == 0
    report = json.loads(stdout.getvalue())
    assert report["clock"] == "cpu" and report["keep_freed_heap"] is True
    assert "cpu clock, freed heap kept" in bench.format_table(report)
    assert msq_fx.bench.doc.block_key(report).endswith("batch 4 cpu clock freed heap kept")
    assert set(report["profile"]) == {"FP32", "MSQ"}
    assert "_StraightThrough" in report["profile"]["MSQ"]
    assert "_StraightThrough" not in report["profile"]["FP32"]
    rows = bench.profile_rows(report)
    assert rows[-1][0] == "all ops" and 6 < len(rows) <= 11
    assert "_StraightThrough" in [row[0] for row in rows]  # the float step has no such op
    assert all(row[1] == "-" for row in rows[5:-1])


def test_a_torchvision_model_takes_the_input_size_given(bench):
    assert bench.build_workload("torchvision:resnet18", (112,)).input_shape == (3, 112, 112)
