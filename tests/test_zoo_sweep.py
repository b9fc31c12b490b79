"""msq_fx.zoo's sweep and tools/zoo_sweep: which models a sweep selects, how each check
subprocess is run and retried lean, the rows it records and the CSV and Markdown it writes."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from msq_fx.check import check_model
from msq_fx.zoo import runner, selection, sweep, sweep_report

SWEEP_PATH = Path(__file__).resolve().parents[1] / "tools" / "zoo_sweep"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _sweep(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SWEEP_PATH), "--no-progress", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def _csv_rows(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_sweep_is_an_executable_python_script():
    assert SWEEP_PATH.read_text().startswith("#!/usr/bin/env python3\n")
    assert SWEEP_PATH.stat().st_mode & 0o111


def test_sweep_report_only_rewrites_the_markdown_for_a_selection_and_checks_nothing(tmp_path):
    out = tmp_path / "zoo"
    row = {**{c: "" for c in runner.COLUMNS}, "model": "torchvision:resnet18",
           "status": "PASS"}
    sweep_report.write_rows(out.with_suffix(".csv"), [row])
    code = sweep.main(["--source", "torchvision", "--filter", "^torchvision:resnet(18|34)$",
                       "--out", str(out), "--report-only", "--no-progress"])
    assert code == 0
    text = out.with_suffix(".md").read_text()
    assert "1 of the 2 selected models checked so far" in text and "- PASS: 1" in text
    assert _csv_rows(out.with_suffix(".csv")) == [row]


def test_sweep_records_timeouts_reruns_them_and_resumes(tmp_path):
    chosen = ["--source", "torchvision", "--filter", r"^torchvision:(resnet18|squeezenet1_1)$",
              "--input-size", "32", "--out", str(tmp_path / "zoo")]
    timed_out = _sweep(*chosen, "--timeout", "0.5", cwd=tmp_path)
    assert timed_out.returncode == 0, timed_out.stderr
    rows = _csv_rows(tmp_path / "zoo.csv")
    assert [(r["model"], r["status"], r["reason"]) for r in rows] == [
        ("torchvision:resnet18", "TIMEOUT", "no result within 0.5 s"),
        ("torchvision:squeezenet1_1", "TIMEOUT", "no result within 0.5 s")]
    assert "- TIMEOUT: 2" in (tmp_path / "zoo.md").read_text()

    rerun = _sweep(*chosen, "--timeout", "300", "--rerun", "TIMEOUT", cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    rows = _csv_rows(tmp_path / "zoo.csv")
    assert list(rows[0])[:8] == ["model", "graph_nodes", "leaves", "quantized_weights",
                                 "float_leftovers", "seconds", "status", "reason"]
    assert [(r["model"], r["status"]) for r in rows] == [("torchvision:resnet18", "PASS"),
                                                         ("torchvision:squeezenet1_1", "PASS")]
    assert rows[0]["quantized_weights"] == "21" and int(rows[0]["graph_nodes"]) > 0
    assert rows[0]["float_leftovers"] == "0" and rows[0]["input_size"] == "3x32x32"
    assert float(rows[0]["peak_mib"]) > 100  # torch alone is more than that
    markdown = (tmp_path / "zoo.md").read_text()
    assert "- PASS: 2" in markdown and "2/2 = 100.0%" in markdown
    assert "| torchvision:squeezenet1_1" in markdown and "TIMEOUT" not in markdown

    resumed = _sweep(*chosen, "--timeout", "300", cwd=tmp_path)
    assert resumed.returncode == 0
    assert "2 already in" in resumed.stderr and "0 to check" in resumed.stderr


def _scripted_checks(monkeypatch, statuses):
    """Make run_check_once return rows with ``statuses`` in turn; returns whether each was lean."""
    calls = []

    def run_check_once(spec, limits, start, lean=False):
        status = statuses[len(calls)]
        calls.append(lean)
        row = runner._row(spec, status, "" if status == "PASS" else "prune: out of memory",
                          start, stage="" if status == "PASS" else "prune")
        return row

    monkeypatch.setattr(runner, "run_check_once", run_check_once)
    return calls


def test_sweep_retries_an_out_of_memory_check_lean_in_a_fresh_process(monkeypatch):
    calls = _scripted_checks(monkeypatch, ["OOM", "PASS"])
    row = runner.run_check("timm:big", runner.Limits(60, 2**30, 1, None))
    assert calls == [False, True]
    assert LEAN_RETRY_OPTIONS <= set(runner.LEAN_RETRY)
    assert row["status"] == "PASS"
    assert row["note"] == ("passed in a fresh process at batch 1 with the finite-difference "
                           "Hessian and activations on disk; batch 2 ran out of memory in prune")


def test_sweep_keeps_the_out_of_memory_row_when_the_lean_retry_fails_and_says_how(
        monkeypatch):
    _scripted_checks(monkeypatch, ["OOM", "OOM"])
    row = runner.run_check("timm:big", runner.Limits(60, 2**30, 1, None))
    assert (row["status"], row["stage"]) == ("OOM", "prune")
    assert row["note"] == ("fresh process at batch 1 with the finite-difference Hessian and "
                           "activations on disk: OOM (prune: out of memory)")


def test_sweep_checks_a_model_above_lean_above_lean_from_the_start(monkeypatch):
    calls = _scripted_checks(monkeypatch, ["PASS"])
    row = runner.run_check("timm:huge", runner.Limits(60, 2**30, 1, None),
                           lean_option="--lean-cost-above")
    assert calls == [True]
    assert row["status"] == "PASS"
    assert row["note"] == ("checked at batch 1 with the finite-difference Hessian and "
                           "activations on disk from the start (--lean-cost-above)")


def test_sweep_lean_specs_are_the_timm_models_with_at_least_that_many_parameters(tmp_path):
    cache = tmp_path / "sizes.json"
    cache.write_text(json.dumps({"timm": selection.installed_version("timm"), "models": {
        "small": [10, [3, 8, 8]], "edge": [100, [3, 8, 8]], "big": [1000, [3, 8, 8]]}}))
    specs = ["timm:small", "timm:edge", "timm:big", "torchvision:resnet18"]
    assert selection.lean_specs(specs, 100, cache) == {"timm:edge": "--lean-above",
                                                       "timm:big": "--lean-above"}
    assert selection.lean_specs(specs, None, cache) == {}


def test_sweep_lean_cost_specs_also_catch_few_parameters_at_a_large_input(tmp_path):
    cache = tmp_path / "sizes.json"
    cache.write_text(json.dumps({"timm": selection.installed_version("timm"), "models": {
        "small": [10, [3, 8, 8]], "wide_input": [10, [3, 100, 100]], "big": [1000, [3, 8, 8]]}}))
    specs = ["timm:small", "timm:wide_input", "timm:big"]
    # costs: small 640, wide_input 100 000, big 64 000
    assert selection.lean_specs(specs, None, cache, cost_threshold=64_000) == {
        "timm:wide_input": "--lean-cost-above", "timm:big": "--lean-cost-above"}
    assert selection.lean_specs(specs, 1000, cache, cost_threshold=100_000) == {
        "timm:wide_input": "--lean-cost-above", "timm:big": "--lean-above"}


@pytest.mark.parametrize("option", ["--lean-above", "--lean-cost-above"])
def test_sweep_refuses_a_lean_threshold_without_timm_sizes(option, capsys):
    with pytest.raises(SystemExit):
        sweep.parse_args(["--source", "torchvision", option, "1e9"])
    assert f"{option} needs --source timm" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--lean-above", "--lean-cost-above"])
def test_sweep_refuses_a_lean_threshold_that_is_not_positive(option, capsys):
    with pytest.raises(SystemExit):
        sweep.parse_args(["--source", "timm", option, "0"])
    assert f"{option} must be a positive number" in capsys.readouterr().err


def test_sweep_settings_say_which_models_were_checked_lean_from_the_start():
    lean = sweep_report.settings_text(sweep.parse_args(["--source", "timm",
                                                        "--lean-above", "1.5e9"]))
    plain = sweep_report.settings_text(sweep.parse_args(["--source", "timm"]))
    both = sweep_report.settings_text(sweep.parse_args(["--source", "timm", "--lean-above",
                                                        "1.5e9", "--lean-cost-above", "8e13"]))
    assert "timm models of 1.5e+09 parameters or more: checked at batch 1" in lean
    assert ("timm models of 1.5e+09 parameters or more, or whose parameters x input pixels "
            "reach 8e+13: checked at batch 1") in both
    assert "parameters or more" not in plain


def test_sweep_settings_give_the_default_input_sizes_of_the_swept_source_only():
    timm_text = sweep_report.settings_text(sweep.parse_args(["--source", "timm"]))
    tasks_text = sweep_report.settings_text(sweep.parse_args(["--source", "torchvision-tasks"]))
    assert "pretrained_cfg" in timm_text and "segmentation" not in timm_text
    assert "segmentation 520" in tasks_text and "pretrained_cfg" not in tasks_text


def test_sweep_report_only_settings_point_at_each_rows_limits_not_the_report_commands():
    options = ["--source", "timm", "--timeout", "123", "--lean-above", "3e8"]
    report = sweep_report.settings_text(sweep.parse_args([*options, "--report-only"]))
    run = sweep_report.settings_text(sweep.parse_args(options))
    assert "123 s" not in report and "Limits: each row's own" in report
    assert "Limits of the run that last wrote this page: 123 s" in run


def test_sweep_report_only_settings_leave_each_rows_lean_options_to_its_note():
    # Rows from earlier runs were retried without the activations on disk; the page must not
    # claim every row had them.
    options = ["--source", "timm"]
    report = sweep_report.settings_text(sweep.parse_args([*options, "--report-only"]))
    run = sweep_report.settings_text(sweep.parse_args(options))
    assert f"in a fresh process {runner.LEAN_WAY}:" in run
    assert f"in a fresh process {runner.LEAN_WAY}:" not in report
    assert "each row's note says which" in report


def test_sweep_does_not_retry_other_failures(monkeypatch):
    calls = _scripted_checks(monkeypatch, ["FAIL"])
    assert runner.run_check("timm:a", runner.Limits(60, 2**30, 1, None))["status"] == "FAIL"
    assert calls == [False]


def test_sweep_lean_checks_run_with_an_allocator_that_returns_freed_tensors():
    limits = runner.Limits(60, 2**30, 3, None)
    lean, plain = runner.check_env(limits, lean=True), runner.check_env(limits)
    assert lean["MALLOC_MMAP_THRESHOLD_"] == str(2**20)
    assert plain.get("MALLOC_MMAP_THRESHOLD_") == os.environ.get("MALLOC_MMAP_THRESHOLD_")
    assert lean["OMP_NUM_THREADS"] == plain["OMP_NUM_THREADS"] == "3"


def test_sweep_export_passes_each_format_to_every_check():
    args = sweep.parse_args(["--export", "onnx", "--export", "torch"])
    limits = runner.Limits(60, 2**30, 1, None, tuple(args.export))
    command = runner.check_command("timm:a", limits)
    assert " ".join(command).endswith("timm:a --export onnx --export torch")
    assert "--export" not in runner.check_command("timm:a", runner.Limits(60, 2**30, 1, None))


def test_sweep_compile_passes_it_to_every_check():
    args = sweep.parse_args(["--compile"])
    limits = runner.Limits(60, 2**30, 1, None, compile=args.compile)
    assert runner.check_command("timm:a", limits)[-1] == "--compile"
    assert "--compile" not in runner.check_command("timm:a", runner.Limits(60, 2**30, 1, None))


@pytest.mark.parametrize("compiled, text", [
    (None, ""),
    ({"graphs": 1, "graph_breaks": 0, "break_reasons": []}, "1 graph"),
    ({"graphs": 3, "graph_breaks": 2, "break_reasons": ["print (net.py:9)", "item (net.py:12)"]},
     "3 graphs, 2 breaks: print (net.py:9)")])
def test_sweep_row_gives_the_compiled_graphs_and_the_first_break(compiled, text):
    result = check_model("msq_fx.models:resnet20", input_size=32, steps=1)
    row = runner._result_row({**result.to_dict(include_table=False), "compiled": compiled}, 0.0)
    assert row["compiled"] == text


def test_sweep_markdown_has_a_compiled_column_and_says_so_only_when_asked():
    def row(model, compiled):
        return {**{c: "" for c in runner.COLUMNS}, "model": model, "status": "PASS",
                "compiled": compiled}

    assert "| compiled" in sweep_report.markdown_report([row("a", "1 graph")], "t", "s")
    assert "compiled" not in sweep_report.markdown_report([row("a", "")], "t", "s")
    assert "Compiled: the prepared model" in sweep_report.settings_text(
        sweep.parse_args(["--compile"]))
    assert "Compiled" not in sweep_report.settings_text(sweep.parse_args([]))


def test_a_sweep_csv_written_before_the_compiled_column_reads_and_writes_again(tmp_path):
    old_columns = [c for c in runner.COLUMNS if c != "compiled"]
    path = tmp_path / "zoo.csv"
    path.write_text(",".join(old_columns) + "\n" + ",".join(
        "timm:a" if c == "model" else "PASS" if c == "status" else "" for c in old_columns)
        + "\n")
    rows = sweep_report.read_rows(path)
    assert rows[0]["model"] == "timm:a" and not rows[0].get("compiled")
    sweep_report.write_rows(path, rows)
    assert path.read_text().splitlines()[0].endswith(",compiled")


def test_sweep_row_gives_each_exports_relative_difference():
    result = check_model("msq_fx.models:resnet20", input_size=32, steps=1, exports=("torch",))
    row = runner._result_row(result.to_dict(include_table=False), 0.0)
    assert row["exports"] == "torch 0"


def test_sweep_row_splits_the_check_time_by_stage():
    result = check_model("msq_fx.models:resnet20", input_size=32, steps=1)
    row = runner._result_row(result.to_dict(include_table=False), 0.0)
    stages = [part.split(" ")[0] for part in row["stage_seconds"].split("; ")]
    assert stages == list(result.stage_seconds)
    assert {"build", "train", "prune", "compare"} <= set(stages)


def test_sweep_markdown_has_an_exports_column_only_when_a_row_has_exports():
    def row(model, exports):
        return {**{c: "" for c in runner.COLUMNS}, "model": model, "status": "PASS",
                "exports": exports}

    with_exports = sweep_report.markdown_report(
        [row("a", "torch 0; onnx 1.3e-06"), row("b", "")], "title", "settings")
    without = sweep_report.markdown_report([row("a", ""), row("b", "")], "title", "settings")
    assert "torch 0; onnx 1.3e-06" in with_exports and "| exports" in with_exports
    assert "exports" not in without


def test_sweep_markdown_counts_the_rows_per_limits_they_were_checked_under():
    def row(model, limits):
        return {**{c: "" for c in runner.COLUMNS}, "model": model, "status": "PASS",
                "limits": limits}

    limits = runner.Limits(900, 10 * 2**30, 1, None).describe()
    assert limits == "900 s, 10 GiB, 1 thread"
    text = sweep_report.markdown_report([row("a", limits), row("b", limits), row("c", "")],
                                        "title", "settings")
    assert "| 900 s, 10 GiB, 1 thread |        2 |" in text
    assert "| not recorded            |        1 |" in text
    assert "Limits the rows" not in sweep_report.markdown_report([row("a", "")], "t", "s")


def test_sweep_settings_describe_the_exports():
    exported = sweep_report.settings_text(sweep.parse_args(["--export", "onnx"]))
    assert "Exports (onnx): the converted model exported and run" in exported
    assert "Exports" not in sweep_report.settings_text(sweep.parse_args([]))


LEAN_RETRY_OPTIONS = {"--batch-size", "1", "--hessian-method", "finite_difference",
                      "--offload-activations"}


def test_sweep_selection_is_deterministic():
    specs = [f"timm:model{i:02d}" for i in range(40)] + ["torchvision:resnet18"]
    sample = selection.select(specs, "^timm:", 10, 3, (0, 1))
    assert sample == selection.select(specs, "^timm:", 10, 3, (0, 1))
    assert len(sample) == 10 and sample == sorted(sample)
    assert selection.select(specs, "^timm:", 10, 3, (1, 2)) == sample[1::2]
    assert selection.select(specs, "resnet", None, 0, (0, 1)) == ["torchvision:resnet18"]
    assert len(selection.zoo_specs("torchvision")) == 80


def test_sweep_markdown_summarizes_statuses_failures_and_float_leftovers():
    def row(model, status, reason="", stage="", details=""):
        return {**{c: "" for c in runner.COLUMNS}, "model": model, "status": status,
                "reason": reason, "stage": stage, "float_details": details,
                "float_leftovers": str(len([d for d in details.split("; ") if d]))}

    rows = [row("a", "PASS", details="head.weight [linear]: excluded by MSQConfig.exclude"),
            row("b", "FAIL", "prune: RuntimeError: boom 12", "prune"),
            row("c", "FAIL", "prune: RuntimeError: boom 7", "prune"),
            row("d", "SKIP", "forward: model does not run eagerly", "forward"),
            row("e", "TIMEOUT", "no result within 900 s")]
    text = sweep_report.markdown_report(rows, "title", "settings")
    assert "- PASS: 1\n- FAIL: 2\n- SKIP: 1\n- TIMEOUT: 1" in text
    assert "(all but SKIP): 1/4 = 25.0%" in text and "(PASS + FAIL): 1/3 = 33.3%" in text
    assert "|        2 | FAIL     | prune   | prune: RuntimeError: boom N |" in text
    assert "| a       | head.weight [linear]: excluded by MSQConfig.exclude |" in text
    assert "In progress" not in text


def test_sweep_markdown_counts_models_too_big_to_build_here_apart():
    def row(model, status, stage=""):
        return {**{c: "" for c in runner.COLUMNS}, "model": model, "status": status,
                "stage": stage, "reason": "out of memory" if status == "OOM" else ""}

    rows = [row("a", "PASS"), row("b", "PASS"), row("c", "OOM", "train"),
            row("d", "OOM", "build"), row("e", "OOM", "forward"), row("f", "SKIP", "forward")]
    text = sweep_report.markdown_report(rows, "title", "settings")
    assert "(all but SKIP): 2/5 = 40.0%" in text
    assert "does not fit this machine even in float): 2;" in text
    assert "(all but SKIP and those): 2/3 = 66.7%" in text


def test_sweep_markdown_has_no_line_for_unfit_models_when_there_are_none():
    rows = [{**{c: "" for c in runner.COLUMNS}, "model": "a", "status": "OOM",
             "stage": "train", "reason": "out of memory"}]
    assert "does not fit this machine" not in sweep_report.markdown_report(rows, "t", "s")


def test_sweep_markdown_lists_the_models_whose_hessian_fell_back_to_finite_differences():
    rows = [{**{c: "" for c in runner.COLUMNS}, "model": model, "status": "PASS",
             "hessian": hessian, "peak_mib": "100"}
            for model, hessian in (("timm:big", "finite_difference"), ("timm:small", "autograd"),
                                   ("timm:old", ""))]
    text = sweep_report.markdown_report(rows, "title", "settings")
    section = text.split("## Hessian by finite differences")[1].split("##")[0]
    assert "timm:big" in section and "timm:small" not in section and "timm:old" not in section


def test_sweep_markdown_lists_the_notes_of_checks_that_passed_with_one():
    rows = [{**{c: "" for c in runner.COLUMNS}, "model": model, "status": "PASS",
             "note": note}
            for model, note in (("timm:big", "at batch 1: batch 2 ran out of memory in train"),
                                ("timm:small", ""))]
    text = sweep_report.markdown_report(rows, "title", "settings")
    section = text.split("## Notes")[1].split("##")[0]
    assert "timm:big" in section and "batch 2 ran out of memory" in section
    assert "timm:small" not in section


def test_sweep_markdown_has_no_finite_difference_section_when_none_fell_back():
    rows = [{**{c: "" for c in runner.COLUMNS}, "model": "timm:a", "status": "PASS",
             "hessian": "autograd"}]
    assert "finite differences" not in sweep_report.markdown_report(rows, "title", "settings")


def test_sweep_markdown_says_how_far_an_unfinished_sweep_got():
    rows = [{**{c: "" for c in runner.COLUMNS}, "model": "timm:a", "status": "PASS"}]
    text = sweep_report.markdown_report(rows, "title", "settings", ["timm:a", "timm:b", "timm:c"])
    assert "**In progress: 1 of the 3 selected models checked so far.**" in text
    done = sweep_report.markdown_report(rows, "title", "settings", ["timm:a"])
    assert "In progress" not in done


def test_sweep_rerun_keeps_old_rows_until_replaced(tmp_path):
    rows = [{**{c: "" for c in runner.COLUMNS}, "model": model, "status": status}
            for model, status in (("torchvision:a", "TIMEOUT"), ("torchvision:b", "TIMEOUT"),
                                  ("torchvision:c", "PASS"))]
    sweep_report.write_rows(tmp_path / "zoo.csv", rows)
    args = sweep.parse_args(["--out", str(tmp_path / "zoo"), "--rerun", "timeout"])
    resumable = sweep.Sweep(args)
    assert resumable.pending(["torchvision:a", "torchvision:c", "torchvision:d"]) == [
        "torchvision:a", "torchvision:d"]
    resumable.record({**rows[0], "status": "PASS"})
    stored = sweep_report.read_rows(tmp_path / "zoo.csv")
    assert [(r["model"], r["status"]) for r in stored] == [
        ("torchvision:a", "PASS"), ("torchvision:b", "TIMEOUT"), ("torchvision:c", "PASS")]



def test_sweep_rows_are_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "zoo.csv"
    old = [{**{c: "" for c in runner.COLUMNS}, "model": "timm:a", "status": "PASS"}]
    sweep_report.write_rows(path, old)

    def interrupted(self, rows):
        raise KeyboardInterrupt
    monkeypatch.setattr(csv.DictWriter, "writerows", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sweep_report.write_rows(path, old + [{**old[0], "model": "timm:b"}])
    assert sweep_report.read_rows(path) == old
    assert [p.name for p in tmp_path.iterdir()] == ["zoo.csv"]  # no temporary file left behind

@pytest.mark.parametrize("status", ["FAIL", "SKIP"])
def test_sweep_counts_an_allocation_failure_as_out_of_memory(status):
    result = {"model": "timm:big", "status": status, "stage": "forward", "graph_nodes": 0,
              "leaves": 0, "quantized_weights": 0, "float_weights": [], "max_abs_diff": None,
              "input_size": [3, 224, 224], "peak_memory_mib": {},
              "reason": "forward: model does not run eagerly at input (2, 3, 224, 224): "
                        "RuntimeError: DefaultCPUAllocator: can't allocate memory"}
    assert runner._result_row(result, 0.0)["status"] == "OOM"
    other = {**result, "reason": "forward: RuntimeError: shape mismatch"}
    assert runner._result_row(other, 0.0)["status"] == status


def test_sweep_size_order_puts_cheap_models_first_and_caches_timm_sizes(tmp_path):
    cache = tmp_path / "sizes.json"
    specs = ["timm:resnet50", "torchvision:resnet18", "timm:resnet10t", "torchvision:alexnet"]
    ordered = selection.smallest_first(specs, cache)
    assert ordered == ["timm:resnet10t", "torchvision:resnet18", "timm:resnet50",
                       "torchvision:alexnet"]
    stored = json.loads(cache.read_text())
    assert set(stored["models"]) == {"resnet10t", "resnet50"}
    params, size = stored["models"]["resnet50"]
    assert size == [3, 224, 224] and 23_000_000 < params < 24_000_000  # 10-class head

    stored["models"]["resnet50"][0] = 1  # the cache is what later sweeps read
    cache.write_text(json.dumps(stored))
    assert selection.smallest_first(specs, cache)[0] == "timm:resnet50"
