"""Specification of the measured finish (``pruning.last_prune="measured"``, msq_fx.finish): the
cover it solves, the trials it runs, and the prune the controller makes with them."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import msq_fx
import msq_fx.precision_groups
from msq_fx.finish import cheapest_cover, measured_drop_costs

# ------------------------------------------------------------------ the cover

option_lists = st.lists(st.tuples(st.integers(1, 600), st.floats(-2, 5, allow_nan=False)),
                        min_size=0, max_size=2)
groups_options = st.lists(option_lists, min_size=1, max_size=5).map(
    lambda lists: {f"g{i}": options for i, options in enumerate(lists)})


def brute_force(options, needed):
    """The least summed cost over every choice of at most one option per group, or None."""
    best = None
    names = list(options)
    for picks in itertools.product(*[[None, *range(len(options[n]))] for n in names]):
        chosen = {n: i for n, i in zip(names, picks) if i is not None}
        if sum(options[n][i][0] for n, i in chosen.items()) >= needed:
            cost = sum(options[n][i][1] for n, i in chosen.items())
            best = cost if best is None else min(best, cost)
    return best


def saved_and_cost(options, chosen):
    return (sum(options[n][i][0] for n, i in chosen.items()),
            sum(options[n][i][1] for n, i in chosen.items()))


@settings(max_examples=200, deadline=None)
@given(groups_options, st.integers(0, 2000))
def test_the_cover_is_the_cheapest_choice_that_saves_enough(options, needed):
    chosen = cheapest_cover(options, needed)
    optimum = brute_force(options, needed)
    if optimum is None:
        assert chosen is None
        return
    saved, cost = saved_and_cost(options, chosen)
    assert saved >= needed
    assert cost == pytest.approx(optimum, abs=1e-9)


def test_a_measured_loss_decrease_does_not_carry_the_prune_past_the_target(monkeypatch):
    # 5 bits: 7,480 bits for 1,496 weights. Target 7.7x: 1,263 bits to save, which fc's drop
    # (1,280) saves alone; the conv's drop, measured as lowering the loss, is not added to it.
    qmodel, controller = prepared(config().replace(target_compression=7.7))
    monkeypatch.setattr("msq_fx.controller.measured_drop_costs",
                        lambda model, groups, *args, **kwargs: {"conv.weight": [-0.3],
                                                                "fc.weight": [0.2]})
    records = controller.epoch_end(1, data(), F.cross_entropy)
    assert {r.group: r.bits_after for r in records} == {"conv.weight": 5, "fc.weight": 4}


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(1, 40_000), st.floats(0, 5, allow_nan=False)),
                         min_size=1, max_size=2), min_size=1, max_size=8),
       st.integers(4097, 60_000))
def test_counted_in_coarse_units_the_cover_still_saves_enough(lists, needed):
    options = {f"g{i}": o for i, o in enumerate(lists)}
    chosen = cheapest_cover(options, needed)
    if sum(max(bits for bits, _ in o) for o in options.values()) < needed:
        assert chosen is None
    else:
        assert saved_and_cost(options, chosen)[0] >= needed


def test_of_equally_cheap_covers_the_one_saving_the_fewest_bits_is_taken():
    chosen = cheapest_cover({"big": [(5000, 0.0)], "small": [(1200, 0.0)], "tiny": [(10, 0.0)]},
                            1000)
    assert chosen == {"small": 0}


def test_the_cover_refuses_a_negative_need():
    with pytest.raises(ValueError, match="needed must be >= 0"):
        cheapest_cover({"a": [(1, 0.0)]}, -1)


# ------------------------------------------------------------------ the trials

class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.norm = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.norm(self.conv(x))).flatten(1))


def config(**pruning) -> msq_fx.MSQConfig:
    return msq_fx.MSQConfig(target_compression=8,
                            quantization={"init_bits": 5, "min_bits": 2, "scale": "channel"},
                            pruning={"interval": 1, "threshold": 1.0, "last_prune": "measured",
                                     **pruning})


def prepared(cfg: msq_fx.MSQConfig):
    torch.manual_seed(0)
    qmodel = msq_fx.prepare(ConvNet(), torch.randn(2, 3, 6, 6), cfg)
    with torch.no_grad():  # running statistics that a re-estimation visibly moves
        qmodel.norm.running_mean.fill_(0.3)
        qmodel.norm.running_var.fill_(2.0)
    return qmodel, msq_fx.MSQController(qmodel, cfg)


def data(count: int = 4) -> list:
    generator = torch.Generator().manual_seed(7)
    return [(torch.randn(16, 3, 6, 6, generator=generator),
             torch.randint(0, 10, (16,), generator=generator)) for _ in range(count)]


def loss_of(model, batches) -> float:
    with torch.no_grad():
        return sum(float(F.cross_entropy(model(x), y)) for x, y in batches) / len(batches)


def test_the_trials_leave_widths_scales_and_statistics_as_they_were():
    qmodel, controller = prepared(config())
    before = {k: v.clone() for k, v in qmodel.state_dict().items()}
    measured_drop_costs(qmodel, controller.groups, 2, data(), F.cross_entropy, refit=True,
                        recalibration=4)
    after = qmodel.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_trial_costs_what_the_drop_it_tries_does_to_the_loss():
    qmodel, controller = prepared(config())
    qmodel.eval()
    batches = data()
    costs = measured_drop_costs(qmodel, controller.groups, 2, batches, F.cross_entropy,
                                refit=True, recalibration=4)
    # Against the current widths with the statistics re-estimated on the same batches.
    msq_fx.batchnorm.recalibrate_batchnorm(qmodel, batches)
    baseline = loss_of(qmodel, batches)
    conv = next(g for g in controller.groups if g.name == "conv.weight")
    conv.set_bits(conv.bits - 1)
    conv.members[0].quantizer.refit_scale(conv.members[0].latent)
    msq_fx.batchnorm.recalibrate_batchnorm(qmodel, batches)
    assert costs["conv.weight"][0] == pytest.approx(loss_of(qmodel, batches) - baseline,
                                                    rel=1e-6)


def test_each_group_is_tried_at_every_drop_its_next_prune_may_take():
    qmodel, controller = prepared(config())
    conv, fc = controller.groups
    conv.set_prune_step(2)
    fc.set_bits(2)  # at min_bits: nothing to try
    costs = measured_drop_costs(qmodel, controller.groups, 2, data(), F.cross_entropy,
                                refit=False, recalibration=0)
    assert [len(costs[g.name]) for g in (conv, fc)] == [2, 0]


def test_a_trial_that_fails_leaves_the_model_as_it_was():
    qmodel, controller = prepared(config())
    before = {k: v.clone() for k, v in qmodel.state_dict().items()}
    calls = []

    def failing_loss(outputs, targets):
        calls.append(1)
        if len(calls) == 10:  # inside the second trial (4 batches per loss, and a baseline)
            raise RuntimeError("loss failed")
        return F.cross_entropy(outputs, targets)

    with pytest.raises(RuntimeError, match="loss failed"):
        measured_drop_costs(qmodel, controller.groups, 2, data(), failing_loss, refit=True,
                            recalibration=4)
    after = qmodel.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ------------------------------------------------------------------ the prune

def test_the_prune_that_reaches_the_target_takes_the_cheapest_measured_drops(monkeypatch):
    qmodel, controller = prepared(config())
    # From 5 bits, 8x (4 bits everywhere) needs both groups' drops, whatever they cost.
    monkeypatch.setattr("msq_fx.controller.measured_drop_costs",
                        lambda model, groups, *args, **kwargs: {"conv.weight": [0.1],
                                                                "fc.weight": [0.2]})
    records = controller.epoch_end(1, data(), F.cross_entropy)
    assert controller.done and controller.compression() >= 8
    assert {r.group: (r.bits_after, r.drop_loss_increase) for r in records} == {
        "conv.weight": (4, 0.1), "fc.weight": (4, 0.2)}


def test_a_group_whose_lsbs_have_not_emptied_can_close_the_gap(monkeypatch):
    # 5 bits: 7,480 bits for 1,496 weights (6.4x). Target 6.55x: 172 bits to save. The conv
    # (216 weights) is under alpha, and its drop alone would reach the target; fc (1,280) is
    # not under alpha, but measured cheaper, so fc's drop closes the gap instead.
    qmodel, controller = prepared(config(threshold=0.5).replace(target_compression=6.55))
    monkeypatch.setattr(msq_fx.precision_groups.PrecisionGroup, "lsb_nonzero_rate",
                        lambda group, floor: 0.1 if group.name == "conv.weight" else 0.9)
    monkeypatch.setattr("msq_fx.controller.measured_drop_costs",
                        lambda model, groups, *args, **kwargs: {"conv.weight": [0.5],
                                                                "fc.weight": [0.05]})
    records = controller.epoch_end(1, data(), F.cross_entropy)
    assert {r.group: r.bits_after for r in records} == {"conv.weight": 5, "fc.weight": 4}
    assert controller.done


def test_a_prune_that_cannot_reach_the_target_is_not_measured(monkeypatch):
    qmodel, controller = prepared(config().replace(target_compression=16))
    monkeypatch.setattr("msq_fx.controller.measured_drop_costs",
                        lambda *args, **kwargs: pytest.fail("measured a prune short of target"))
    records = controller.epoch_end(1, data(), F.cross_entropy)
    assert all(r.bits_after == 4 and r.drop_loss_increase is None for r in records)


def test_the_measured_finish_on_a_real_prune_reaches_the_target_exactly():
    qmodel, controller = prepared(config())
    controller.epoch_end(1, data(), F.cross_entropy)
    assert controller.compression() == pytest.approx(8.0)


def test_a_planned_penalty_cannot_be_combined_with_the_measured_finish():
    with pytest.raises(ValueError, match="penalty_scope.*'all' with last_prune='measured'"):
        msq_fx.MSQConfig(pruning={"last_prune": "measured", "penalty_scope": "planned"})


def test_a_measured_finish_is_not_warned_of_negative_trace_estimates(monkeypatch, caplog):
    # The traces still set p, but the drops were chosen by the measured loss, not by them.
    from msq_fx.sensitivity import group_traces

    def negative(model, members, *args, **kwargs):
        traces, method = group_traces(model, members, *args, **kwargs)
        return {key: -abs(trace) for key, trace in traces.items()}, method

    qmodel, controller = prepared(config())
    monkeypatch.setattr("msq_fx.controller.group_traces", negative)
    with caplog.at_level("WARNING", logger="msq_fx"):
        records = controller.epoch_end(1, data(), F.cross_entropy)
    assert all(r.hessian_trace < 0 and r.bits_after == 4 for r in records)
    assert "negative Hessian trace" not in caplog.text


def test_a_trial_whose_loss_is_not_finite_stops_the_prune_naming_it(monkeypatch):
    qmodel, controller = prepared(config())
    before = {k: v.clone() for k, v in qmodel.state_dict().items()}
    monkeypatch.setattr("msq_fx.controller.measured_drop_costs",
                        lambda model, groups, *args, **kwargs: {"conv.weight": [float("nan")],
                                                                "fc.weight": [0.2]})
    with pytest.raises(msq_fx.MSQError, match=r"epoch_end\(epoch=1\): the measured finish's "
                                              r"loss is not finite with conv.weight 1 LSB"):
        controller.epoch_end(1, data(), F.cross_entropy)
    after = qmodel.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert controller.history == [] and controller.last_epoch == 0
