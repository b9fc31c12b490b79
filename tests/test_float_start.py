"""``tools/fidelity choose-start``: the fixed rule that picks the rows' float start."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import msq_fx
from msq_fx.fidelity import main
from msq_fx.fidelity.run import FLOAT_WEIGHTS, start_digest
from msq_fx.fidelity.start import (FLOAT_START_BAR, choose_float_start, install_float_start,
                                   read_float_run)


def float_run(directory: Path, scores: list[tuple[float, float]], planned: int,
              seed: int | None = None) -> Path:
    """A float run's directory as tools/cifar10_resnet20 leaves it: ``float.json`` with one
    (all 10k, exact 1k) per epoch run, and, given a seed, the final weights."""
    directory.mkdir()
    epochs = [{"epoch": index + 1, "loss": 1.0, "test_acc": all_10k, "test_exact_acc": exact}
              for index, (all_10k, exact) in enumerate(scores)]
    (directory / "float.json").write_text(json.dumps(
        {"args": {"run": "float", "epochs": str(planned)}, "epochs": epochs}))
    if seed is not None:
        torch.manual_seed(seed)
        torch.save(msq_fx.resnet20().state_dict(), directory / FLOAT_WEIGHTS)
    return directory


def test_the_other_9k_accuracy_is_counted_from_the_two_recorded_accuracies(tmp_path):
    run = read_float_run(float_run(tmp_path / "a", [(82.30, 91.9)], planned=1))
    # 8,230 right of 10,000, 919 of them among the exact 1,000: 7,311 of the other 9,000.
    assert run.other_9k == pytest.approx(100 * 7311 / 9000)


def test_the_run_more_accurate_on_the_other_9k_is_kept_though_less_on_the_exact_1k(tmp_path):
    plain = read_float_run(float_run(tmp_path / "plain", [(82.00, 93.0)], planned=1))
    erased = read_float_run(float_run(tmp_path / "erased", [(82.50, 91.0)], planned=1))
    assert choose_float_start([plain, erased]) is erased


def test_the_last_epoch_is_what_is_judged(tmp_path):
    run = read_float_run(float_run(tmp_path / "a", [(90.0, 95.0), (80.0, 90.0)], planned=2))
    assert (run.epochs_done, run.all_10k, run.exact_1k) == (2, 80.0, 90.0)


def test_on_a_tie_the_first_named_run_is_kept(tmp_path):
    first = read_float_run(float_run(tmp_path / "a", [(82.0, 92.0)], planned=1))
    second = read_float_run(float_run(tmp_path / "b", [(82.0, 92.0)], planned=1))
    assert choose_float_start([first, second]) is first


def test_no_choice_is_made_while_a_run_is_unfinished_and_it_is_named(tmp_path):
    done = read_float_run(float_run(tmp_path / "done", [(82.0, 92.0)], planned=1))
    running = read_float_run(float_run(tmp_path / "running", [(85.0, 95.0)], planned=200))
    with pytest.raises(ValueError, match=r"running \(1 of 200 epochs\)"):
        choose_float_start([done, running])


def test_a_directory_without_a_float_record_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match=r"nothing/float.json: not a float run's record"):
        read_float_run(tmp_path / "nothing")


def test_the_kept_start_is_copied_with_its_record(tmp_path):
    run = read_float_run(float_run(tmp_path / "a", [(82.0, 92.0)], planned=1, seed=0))
    target = install_float_start(run, tmp_path / "rows")
    assert target.read_bytes() == (tmp_path / "a" / FLOAT_WEIGHTS).read_bytes()
    assert (tmp_path / "rows" / "float.json").read_text() == \
        (tmp_path / "a" / "float.json").read_text()


def test_a_directory_holding_another_start_is_refused_and_left_as_it_was(tmp_path):
    run = read_float_run(float_run(tmp_path / "a", [(82.0, 92.0)], planned=1, seed=0))
    other = read_float_run(float_run(tmp_path / "b", [(82.0, 92.0)], planned=1, seed=1))
    install_float_start(other, tmp_path / "rows")
    held = start_digest(torch.load(tmp_path / "rows" / FLOAT_WEIGHTS, weights_only=True))
    with pytest.raises(ValueError, match="already holds another float start"):
        install_float_start(run, tmp_path / "rows")
    assert start_digest(torch.load(tmp_path / "rows" / FLOAT_WEIGHTS,
                                   weights_only=True)) == held


def test_the_command_installs_a_kept_run_that_reaches_the_bar(tmp_path, capsys):
    qualified = float_run(tmp_path / "a", [(82.0, FLOAT_START_BAR)], planned=1, seed=0)
    other = float_run(tmp_path / "b", [(81.0, 93.0)], planned=1, seed=1)
    status = main(["choose-start", str(qualified), str(other), "--into", str(tmp_path / "rows")])
    assert status == 0
    assert "qualifies" in capsys.readouterr().out
    assert (tmp_path / "rows" / FLOAT_WEIGHTS).read_bytes() == \
        (qualified / FLOAT_WEIGHTS).read_bytes()


def test_the_command_installs_nothing_when_the_kept_run_is_under_the_bar(tmp_path, capsys):
    kept = float_run(tmp_path / "a", [(82.0, 91.4)], planned=1, seed=0)
    status = main(["choose-start", str(kept), "--into", str(tmp_path / "rows")])
    assert status == 1
    assert "under 91.5: the rows keep their present start" in capsys.readouterr().out
    assert not (tmp_path / "rows").exists()
