"""Specification of MSQController's schedule, BatchNorm recalibration and config check.

* ``pruning.interval_unit="step"``: ``step_end(step, ...)`` prunes after every I-th optimizer
  step and nowhere else; ``epoch_end`` then never prunes (and ``step_end`` never does in the
  default epoch mode). Steps count from 1 and must increase; the controller state keeps the
  last one.
* ``pruning.bn_recalibration_batches=n``: after a prune that changed a width, every BatchNorm's
  running statistics are the batch statistics averaged over the first n batches given; the
  model's modes and BatchNorm momenta are as before.
* ``MSQController(qmodel, config)`` refuses a config whose quantization section differs from the
  one ``prepare`` got (the schedule may differ); without a config it uses the prepared one.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import msq_fx
from msq_fx.batchnorm import recalibrate_batchnorm

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class ConvBNNet(nn.Module):
    """Conv-BN-ReLU x2 and a linear head on 1x6x6 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.flatten(1))


def batches(count: int = 5, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` (inputs, targets) pairs, each batch from its own distribution."""
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 1, 6, 6, generator=generator) * (1 + i) + i,
             torch.randint(0, 3, (8,), generator=generator)) for i in range(count)]


def config(**pruning) -> msq_fx.MSQConfig:
    """Every prune drops one LSB from every group (threshold 1, p fixed at 1, no Hessian)."""
    return msq_fx.MSQConfig(target_compression=10.0,
                            pruning={"threshold": 1.0, "step_policy": "fixed", **pruning})


def prepared(prepare_config: msq_fx.MSQConfig | None = None) -> nn.Module:
    torch.manual_seed(0)
    return msq_fx.prepare(ConvBNNet(), batches(1)[0][0], prepare_config or config())


def controller(**pruning) -> tuple[nn.Module, msq_fx.MSQController]:
    qmodel = prepared(config(**pruning))
    return qmodel, msq_fx.MSQController(qmodel)


# ---------------------------------------------------------------- counting steps


def test_step_mode_prunes_after_every_interval_th_step_and_no_other():
    _, ctl = controller(interval=3, interval_unit="step")
    pruned_at = []
    for step in range(1, 10):
        before = ctl.bit_widths()
        records = ctl.step_end(step, batches(1), F.cross_entropy)
        if records or ctl.bit_widths() != before:
            pruned_at.append(step)
    assert pruned_at == [3, 6, 9]


def test_step_mode_records_carry_the_step_they_ran_after():
    _, ctl = controller(interval=2, interval_unit="step")
    for step in range(1, 5):
        records = ctl.step_end(step, batches(1), F.cross_entropy)
        assert {r.step for r in records} == ({step} if step % 2 == 0 else set())
    assert [r.step for r in ctl.history] == [2] * 3 + [4] * 3


@pytest.mark.parametrize("unit,idle,own", [("step", "epoch_end", "step_end"),
                                            ("epoch", "step_end", "epoch_end")])
def test_the_call_for_the_other_interval_unit_never_prunes(unit, idle, own):
    _, ctl = controller(interval=1, interval_unit=unit)
    start = ctl.bit_widths()
    for count in range(1, 4):
        assert getattr(ctl, idle)(count, batches(1), F.cross_entropy) == []
    assert ctl.bit_widths() == start
    assert getattr(ctl, own)(1, batches(1), F.cross_entropy)  # the same config prunes by its unit


@pytest.mark.parametrize("repeated", [3, 2])
def test_step_end_rejects_a_step_that_does_not_increase(repeated):
    _, ctl = controller(interval=5, interval_unit="step")
    ctl.step_end(3, batches(1), F.cross_entropy)
    with pytest.raises(ValueError, match="step_end"):
        ctl.step_end(repeated, batches(1), F.cross_entropy)


@pytest.mark.parametrize("step", [0, -1])
def test_step_end_rejects_a_non_positive_step(step):
    _, ctl = controller(interval=5, interval_unit="step")
    with pytest.raises(ValueError, match="step_end"):
        ctl.step_end(step, batches(1), F.cross_entropy)


def test_controller_state_round_trips_the_last_step():
    qmodel, ctl = controller(interval=2, interval_unit="step")
    for step in range(1, 6):
        ctl.step_end(step, batches(1), F.cross_entropy)
    state = ctl.state_dict()
    resumed = msq_fx.MSQController(qmodel)
    resumed.load_state_dict(state)
    assert resumed.last_step == 5
    assert resumed.state_dict() == state
    with pytest.raises(ValueError, match="step_end"):
        resumed.step_end(5, batches(1), F.cross_entropy)


def test_a_controller_state_without_last_step_still_loads():
    qmodel, ctl = controller(interval=2, interval_unit="step")
    ctl.epoch_end(1, batches(1), F.cross_entropy)
    state = ctl.state_dict()
    del state["last_step"]
    resumed = msq_fx.MSQController(qmodel)
    resumed.load_state_dict(state)
    assert (resumed.last_epoch, resumed.last_step) == (1, 0)
    resumed.step_end(1, batches(1), F.cross_entropy)  # counting starts afresh
    assert resumed.last_step == 1


# ---------------------------------------------------------------- BatchNorm recalibration


def norms(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def statistics(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(n.running_mean.clone(), n.running_var.clone()) for n in norms(model)]


def averaged_batch_statistics(model: nn.Module, given: list) -> list[tuple[torch.Tensor, ...]]:
    """The running statistics of a copy of ``model`` whose BatchNorms start afresh with a
    cumulative average (momentum None) over ``given``, run in train mode."""
    fresh = copy.deepcopy(model)
    for norm in norms(fresh):
        norm.reset_running_stats()
        norm.momentum = None
    fresh.train()
    with torch.no_grad():
        for inputs, _ in given:
            fresh(inputs)
    return statistics(fresh)


def trained_statistics(qmodel: nn.Module) -> None:
    """Move the running statistics away from their initial values."""
    qmodel.train()
    with torch.no_grad():
        for inputs, _ in batches(3, seed=9):
            qmodel(inputs)


def assert_statistics_equal(actual, expected) -> None:
    for (mean, var), (expected_mean, expected_var) in zip(actual, expected, strict=True):
        torch.testing.assert_close(mean, expected_mean, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(var, expected_var, rtol=1e-6, atol=1e-7)


def test_after_a_prune_that_changes_a_width_bn_statistics_average_the_first_n_batches():
    qmodel, ctl = controller(interval=1, bn_recalibration_batches=3)
    trained_statistics(qmodel)
    given = batches(5)
    records = ctl.epoch_end(1, given, F.cross_entropy)
    assert any(r.lsbs_dropped > 0 for r in records)
    assert_statistics_equal(statistics(qmodel), averaged_batch_statistics(qmodel, given[:3]))


def test_a_prune_that_changes_no_width_leaves_bn_statistics_as_they_were():
    # beta (about 1/2 for trained-from-scratch weights) is never below this threshold.
    qmodel, ctl = controller(interval=1, threshold=1e-6, bn_recalibration_batches=3)
    trained_statistics(qmodel)
    before = statistics(qmodel)
    records = ctl.epoch_end(1, batches(5), F.cross_entropy)
    assert records and all(r.lsbs_dropped == 0 for r in records)
    for (mean, var), (old_mean, old_var) in zip(statistics(qmodel), before):
        assert torch.equal(mean, old_mean) and torch.equal(var, old_var)


def modes_and_momenta(model: nn.Module) -> tuple[dict[str, bool], dict[str, float | None]]:
    return ({name: m.training for name, m in model.named_modules()},
            {name: m.momentum for name, m in model.named_modules()
             if isinstance(m, nn.BatchNorm2d)})


def mixed_modes(model: nn.Module) -> None:
    """Train mode with one BatchNorm in eval mode, and an unusual momentum on the other."""
    model.train()
    model.bn1.eval()
    model.bn2.momentum = 0.3


def test_a_recalibrating_prune_restores_modes_and_bn_momenta():
    qmodel, ctl = controller(interval=1, bn_recalibration_batches=2)
    mixed_modes(qmodel)
    before = modes_and_momenta(qmodel)
    assert any(r.lsbs_dropped > 0 for r in ctl.epoch_end(1, batches(5), F.cross_entropy))
    assert modes_and_momenta(qmodel) == before


def test_recalibrate_batchnorm_restores_the_model_and_reraises_when_a_forward_fails():
    qmodel = prepared()
    trained_statistics(qmodel)
    mixed_modes(qmodel)
    before, settings = statistics(qmodel), modes_and_momenta(qmodel)
    wrong_shape = (torch.randn(8, 2, 6, 6), torch.zeros(8, dtype=torch.long))
    with pytest.raises(RuntimeError):
        recalibrate_batchnorm(qmodel, [batches(1)[0], wrong_shape])
    for (mean, var), (old_mean, old_var) in zip(statistics(qmodel), before):
        assert torch.equal(mean, old_mean) and torch.equal(var, old_var)
    assert modes_and_momenta(qmodel) == settings


# ---------------------------------------------------------------- the config check


@pytest.mark.parametrize("field,value", [("init_bits", 6), ("min_bits", 3), ("grid", "literal"),
                                         ("scale", "channel"), ("first_last", "fixed")])
def test_a_config_whose_quantization_differs_from_prepare_s_is_refused(field, value):
    qmodel = prepared(config())
    other = config().replace(quantization={field: value})
    with pytest.raises(msq_fx.MSQError) as raised:
        msq_fx.MSQController(qmodel, other)
    message = str(raised.value)
    assert f"{field}={value!r}" in message
    assert "msq_fx.prepare" in message  # how to fix it: pass prepare's config, or none


@pytest.mark.parametrize("changes", [
    {"target_compression": 12.0},
    {"pruning": {"interval": 7, "interval_unit": "step", "bn_recalibration_batches": 2}},
    {"hessian": {"batches": 3, "method": "finite_difference"}},
])
def test_a_config_differing_only_in_target_pruning_or_hessian_is_accepted(changes):
    qmodel = prepared(config())
    other = config().replace(**changes)
    assert msq_fx.MSQController(qmodel, other).config == other


def test_without_a_config_the_controller_uses_the_one_prepare_got():
    given = config(interval=4).replace(quantization={"init_bits": 6, "grid": "literal"})
    assert msq_fx.MSQController(prepared(given)).config == given


def test_a_prune_whose_batches_are_too_small_for_batchnorm_skips_the_recalibration(caplog):
    """One value per channel (batch 1 at 1x1) cannot train a BatchNorm: the prune still happens
    and the statistics stay as they were, with a warning that says what to change."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4, 2))
    config = msq_fx.MSQConfig(pruning={"interval": 1, "threshold": 1.0,
                                       "bn_recalibration_batches": 1})
    qmodel = msq_fx.prepare(model, torch.randn(2, 3, 1, 1), config)
    controller = msq_fx.MSQController(qmodel, config)
    norm = qmodel[1]
    before = norm.running_mean.clone()
    with caplog.at_level("WARNING", logger="msq_fx"):
        records = controller.epoch_end(1, [(torch.randn(1, 3, 1, 1), torch.tensor([0]))],
                                       torch.nn.functional.cross_entropy)
    assert any(r.lsbs_dropped for r in records)
    assert torch.equal(norm.running_mean, before)
    assert "bn_recalibration_batches" in caplog.text


@pytest.mark.parametrize("stage", ["float", "converted"])
def test_a_model_that_is_not_prepared_gets_the_error_convert_gives(stage):
    model = nn.Sequential(nn.Linear(4, 3))
    if stage == "converted":
        model = msq_fx.convert(msq_fx.prepare(model, torch.randn(2, 4)))
    with pytest.raises(msq_fx.MSQError, match="needs a model returned by msq_fx.prepare"):
        msq_fx.MSQController(model)
    with pytest.raises(msq_fx.MSQError):
        msq_fx.convert(model)
