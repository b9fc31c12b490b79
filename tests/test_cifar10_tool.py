"""Specification of tools/cifar10_resnet20 on a generated CIFAR-shaped archive (no data needed)."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

import msq_fx
from msq_fx.data import load_npz
from conftest import load_tool, write_cifar_like

TOOL_PATH = Path(__file__).resolve().parents[1] / "tools" / "cifar10_resnet20"
TINY = ["--train-size", "64", "--batch-size", "32", "--epochs", "2", "--prune-interval", "1",
        "--target-compression", "4.2", "--prune-threshold", "0.6", "--reg-strength", "1e-3",
        "--hessian-batches", "1", "--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def tool():
    return load_tool(TOOL_PATH, "msq_cifar10_tool")


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    return write_cifar_like(tmp_path_factory.mktemp("data") / "cifar_like.npz", train=64,
                            test=40, exact=10)


def run(tool, archive: Path, out: Path, *extra: str) -> str:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert tool.main(["--data", str(archive), "--out", str(out), *TINY, *extra]) == 0
    return stdout.getvalue()


@pytest.fixture(scope="module")
def msq_run(tool, archive, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("msq")
    run(tool, archive, out, "--run", "msq")
    return out


def test_an_msq_run_writes_one_row_per_epoch_with_its_bits(msq_run):
    rows = json.loads((msq_run / "msq.json").read_text())["epochs"]
    assert [row["epoch"] for row in rows] == [1, 2]
    assert all(len(row["bits"]) == 20 for row in rows)  # ResNet-20: 19 convs and the classifier
    assert all("test_exact_acc" in row for row in rows)


def test_an_msq_run_ends_with_a_converted_model_equal_to_the_fake_quant_one(msq_run):
    summary = json.loads((msq_run / "msq_summary.json").read_text())
    assert summary["max_abs_diff"] == 0.0
    bits = [row.bits for row in msq_fx.saved_report(msq_run / "resnet20_msq.msq").layers]
    assert bits == json.loads((msq_run / "msq.json").read_text())["epochs"][-1]["bits"]
    assert (msq_run / "msq_history.png").read_bytes()[:4] == b"\x89PNG"


def test_a_run_stopped_and_continued_computes_what_an_uninterrupted_run_does(
        tool, archive, msq_run, tmp_path):
    printed = run(tool, archive, tmp_path, "--run", "msq", "--stop-after", "1")
    assert "stopped after epoch 1" in printed
    assert len(json.loads((tmp_path / "msq.json").read_text())["epochs"]) == 1
    assert "resumed from" in run(tool, archive, tmp_path, "--run", "msq")

    def comparable(out: Path) -> list[dict]:
        rows = json.loads((out / "msq.json").read_text())["epochs"]
        return [{key: value for key, value in row.items() if key != "seconds"} for row in rows]
    assert comparable(tmp_path) == comparable(msq_run)


def test_a_run_records_the_environment_it_ran_in_once(tool, archive, tmp_path):
    run(tool, archive, tmp_path, "--run", "float", "--stop-after", "1")
    run(tool, archive, tmp_path, "--run", "float")
    environments = json.loads((tmp_path / "float.json").read_text())["environments"]
    assert [entry["first_epoch"] for entry in environments] == [1]
    assert environments[0]["environment"]["torch"] == torch.__version__


def test_a_run_continued_in_another_environment_says_from_which_epoch(tool, archive, tmp_path,
                                                                      monkeypatch):
    run(tool, archive, tmp_path, "--run", "float", "--stop-after", "1")
    elsewhere = {**tool.run_environment(), "processor": "another CPU"}
    monkeypatch.setattr(tool, "run_environment", lambda: elsewhere)
    run(tool, archive, tmp_path, "--run", "float")
    environments = json.loads((tmp_path / "float.json").read_text())["environments"]
    assert [entry["first_epoch"] for entry in environments] == [1, 2]
    assert environments[1]["environment"] == {**elsewhere, "compiled": False}


def test_a_run_may_continue_compiled_and_says_from_which_epoch(tool, archive, tmp_path,
                                                               compiled_models):
    run(tool, archive, tmp_path, "--run", "float", "--stop-after", "1")
    run(tool, archive, tmp_path, "--run", "float", "--compile")
    record = json.loads((tmp_path / "float.json").read_text())
    assert len(compiled_models) == 1 and len(record["epochs"]) == 2
    assert [(entry["first_epoch"], entry["environment"]["compiled"])
            for entry in record["environments"]] == [(1, False), (2, True)]


def test_a_checkpoint_of_other_settings_is_refused_and_kept(tool, archive, tmp_path):
    run(tool, archive, tmp_path, "--run", "float", "--stop-after", "1")
    before = (tmp_path / "float.pt").read_bytes()
    with pytest.raises(SystemExit, match="other settings"):
        run(tool, archive, tmp_path, "--run", "float", "--lr", "0.01")
    assert (tmp_path / "float.pt").read_bytes() == before


def test_a_missing_data_file_says_how_to_give_one(tool, tmp_path):
    with pytest.raises(SystemExit, match="--data"):
        tool.main(["--run", "float", "--data", str(tmp_path / "absent.npz"), "--out",
                   str(tmp_path)])
    assert not list(tmp_path.iterdir())


def test_the_float_run_has_no_bits(tool, archive, tmp_path):
    run(tool, archive, tmp_path, "--run", "float")
    rows = json.loads((tmp_path / "float.json").read_text())["epochs"]
    assert len(rows) == 2 and not any("bits" in row for row in rows)
    assert torch.load(tmp_path / "float.pt", weights_only=False)["controller"] is None


def test_a_finished_float_run_keeps_its_weights_for_the_fidelity_rows(tool, archive, tmp_path):
    run(tool, archive, tmp_path, "--run", "float")
    weights = torch.load(tmp_path / "resnet20_float.pt", weights_only=True)
    checkpoint = torch.load(tmp_path / "float.pt", weights_only=False)["model"]
    assert weights.keys() == checkpoint.keys()
    assert all(torch.equal(weights[name], checkpoint[name]) for name in weights)


def test_erase_adds_random_erasing_to_the_training_batches_only(tool, archive):
    plain = tool.parse_args(["--run", "float", "--data", str(archive), *TINY])
    erasing = tool.parse_args(["--run", "float", "--data", str(archive), *TINY, "--erase", "1"])
    train_set = load_npz(archive, "train")
    # The first batch is cropped and mirrored by the same draws in both runs (the erasing draws
    # come after them), so the two differ by the erased rectangles alone.
    images, labels = next(tool.epoch_batches(train_set, plain, 1))
    erased, same_labels = next(tool.epoch_batches(train_set, erasing, 1))
    assert torch.equal(labels, same_labels)
    changed = (images != erased).any(dim=1, keepdim=True).expand_as(images)
    assert changed.flatten(1).any(dim=1).all()
    assert (erased[changed] == 0).all()


def test_an_erasing_run_stopped_and_continued_computes_what_an_uninterrupted_run_does(
        tool, archive, tmp_path):
    run(tool, archive, tmp_path / "whole", "--run", "float", "--erase", "0.5")
    run(tool, archive, tmp_path / "parts", "--run", "float", "--erase", "0.5", "--stop-after", "1")
    run(tool, archive, tmp_path / "parts", "--run", "float", "--erase", "0.5")
    whole, parts = (torch.load(tmp_path / part / "resnet20_float.pt", weights_only=True)
                    for part in ("whole", "parts"))
    assert all(torch.equal(whole[name], parts[name]) for name in whole)


@pytest.mark.parametrize("probability", ["0", "1.5"])
def test_an_erase_probability_out_of_range_is_a_usage_error(tool, probability, capsys):
    with pytest.raises(SystemExit):
        tool.parse_args(["--run", "float", "--erase", probability])
    assert "--erase" in capsys.readouterr().err


def test_act_bits_quantize_the_inputs_of_the_quantized_layers(tool, archive, tmp_path):
    run(tool, archive, tmp_path, "--run", "msq", "--act-bits", "3", "--epochs", "1")
    state = torch.load(tmp_path / "msq.pt", weights_only=False)["model"]
    activation_bits = [value for key, value in state.items()
                       if key.endswith("input_quantizer.bits")]
    assert len(activation_bits) == 20 and all(int(bits) == 3 for bits in activation_bits)


@pytest.fixture(scope="module")
def float_start(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("start") / "resnet20_float.pt"
    torch.save(msq_fx.resnet20().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def swa_run(tool, archive, float_start, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("swa")
    run(tool, archive, out, "--run", "swa", "--start", str(float_start))
    return out


def test_a_swa_run_writes_the_mean_of_its_epoch_end_weights(tool, archive, float_start,
                                                            swa_run, tmp_path):
    run(tool, archive, tmp_path, "--run", "swa", "--start", str(float_start), "--stop-after", "1")
    after_one = torch.load(tmp_path / "swa.pt", weights_only=False)["model"]
    after_two = torch.load(swa_run / "swa.pt", weights_only=False)["model"]
    averaged = torch.load(swa_run / "resnet20_swa.pt", weights_only=True)
    learned = [name for name, _ in msq_fx.resnet20().named_parameters()]
    assert not torch.equal(after_one["conv1.weight"], after_two["conv1.weight"])
    for name in learned:
        torch.testing.assert_close(averaged[name], (after_one[name] + after_two[name]) / 2)


def test_a_swa_average_carries_batch_norm_statistics_of_its_own_activations(archive, swa_run):
    model = msq_fx.resnet20()
    model.load_state_dict(torch.load(swa_run / "resnet20_swa.pt", weights_only=True))
    with torch.no_grad():
        first_conv = model.conv1(load_npz(archive, "train").images)
    torch.testing.assert_close(model.bn1.running_mean, first_conv.mean(dim=(0, 2, 3)))


def test_a_swa_run_stopped_and_continued_averages_what_an_uninterrupted_run_does(
        tool, archive, float_start, swa_run, tmp_path):
    run(tool, archive, tmp_path, "--run", "swa", "--start", str(float_start), "--stop-after", "1")
    run(tool, archive, tmp_path, "--run", "swa", "--start", str(float_start))
    resumed = torch.load(tmp_path / "resnet20_swa.pt", weights_only=True)
    uninterrupted = torch.load(swa_run / "resnet20_swa.pt", weights_only=True)
    assert all(torch.equal(resumed[name], uninterrupted[name]) for name in resumed)


def test_a_swa_run_reports_the_average_and_the_current_weights(swa_run):
    rows = json.loads((swa_run / "swa.json").read_text())["epochs"]
    assert [row["epoch"] for row in rows] == [1, 2]
    assert all({"test_acc", "test_exact_acc", "iterate_test_acc"} <= row.keys() for row in rows)


@pytest.mark.parametrize("arguments", [["--run", "swa"], ["--run", "float", "--start", "x.pt"]])
def test_start_is_given_with_a_swa_run_and_only_then(tool, arguments, capsys):
    with pytest.raises(SystemExit):
        tool.parse_args(arguments)
    assert "--start" in capsys.readouterr().err


def test_a_start_that_is_not_float_resnet20_weights_is_refused_by_name(tool, archive, tmp_path):
    start = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(3)}, start)
    with pytest.raises(SystemExit, match="other.pt: not the weights of a float ResNet-20"):
        run(tool, archive, tmp_path / "out", "--run", "swa", "--start", str(start))
    assert not (tmp_path / "out").exists()
