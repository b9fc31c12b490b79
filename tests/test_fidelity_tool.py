"""tools/fidelity (msq_fx.fidelity): every row kind runs from a float start on a CIFAR-shaped
archive, resumes from its checkpoint, and lands in the Markdown table with its command."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import msq_fx
from msq_fx.fidelity import (DISTILLED, LARGER_RATE, ROWS, TABLE_END, Settings, main, run_row,
                             run_rows, write_table)
from msq_fx.fidelity.rows import TARGETS, build_row
from msq_fx.fidelity.run import FLOAT_WEIGHTS, _row_loss, float_weights, start_digest
from conftest import write_cifar_like

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def settings(tmp_path):
    """A 256-image CIFAR-shaped archive (random pixels) and a float ResNet-20 start."""
    data = write_cifar_like(tmp_path / "cifar.npz", train=256, test=64, exact=16)
    torch.manual_seed(0)
    torch.save(msq_fx.resnet20().state_dict(), tmp_path / FLOAT_WEIGHTS)
    return Settings(data=data, out=tmp_path, epochs=1, batch_size=32, calibration_batches=1)


def settings_beside(settings: Settings, directory: Path, **changes) -> Settings:
    """``settings`` writing to ``directory`` (made here, with a copy of the float start)."""
    directory.mkdir()
    (directory / FLOAT_WEIGHTS).write_bytes((settings.out / FLOAT_WEIGHTS).read_bytes())
    return dataclasses.replace(settings, out=directory, **changes)


@pytest.mark.parametrize("name", ["uniform-2bit", "msq-8x"])
def test_an_msq_fx_row_trains_converts_exactly_and_writes_its_result(settings, name):
    result = run_row(name, settings, command=f"tools/fidelity row {name}")
    written = json.loads((settings.out / "rows" / f"{name}.json").read_text())
    assert written == result
    assert result["converted_max_abs_diff"] == 0.0
    assert len(result["epochs"]) == 1 and 0.0 <= result["test_acc"] <= 100.0
    assert result["exact_acc"] is not None


def test_a_row_records_the_environment_its_numbers_depend_on(settings):
    result = run_row("uniform-2bit", settings)
    environment = result["environment"]
    assert environment["torch"] == torch.__version__
    assert environment["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert environment["threads"] == torch.get_num_threads() and environment["processor"]


def test_the_cpu_identity_is_the_first_processors_model_and_vector_flags(tmp_path):
    from msq_fx.fidelity.run import cpu_identity

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\n"
                       "model\t\t: 143\nmodel name\t: Intel(R) Xeon(R)\nstepping\t: 8\n"
                       "flags\t\t: fpu sse2 avx2 fma avx512f amx_tile avx512_vnni\n\n"
                       "processor\t: 1\nmodel\t\t: 999\n")
    assert cpu_identity(cpuinfo) == {"vendor": "GenuineIntel", "name": "Intel(R) Xeon(R)",
                                     "family": "6", "model": "143", "stepping": "8",
                                     "flags": ["amx_tile", "avx512_vnni", "avx512f", "fma"]}
    assert cpu_identity(tmp_path / "absent") == {}


def test_an_msq_row_records_every_prune_it_made_under_the_pruning_it_was_given(settings):
    settings = dataclasses.replace(settings, pruning=(("interval", 1), ("threshold", 1.0)))
    result = run_row("msq-8x", settings)
    row_pruning = ROWS["msq-8x"].pruning
    assert (result["pruning"]["interval"], result["pruning"]["threshold"]) == (1, 1.0)
    assert result["pruning"]["reg_strength"] == row_pruning["reg_strength"]  # the row's own
    history = result["history"]
    steps = sorted({record["step"] for record in history})
    assert steps and steps == list(range(1, len(steps) + 1))  # a prune after every step
    assert {record["group"] for record in history} <= set(result["bits"])
    last = {record["group"]: record["bits_after"] for record in history}
    assert all(result["bits"][group] == bits for group, bits in last.items())


@pytest.mark.parametrize("name, min_samples", [("msq-18x-from-3bit-cheapest-finish", 4),
                                                ("msq-18x-from-3bit-sixteen-probes", 16)])
def test_a_row_s_hessian_settings_reach_its_controller_over_the_rows_common_ones(name, min_samples):
    torch.manual_seed(0)
    built = build_row(ROWS[name], msq_fx.resnet20().state_dict(), torch.randn(2, 3, 32, 32), [])
    assert built.controller.config.hessian.batches == 2
    assert built.controller.config.hessian.min_samples == min_samples


def test_the_one_shot_row_reaches_its_target_before_training_and_converts_exactly(settings):
    result = run_row("oneshot-10.67x", settings)
    assert result["converted_max_abs_diff"] == 0.0
    assert result["compression"] >= ROWS["oneshot-10.67x"].target
    assert result["target_step"] == 0
    assert min(result["bits"].values()) >= 2 and max(result["bits"].values()) <= 8


def test_a_uniform_row_holds_every_layer_at_its_width(settings):
    result = run_row("uniform-2bit", settings)
    assert set(result["bits"].values()) == {2} and result["compression"] == 16.0


def test_a_finished_row_resumes_without_training_again(settings):
    first = run_row("uniform-2bit", settings)
    again = run_row("uniform-2bit", settings)
    assert again["epochs"] == first["epochs"]


def test_a_checkpoint_from_other_settings_is_refused(settings):
    run_row("uniform-2bit", settings)
    with pytest.raises(SystemExit, match="other settings"):
        run_row("uniform-2bit", Settings(**{**settings.__dict__, "lr": 0.5}))


def another_float_start(settings: Settings) -> None:
    """Replace the float start under ``settings.out`` with other weights."""
    torch.manual_seed(1)
    torch.save(msq_fx.resnet20().state_dict(), settings.out / FLOAT_WEIGHTS)


def test_a_row_records_the_digest_of_the_float_start_it_ran_from(settings):
    result = run_row("uniform-2bit", settings)
    assert result["float_start"] == start_digest(float_weights(settings.out))
    another_float_start(settings)
    assert start_digest(float_weights(settings.out)) != result["float_start"]


def test_the_start_digest_names_the_values_not_the_file(settings):
    weights = float_weights(settings.out)
    copy = {name: tensor.clone() for name, tensor in reversed(list(weights.items()))}
    assert start_digest(copy) == start_digest(weights)
    copy["fc.bias"][0] += 1e-6
    assert start_digest(copy) != start_digest(weights)


def test_a_checkpoint_from_another_float_start_is_refused_and_kept(settings):
    run_row("uniform-2bit", settings)
    checkpoint = settings.out / "rows" / "uniform-2bit.pt"
    before = checkpoint.read_bytes()
    another_float_start(settings)
    with pytest.raises(SystemExit, match="another float start"):
        run_row("uniform-2bit", settings)
    assert checkpoint.read_bytes() == before


def test_the_table_refuses_runs_from_another_float_start_and_names_them(settings):
    run_row("uniform-2bit", settings)
    another_float_start(settings)
    with pytest.raises(SystemExit, match=r"uniform-2bit seed 0 \(start [0-9a-f]{16}\)"):
        write_table(settings.out, settings.out / "fidelity.md")
    assert not (settings.out / "fidelity.md").exists()


def test_the_table_takes_runs_that_recorded_no_float_start(settings):
    result = run_row("uniform-2bit", settings)
    del result["float_start"]
    (settings.out / "rows" / "uniform-2bit.json").write_text(json.dumps(result))
    another_float_start(settings)
    write_table(settings.out, settings.out / "fidelity.md")
    assert "| uniform-2bit " in (settings.out / "fidelity.md").read_text()


def test_a_compiled_msq_row_prunes_converts_exactly_and_says_it_ran_compiled(settings,
                                                                              compiled_models):
    pruning = (("interval", 1), ("threshold", 1.0))  # a prune after every step
    result = run_row("msq-8x", dataclasses.replace(settings, compile=True, pruning=pruning))
    assert len(compiled_models) == 1 and result["environment"]["compiled"] is True
    assert len({record["step"] for record in result["history"]}) > 1
    assert result["converted_max_abs_diff"] == 0.0


def test_a_row_begun_eagerly_continues_compiled(settings, compiled_models):
    run_row("uniform-2bit", settings)
    longer = dataclasses.replace(settings, epochs=2)
    with pytest.raises(SystemExit, match="other settings"):  # the budget is a result setting
        run_row("uniform-2bit", dataclasses.replace(longer, compile=True))
    result = run_row("uniform-2bit", dataclasses.replace(settings, compile=True))
    assert len(result["epochs"]) == 1 and result["environment"]["compiled"] is True


def test_the_environments_list_says_which_runs_ran_compiled():
    from msq_fx.fidelity.table import environments_text

    environment = {"torch": "2.14.1", "cpu_capability": "AVX512", "threads": 1}
    text = environments_text({"uniform-2bit": {0: {"environment": environment},
                                               1: {"environment": {**environment,
                                                                   "compiled": True}}}})
    assert text.count("compiled") == 1 and text.count("- 1 run:") == 2


def test_the_brevitas_row_trains_the_peer(settings):
    pytest.importorskip("brevitas")
    result = run_row("brevitas-2bit", settings)
    assert result["compression"] == 16.0 and "bits" not in result


def test_the_float_control_fine_tunes_the_start_unquantized(settings):
    result = run_row("float-fine-tuned", settings)
    assert result["compression"] == 1.0 and result["scale"] is None
    assert "bits" not in result and len(result["epochs"]) == 1
    trained = torch.load(settings.out / "rows" / "float-fine-tuned.pt", weights_only=False)
    start = torch.load(settings.out / FLOAT_WEIGHTS)
    assert set(trained["model"]) == set(start)  # a plain ResNet-20: no quantizer state
    assert not torch.equal(trained["model"]["conv1.weight"], start["conv1.weight"])


def test_the_table_lists_every_row_and_says_which_have_not_run(settings):
    run_row("uniform-2bit", settings, command="tools/fidelity row uniform-2bit")
    doc = settings.out / "fidelity.md"
    write_table(settings.out, doc)
    text = doc.read_text()
    assert "`tools/fidelity row uniform-2bit`" in text
    assert all(name in text for name in ROWS)
    rows_table = text.partition("Against the targets")[0]
    assert rows_table.count("not run") == len(ROWS) - 1


@pytest.mark.parametrize("recorded, option", [({"erase": "0.5"}, " --erase 0.5"),
                                               ({"erase": "None"}, ""), ({}, "")],
                         ids=["erasing", "no erasing", "recorded before --erase"])
def test_the_float_start_row_gives_the_command_that_trained_it(settings, recorded, option):
    epochs = [{"epoch": 1, "loss": 1.0, "test_acc": 80.0, "test_exact_acc": 90.0}]
    (settings.out / "float.json").write_text(json.dumps(
        {"args": {"epochs": "1", **recorded}, "epochs": epochs}))
    write_table(settings.out, settings.out / "fidelity.md")
    command = (f"`tools/cifar10_resnet20 --run float --epochs 1{option} --threads 1 "
               f"--out {settings.out}`")
    assert command in (settings.out / "fidelity.md").read_text()


def test_rewriting_the_table_keeps_the_notes_written_below_it(settings):
    doc = settings.out / "fidelity.md"
    write_table(settings.out, doc)
    doc.write_text(doc.read_text() + "\n## Notes\n\nmeasured by hand\n")
    run_row("uniform-2bit", settings)
    write_table(settings.out, doc)
    text = doc.read_text()
    assert text.count(TABLE_END) == 1 and text.endswith("## Notes\n\nmeasured by hand\n")
    assert "uniform-2bit" in text.partition(TABLE_END)[0]


def test_rows_run_in_parallel_processes_give_what_one_after_another_gives(settings, tmp_path):
    names = ["uniform-2bit", "uniform-4bit"]
    parallel = settings_beside(settings, tmp_path / "parallel")
    run_rows([(name, settings, name) for name in names], jobs=1, threads=1)
    run_rows([(name, parallel, name) for name in names], jobs=2, threads=1)
    for name in names:
        one, other = (json.loads((out / "rows" / f"{name}.json").read_text())
                      for out in (settings.out, parallel.out))
        assert [e["loss"] for e in one["epochs"]] == [e["loss"] for e in other["epochs"]]
        assert (one["test_acc"], one["bits"]) == (other["test_acc"], other["bits"])


@pytest.mark.parametrize("text", ["interval", "interval=0", "bogus=1"])
def test_a_bad_pruning_override_is_refused_by_the_command_line(text, capsys):
    with pytest.raises(SystemExit):
        main(["row", "msq-8x", "--pruning", text])
    assert "--pruning" in capsys.readouterr().err


def test_a_row_at_another_learning_rate_records_it_and_trains_otherwise(settings):
    plain = run_row("uniform-2bit", settings)
    faster = run_row("uniform-2bit", settings_beside(settings, settings.out / "faster", lr=0.05))
    assert faster["lr"] == 0.05 and "lr" not in plain
    assert faster["epochs"][0]["loss"] != plain["epochs"][0]["loss"]


def test_a_learning_rate_that_is_not_positive_is_refused_by_the_command_line(capsys):
    with pytest.raises(SystemExit):
        main(["row", "uniform-2bit", "--lr", "0"])
    assert "lr is the peak learning rate" in capsys.readouterr().err


def test_the_table_of_rows_run_elsewhere_goes_beside_them_not_into_the_docs(tmp_path):
    from msq_fx.fidelity import DEFAULT_DOC, DEFAULT_OUT, table_path

    assert table_path(DEFAULT_OUT) == DEFAULT_DOC
    assert table_path(tmp_path) == tmp_path / "fidelity.md"


def test_a_row_under_another_seed_is_written_beside_the_tables_own_run(settings):
    first = run_row("uniform-2bit", settings)
    other = run_row("uniform-2bit", dataclasses.replace(settings, seed=1))
    rows = settings.out / "rows"
    assert json.loads((rows / "uniform-2bit.json").read_text()) == first
    assert json.loads((rows / "uniform-2bit.seed1.json").read_text()) == other
    assert (first["seed"], other["seed"]) == (0, 1)
    assert first["epochs"][0]["loss"] != other["epochs"][0]["loss"]  # another data order


def test_the_seeds_table_gives_each_seed_and_their_mean_for_rows_run_more_than_once(settings):
    from msq_fx.fidelity import load_seeds, seeds_table

    for seed in (0, 1, 2):
        run_row("uniform-2bit", dataclasses.replace(settings, seed=seed))
    run_row("uniform-4bit", settings)
    by_row = load_seeds(settings.out)
    assert sorted(by_row["uniform-2bit"]) == [0, 1, 2] and list(by_row["uniform-4bit"]) == [0]
    accuracies = [by_row["uniform-2bit"][seed]["test_acc"] for seed in (0, 1, 2)]
    mean = sum(accuracies) / 3
    table = seeds_table(by_row)
    assert "uniform-2bit" in table and "uniform-4bit" not in table
    assert f"{mean:.2f} ±" in table
    assert " / ".join(f"{value:.2f}" for value in accuracies) in table


def test_the_table_is_written_without_a_seeds_table_until_a_row_has_two_seeds(settings):
    run_row("uniform-2bit", settings)
    doc = settings.out / "fidelity.md"
    write_table(settings.out, doc)
    assert "mean ± sd" not in doc.read_text()
    run_row("uniform-2bit", dataclasses.replace(settings, seed=1))
    write_table(settings.out, doc)
    assert "mean ± sd" in doc.read_text().partition(TABLE_END)[0]


def test_all_under_a_seed_runs_the_rows_that_seed_lacks_and_records_the_seed_in_the_command(
        settings):
    run_row("uniform-2bit", settings)
    main(["all", "uniform-2bit", "--seed", "3", "--epochs", "1", "--data", str(settings.data),
          "--out", str(settings.out), "--train-size", "64"])
    written = json.loads((settings.out / "rows" / "uniform-2bit.seed3.json").read_text())
    assert written["seed"] == 3 and written["command"].endswith("--seed 3")


def test_all_over_seeds_runs_what_each_seed_lacks_seed_by_seed(settings, monkeypatch):
    import msq_fx.fidelity as fidelity

    run_row("uniform-2bit", dataclasses.replace(settings, seed=1))
    asked = []
    monkeypatch.setattr(fidelity, "run_row", lambda name, row_settings, command:
                        asked.append((name, row_settings.seed, command)))
    main(["all", "uniform-2bit", "uniform-3bit", "--seeds", "0-1,3", "--data",
          str(settings.data), "--out", str(settings.out), "--doc", str(settings.out / "t.md")])
    assert [(name, seed) for name, seed, _ in asked] == [
        ("uniform-2bit", 0), ("uniform-3bit", 0), ("uniform-3bit", 1), ("uniform-2bit", 3),
        ("uniform-3bit", 3)]
    assert asked[2][2].endswith("--seed 1") and "--seed" not in asked[0][2]


def test_all_over_the_table_rows_runs_each_of_them(settings, monkeypatch):
    import msq_fx.fidelity as fidelity
    from msq_fx.fidelity.rows import TABLE_ROWS

    asked = []
    monkeypatch.setattr(fidelity, "run_row", lambda name, row_settings, command:
                        asked.append(name))
    main(["all", "--table-rows", "--data", str(settings.data), "--out", str(settings.out),
          "--doc", str(settings.out / "t.md")])
    assert asked == list(TABLE_ROWS)


def test_the_table_rows_hold_every_target_the_p_comparison_the_peer_and_the_control():
    from msq_fx.fidelity.rows import TABLE_ROWS

    assert set(TABLE_ROWS) <= set(ROWS) and len(set(TABLE_ROWS)) == len(TABLE_ROWS)
    for target in TARGETS:
        assert {target.msq_row, target.uniform_row} <= set(TABLE_ROWS)
    assert {"msq-16x", "msq-16x-fixed-p", "float-fine-tuned"} <= set(TABLE_ROWS)
    assert {ROWS[name].method for name in TABLE_ROWS} == {"uniform", "msq", "oneshot",
                                                         "brevitas", "float"}


@pytest.mark.parametrize("arguments", [["all", "--table-rows", "uniform-2bit"],
                                       ["row", "--table-rows"]])
def test_table_rows_beside_named_rows_or_outside_all_is_a_usage_error(arguments, capsys):
    with pytest.raises(SystemExit):
        main(arguments)
    assert "--table-rows" in capsys.readouterr().err


@pytest.mark.parametrize("arguments", [["all", "--seeds", "2-1"], ["all", "--seeds", "0,0"],
                                       ["all", "--seeds", "a"], ["row", "--seeds", "0-3"],
                                       ["all", "--seeds", "0-3", "--seed", "2"]])
def test_a_seed_list_that_is_empty_repeats_or_is_not_for_all_is_a_usage_error(arguments,
                                                                              capsys):
    with pytest.raises(SystemExit):
        main(arguments)
    assert "--seeds" in capsys.readouterr().err


@pytest.mark.parametrize("target", TARGETS, ids=lambda target: target.label)
def test_each_target_is_judged_on_a_row_that_runs_the_fine_tuning_preset(target):
    from msq_fx.fidelity.rows import ROW_HESSIAN, row_config

    preset = msq_fx.MSQConfig.fine_tuning(target.compression, hessian=ROW_HESSIAN, seed=3)
    assert row_config(ROWS[target.msq_row], seed=3) == preset
    assert ROWS[target.uniform_row].method == "uniform"
    assert ROWS[target.uniform_row].target == min(target.compression, 16.0)


def _runs(accuracies: dict[int, float], compression: float = 16.0) -> dict[int, dict]:
    return {seed: {"test_acc": acc, "compression": compression}
            for seed, acc in accuracies.items()}


@pytest.mark.parametrize("label, msq, met", [
    ("16x", {0: 81.0, 1: 80.0}, "yes"),  # level on the mean is enough under 16x
    ("16x", {0: 81.0, 1: 79.9}, "no"),
    ("past 16x", {0: 81.0, 1: 80.0}, "no"),  # past 16x level is not enough
    ("past 16x", {0: 81.0, 1: 80.1}, "yes"),
])
def test_a_target_is_met_on_the_mean_of_the_seeds_both_rows_ran(label, msq, met):
    from msq_fx.fidelity import targets_table

    target = next(target for target in TARGETS if target.label == label)
    by_row = {target.msq_row: _runs(msq),
              target.uniform_row: _runs({0: 80.0, 1: 81.0, 2: 99.0})}  # seed 2: MSQ lacks it
    line = next(line for line in targets_table(by_row, 81.0).splitlines()
                if f"`{target.msq_row}`" in line)
    assert "| 0, 1 " in line
    assert line.rstrip(" |").split("| ")[-1].startswith(met)


def test_a_target_more_than_its_margin_under_float_is_not_met_though_above_uniform():
    from msq_fx.fidelity.table import target_verdict

    eight = next(target for target in TARGETS if target.label == "8x")
    assert target_verdict(eight, [0.2, 0.4], [80.0, 80.2], 81.0).startswith("no: 0.90 under")
    assert target_verdict(eight, [0.2, 0.4], [80.6, 80.8], 81.0).startswith("yes")


def test_a_verdict_says_when_the_mean_difference_is_within_its_standard_error_of_level():
    from msq_fx.fidelity.table import target_verdict

    past = next(target for target in TARGETS if target.label == "past 16x")
    assert target_verdict(past, [0.5, -0.4], [81.0, 81.0], 81.0).endswith(
        "within one standard error of level")
    assert "standard error" not in target_verdict(past, [0.5, 0.4], [81.0, 81.0], 81.0)


def test_the_table_says_which_targets_have_no_paired_seeds_yet(settings):
    from msq_fx.fidelity import targets_table

    run_row("uniform-2bit", settings)
    table = targets_table(msq_fx.fidelity.load_seeds(settings.out), None)
    assert all(line.rstrip(" |").endswith("not run") for line in table.splitlines()[2:])


def test_the_targets_summary_gives_each_target_under_each_budget_and_its_verdict():
    from msq_fx.fidelity import targets_summary

    sixteen = next(target for target in TARGETS if target.label == "16x")
    three = {sixteen.msq_row: _runs({0: 81.0, 1: 80.0}, 16.04),
             sixteen.uniform_row: _runs({0: 80.0, 1: 81.0})}
    lines = targets_summary({"3 epochs": three, "15 epochs": {}}, 81.0).splitlines()
    line = next(line for line in lines if line.startswith("| 16x") and "3 epochs" in line)
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    assert cells == ["16x", "3 epochs", "2", "16.04x", "", "+0.00 ± 1.00", "-0.50", "yes"]
    assert next(line for line in lines if line.startswith("| 16x") and "15 epochs" in line
                ).rstrip(" |").endswith("not run")


def test_a_budget_with_its_own_float_start_is_judged_against_that_start():
    from msq_fx.fidelity import targets_summary

    eight = next(target for target in TARGETS if target.label == "8x")
    by_row = {eight.msq_row: _runs({0: 91.0, 1: 91.0}, 8.0),
              eight.uniform_row: _runs({0: 90.0, 1: 90.0}, 8.0)}
    lines = targets_summary({"3 epochs": by_row, "3 epochs, new start": by_row}, 91.2,
                            {"3 epochs, new start": 92.0}).splitlines()
    cells = {line.split("|")[2].strip(): [cell.strip() for cell in line.split("|")[-3:-1]]
             for line in lines if line.startswith("| 8x")}
    assert cells["3 epochs"] == ["-0.20", "yes"]
    assert cells["3 epochs, new start"] == ["-1.00", "no"]  # 1.00 under it, margin 0.5


def test_a_set_beside_the_table_holding_its_own_float_start_names_it(settings):
    from msq_fx.fidelity import START_200

    beside = settings_beside(settings, settings.out / START_200)
    directory = beside.out
    epochs = [{"epoch": 1, "loss": 0.2, "test_acc": 70.0, "test_exact_acc": 80.0},
              {"epoch": 2, "loss": 0.1, "test_acc": 83.25, "test_exact_acc": 92.4}]
    (directory / "float.json").write_text(json.dumps(
        {"args": {"epochs": "2", "compile": "True", "out": "results/fidelity/float-200"},
         "epochs": epochs}))
    run_row("uniform-2bit", beside)
    write_table(settings.out, settings.out / "fidelity.md")
    section = (settings.out / "fidelity.md").read_text().partition("200-epoch float start")[2]
    assert ("Its float start (float ResNet-20 after epoch 2 of 2): 83.25% on all 10k, 92.4% "
            "on the exact 1k, trained by "
            "`tools/cifar10_resnet20 --run float --epochs 2 --compile --threads 1 --out "
            "results/fidelity/float-200`") in " ".join(section.split())


def test_a_start_chosen_into_its_directory_gets_its_rows_a_summary_line_of_their_own(
        settings, capsys):
    from msq_fx.fidelity import START_200, SUMMARY_BEGIN, SUMMARY_END

    trained = settings.out / "float-200"
    trained.mkdir()
    (trained / FLOAT_WEIGHTS).write_bytes((settings.out / FLOAT_WEIGHTS).read_bytes())
    (trained / "float.json").write_text(json.dumps(
        {"args": {"run": "float", "epochs": "1"},
         "epochs": [{"epoch": 1, "loss": 0.1, "test_acc": 82.5, "test_exact_acc": 92.0}]}))
    assert main(["choose-start", str(trained), "--into", str(settings.out / START_200)]) == 0
    run_row("uniform-2bit", dataclasses.replace(settings, out=settings.out / START_200))
    readme = settings.out / "README.md"
    readme.write_text(f"{SUMMARY_BEGIN}\n{SUMMARY_END}\n")
    write_table(settings.out, settings.out / "fidelity.md", readme=readme)
    assert "| 16x      | 1 epochs, 200-epoch start |" in readme.read_text()
    section = (settings.out / "fidelity.md").read_text().partition("200-epoch float start")[2]
    assert "82.50% on all 10k, 92.0% on the exact 1k" in " ".join(section.split())


def test_a_float_start_trained_under_the_working_directory_is_named_relative_to_it(
        tmp_path, monkeypatch):
    from msq_fx.fidelity import float_start_row

    monkeypatch.chdir(tmp_path)
    epochs = [{"epoch": 1, "loss": 1.0, "test_acc": 80.0, "test_exact_acc": 90.0}]
    (tmp_path / "float.json").write_text(json.dumps(
        {"args": {"epochs": "1", "out": str(tmp_path / "runs" / "float")}, "epochs": epochs}))
    assert float_start_row(tmp_path)["command"].endswith("--out runs/float`")


def test_the_readme_summary_is_rewritten_between_its_markers_and_the_rest_kept(settings):
    from msq_fx.fidelity import SUMMARY_BEGIN, SUMMARY_END

    readme = settings.out / "README.md"
    readme.write_text(f"# Title\n\nbefore\n\n{SUMMARY_BEGIN}\nstale\n{SUMMARY_END}\n\nafter\n")
    run_row("uniform-2bit", settings)
    write_table(settings.out, settings.out / "fidelity.md", readme=readme)
    head, _, rest = readme.read_text().partition(SUMMARY_BEGIN)
    summary, _, tail = rest.partition(SUMMARY_END)
    assert head == "# Title\n\nbefore\n\n" and tail == "\n\nafter\n"
    assert "stale" not in summary and "| past 16x |" in summary and "not run" in summary


def test_a_readme_without_the_summary_markers_is_refused_unchanged(settings):
    readme = settings.out / "README.md"
    readme.write_text("# Title\n")
    with pytest.raises(ValueError, match="README.md lacks the lines"):
        write_table(settings.out, settings.out / "fidelity.md", readme=readme)
    assert readme.read_text() == "# Title\n"


def test_the_committed_table_and_readme_summary_are_what_the_committed_results_give(
        tmp_path, monkeypatch):
    from msq_fx.fidelity import DEFAULT_DOC, DEFAULT_OUT, DEFAULT_README

    monkeypatch.chdir(REPO)
    doc, readme = tmp_path / "fidelity.md", tmp_path / "README.md"
    doc.write_text(DEFAULT_DOC.read_text())
    readme.write_text(DEFAULT_README.read_text())
    write_table(DEFAULT_OUT, doc, readme=readme)
    assert doc.read_text() == DEFAULT_DOC.read_text(), "run tools/fidelity table"
    assert readme.read_text() == DEFAULT_README.read_text(), "run tools/fidelity table"


def test_the_environments_list_counts_the_runs_on_each_and_says_where_none_was_recorded():
    from msq_fx.fidelity import environments_text

    cpu = {"name": "Intel(R) Xeon(R)", "family": "6", "model": "143", "stepping": "8",
           "flags": ["avx512f"]}
    here = {"torch": "2.x", "cpu_capability": "AVX512", "threads": 1, "processor": "x86_64",
            "cpu": cpu}
    older = {key: value for key, value in here.items() if key != "cpu"}
    by_row = {"uniform-2bit": {0: {"environment": here}, 1: {"environment": here}},
              "msq-8x": {0: {"environment": older}}}
    assert environments_text(by_row).splitlines() == [
        "- 2 runs: torch 2.x, AVX512 kernels, 1 thread(s), Intel(R) Xeon(R), CPU family 6 "
        "model 143 stepping 8 (avx512f)",
        "- 1 run: torch 2.x, AVX512 kernels, 1 thread(s), CPU not recorded"]


def test_rows_re_run_in_one_environment_get_their_own_targets_and_summary_line(settings):
    from msq_fx.fidelity import ONE_ENVIRONMENT, SUMMARY_BEGIN, SUMMARY_END

    run_row("uniform-2bit", settings_beside(settings, settings.out / ONE_ENVIRONMENT))
    readme = settings.out / "README.md"
    readme.write_text(f"{SUMMARY_BEGIN}\n{SUMMARY_END}\n")
    write_table(settings.out, settings.out / "fidelity.md", readme=readme)
    doc = settings.out / "fidelity.md"
    section = doc.read_text().partition("re-run back to back in one environment")[2]
    assert "- 1 run: torch " in section and "| uniform-2bit " in section
    assert "The targets over these runs" in section
    assert "| 16x      | 1 epochs, one environment |" in readme.read_text()


@pytest.mark.parametrize("subdirectory, changes, recorded, intro, heading, label", [
    (DISTILLED, {"distill": 1.0}, ("distill", {"weight": 1.0, "temperature": 1.0}),
     "distilled from the float", "The targets over the distilled runs", "distilled"),
    (LARGER_RATE, {"lr": 0.03}, ("lr", 0.03),
     "learning rate of 0.03", "The targets over the runs at lr 0.03", "lr 0.03"),
], ids=["distilled", "larger rate"])
def test_rows_run_with_other_settings_beside_the_table_get_their_own_targets_and_summary_line(
        settings, subdirectory, changes, recorded, intro, heading, label):
    from msq_fx.fidelity import SUMMARY_BEGIN, SUMMARY_END

    result = run_row("uniform-2bit",
                     settings_beside(settings, settings.out / subdirectory, **changes))
    assert result[recorded[0]] == recorded[1]
    readme = settings.out / "README.md"
    readme.write_text(f"{SUMMARY_BEGIN}\n{SUMMARY_END}\n")
    write_table(settings.out, settings.out / "fidelity.md", readme=readme)
    section = (settings.out / "fidelity.md").read_text().partition(intro)[2]
    assert "| uniform-2bit " in section and heading in section
    assert f"| 16x      | 1 epochs, {label} |" in readme.read_text()


def test_a_budget_s_runs_table_lists_every_run_in_row_order_then_by_seed(settings):
    from msq_fx.fidelity import runs_table

    for name, seed in [("uniform-4bit", 1), ("uniform-2bit", 0), ("uniform-4bit", 0)]:
        run_row(name, dataclasses.replace(settings, seed=seed),
                command=f"tools/fidelity row {name} --seed {seed}")
    lines = runs_table(msq_fx.fidelity.load_seeds(settings.out)).splitlines()[2:]
    order = [(line.split("|")[1].strip(), line.split("|")[2].strip()) for line in lines]
    assert order == [("uniform-4bit", "0"), ("uniform-4bit", "1"), ("uniform-2bit", "0")]
    assert lines[1].rstrip(" |").endswith("`tools/fidelity row uniform-4bit --seed 1`")


@pytest.mark.parametrize("widths, said", [
    ([{"a": 4, "b": 4}, {"a": 4, "b": 4}], "uniform"),
    ([{"a": 3, "b": 2}, {"a": 3, "b": 3}], "mixed at 1 of 2 seeds"),
    ([{"a": 3, "b": 2}, {"a": 1, "b": 2}], "mixed"),
    ([{"a": 3, "b": 2}, None], ""),  # a run that recorded no widths: not guessed
])
def test_the_targets_say_whether_msq_ended_at_mixed_or_uniform_widths(widths, said):
    from msq_fx.fidelity import targets_summary

    sixteen = next(target for target in TARGETS if target.label == "16x")
    msq = _runs({0: 81.0, 1: 81.0})
    for seed, bits in enumerate(widths):
        if bits is not None:
            msq[seed]["bits"] = bits
    by_row = {sixteen.msq_row: msq, sixteen.uniform_row: _runs({0: 80.0, 1: 80.0})}
    line = next(line for line in targets_summary({"3 epochs": by_row}, None).splitlines()
                if line.startswith("| 16x"))
    assert line.split("|")[5].strip() == said


# ------------------------------------------------------------- traces of two rows compared

def traced(*prunes: tuple[int, dict[str, float]]) -> dict:
    """A row result whose history records ``{group: trace}`` at each ``(step, traces)``."""
    return {"history": [{"step": step, "group": group, "hessian_trace": trace}
                        for step, traces in prunes for group, trace in traces.items()]}


def test_the_rank_correlation_is_one_for_the_same_order_and_minus_one_for_the_reverse():
    from msq_fx.fidelity.compare import rank_correlation

    assert rank_correlation([1.0, 5.0, 2.0], [10.0, 90.0, 20.0]) == 1
    assert rank_correlation([1.0, 5.0, 2.0], [-1.0, -5.0, -2.0]) == -1


def test_traces_are_compared_only_where_both_rows_traced_the_same_groups_at_the_same_prune():
    from msq_fx.fidelity.compare import trace_comparison

    first = {0: traced((25, {"a": -1.0, "b": 2.0, "c": 3.0}), (50, {"a": 1.0, "b": 2.0})),
             1: traced((25, {"a": 1.0, "b": 2.0}))}
    second = {0: traced((25, {"a": 4.0, "b": 5.0, "c": 4.5, "d": 0.5}), (75, {"a": 1.0})),
              2: traced((25, {"a": 1.0, "b": 2.0}))}
    assert trace_comparison(first, second) == [
        {"seed": 0, "step": 25, "groups": 3, "negative_first": 1, "negative_second": 0,
         "rank_correlation": 0.5}]


def ended(accuracy: float, bits: dict[str, int], *prunes) -> dict:
    return {**traced(*prunes), "test_acc": accuracy, "compression": 16.0, "bits": bits}


def test_the_outcomes_are_paired_by_seed_with_the_mean_difference_last():
    from msq_fx.fidelity.compare import outcome_table

    first = {0: ended(81.0, {"a.weight": 1, "b.weight": 2}), 1: ended(80.0, {}),
             2: ended(79.0, {})}
    second = {0: ended(81.5, {"b.weight": 1}), 1: ended(80.1, {})}
    lines = outcome_table(("p", "q"), first, second).splitlines()
    assert len(lines) == 2 + 3  # header, rule, seeds 0 and 1, the mean
    assert "| a " in lines[2] and "| b " in lines[2] and "+0.50" in lines[2]
    assert lines[-1].startswith("| mean") and "+0.30 ± 0.20" in lines[-1]


def test_the_compare_action_prints_both_rows_outcomes_and_traces(tmp_path, capsys):
    rows = tmp_path / "rows"
    rows.mkdir()
    (rows / "msq-16x.json").write_text(json.dumps(ended(81.0, {}, (25, {"a": 1.0, "b": 2.0}))))
    (rows / "msq-18x.json").write_text(json.dumps(ended(80.0, {}, (25, {"a": -3.0, "b": 4.0}))))
    assert main(["compare", "msq-16x", "msq-18x", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "msq-18x: compression" in printed and "-1.00" in printed
    assert "negative: msq-18x" in printed and "| 0      | 25           | 2        |" in printed
    assert printed.rstrip().endswith("What these runs ran on:\n- 2 runs: environment not recorded")


def run_record(accuracy: float, loss: float, bits: dict[str, int], seconds: float = 60.0) -> dict:
    return {"test_acc": accuracy, "bits": bits, "epochs": [
        {"loss": loss, "test_acc": accuracy, "exact_acc": 90.0, "compression": 16.0,
         "seconds": seconds}]}


def test_repeats_says_whether_two_directories_hold_the_same_run_of_a_row_and_seed():
    from msq_fx.fidelity.compare import repeat_table

    here = {"uniform-2bit": {0: run_record(81.0, 0.16, {"a": 2}),
                             1: run_record(80.5, 0.15, {"a": 2}),
                             2: run_record(80.0, 0.15, {"a": 2})},
            "msq-16x": {0: run_record(80.0, 0.17, {"a": 1})}}
    there = {"uniform-2bit": {0: run_record(81.0, 0.16, {"a": 2}, seconds=99.0),  # wall time
                              1: run_record(80.9, 0.14, {"a": 2})},
             "msq-16x": {0: run_record(80.2, 0.17, {"a": 2})}}
    lines = [[cell.strip() for cell in line.strip("|").split("|")]
             for line in repeat_table(here, there).splitlines()[2:]]
    assert lines == [["uniform-2bit", "0", "81.00", "81.00", "+0.00", "every epoch"],
                     ["uniform-2bit", "1", "80.50", "80.90", "-0.40", "the widths only"],
                     ["msq-16x", "0", "80.00", "80.20", "-0.20", "no"]]


def test_the_repeats_action_needs_the_directory_to_set_beside(capsys):
    with pytest.raises(SystemExit):
        main(["repeats"])
    assert "--against" in capsys.readouterr().err


def test_runs_recorded_before_the_cpu_name_count_with_the_one_named_environment_like_them():
    from msq_fx.fidelity import environments_text

    flags = {"family": "6", "model": "167", "stepping": "1", "flags": ["avx512f"]}
    named = {"torch": "2.x", "cpu_capability": "AVX512", "threads": 1,
             "cpu": {"vendor": "GenuineIntel", "name": "Intel(R) Xeon(R)", **flags}}
    earlier = {**named, "cpu": flags}
    by_row = {"uniform-2bit": {0: {"environment": named}, 1: {"environment": earlier}},
              "msq-8x": {0: {"environment": earlier}}}
    assert environments_text(by_row).splitlines() == [
        "- 3 runs: torch 2.x, AVX512 kernels, 1 thread(s), Intel(R) Xeon(R), CPU family 6 "
        "model 167 stepping 1 (avx512f) (2 of them recorded before the CPU's name was)"]


def test_a_run_without_the_cpu_name_keeps_its_line_where_two_named_cpus_are_like_it():
    from msq_fx.fidelity import environments_text

    flags = {"family": "6", "model": "167", "stepping": "1", "flags": ["avx512f"]}
    base = {"torch": "2.x", "cpu_capability": "AVX512", "threads": 1}
    by_row = {"a": {0: {"environment": {**base, "cpu": {"name": "Xeon A", **flags}}},
                    1: {"environment": {**base, "cpu": {"name": "Xeon B", **flags}}},
                    2: {"environment": {**base, "cpu": flags}}}}
    lines = environments_text(by_row).splitlines()
    assert len(lines) == 3 and not any("recorded before" in line for line in lines)


def test_distilling_from_the_float_start_changes_the_run(settings, tmp_path):
    run_row("uniform-2bit", settings)
    distilled_settings = settings_beside(settings, tmp_path / "distill", distill=1.0)
    run_row("uniform-2bit", distilled_settings)
    plain = torch.load(settings.out / "rows" / "uniform-2bit.pt", weights_only=False)
    distilled = torch.load(distilled_settings.out / "rows" / "uniform-2bit.pt",
                           weights_only=False)
    assert not torch.equal(plain["model"]["conv1.weight"], distilled["model"]["conv1.weight"])
    assert distilled["settings"]["distill"] == "1.0"


def test_a_distilled_step_trains_on_the_weighted_sum_and_reports_the_cross_entropy(settings):
    model = msq_fx.resnet20().eval()
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    cross_entropy = torch.nn.functional.cross_entropy(model(images), labels)
    half = dataclasses.replace(settings, distill=0.5)
    # The model as its own teacher: the distillation term is 0, so the loss is half the CE.
    loss, reported = _row_loss(model, images, labels, model, half)
    assert reported.item() == pytest.approx(cross_entropy.item(), rel=1e-6)
    assert loss.item() == pytest.approx(0.5 * cross_entropy.item(), rel=1e-5)


def test_a_checkpoint_without_distillation_is_refused_by_a_run_with_it(settings):
    run_row("uniform-2bit", settings)
    with pytest.raises(SystemExit, match="other settings"):
        run_row("uniform-2bit", dataclasses.replace(settings, distill=0.5))


@pytest.mark.parametrize("changes", [{"distill": 1.5}, {"distill": -0.1},
                                     {"distill_temperature": 0.0}])
def test_a_distillation_weight_outside_0_to_1_or_a_temperature_under_0_is_refused(
        settings, changes):
    with pytest.raises(ValueError, match="distill"):
        dataclasses.replace(settings, **changes)
