"""Specification of MSQController: one test per rule of Algorithm 1 (paper §3, DESIGN.md §4).

The layers are constructed so each rule's outcome is known in advance: latent weights are put on
the n-bit grid with a chosen fraction of codes whose LSBs are non-zero, which fixes the LSB
non-zero rate beta exactly (``lsb_weights``), and parallel branches scaled by very different
factors give layers whose Hessian traces differ by orders of magnitude (``Branches``).
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import msq_fx
import msq_fx.modules
import msq_fx.precision_groups
from msq_fx import quant

IN_FEATURES = 8


class Branches(nn.Module):
    """Parallel bias-free linear layers ``layers.i`` on one input; output i is scaled by scales[i].

    With an MSE loss the Hessian block of layer i is proportional to scales[i]**2, so the scales
    set each layer's sensitivity (Tr(H_i)) independently of its weights.
    """

    def __init__(self, widths, scales=None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(IN_FEATURES, w, bias=False) for w in widths)
        self.scales = list(scales) if scales is not None else [1.0] * len(widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([s * layer(x) for s, layer in zip(self.scales, self.layers)], dim=1)


def prepared(widths, scales=None, **config) -> tuple[nn.Module, msq_fx.MSQController]:
    torch.manual_seed(0)
    qmodel = msq_fx.prepare(Branches(widths, scales), torch.randn(2, IN_FEATURES),
                            msq_fx.MSQConfig.from_dict(config))
    return qmodel, msq_fx.MSQController(qmodel)


def batches(widths, count: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(123)
    return [(torch.randn(32, IN_FEATURES, generator=generator),
             torch.randn(32, sum(widths), generator=generator)) for _ in range(count)]


def latent(qmodel: nn.Module, index: int) -> nn.Parameter:
    """The float latent weight of layers.<index>
    (``layer.weight`` would return the quantized one)."""
    return qmodel.layers[index]._parameters["weight"]


def quantizer(qmodel: nn.Module, index: int) -> msq_fx.modules.WeightFakeQuant:
    return qmodel.layers[index].weight_quantizer


def lsb_weights(shape, nonzero: float, bits: int = 8, k: int = 1, lsb: int = 1,
                seed: int = 0) -> torch.Tensor:
    """Weights exactly on the ``bits``-bit grid whose codes have ``k`` zero LSBs, except a fraction
    ``nonzero`` of them, whose code is raised by ``lsb`` (< 2^k). One weight is -1, so the scale
    max|w| is exactly 1 and the codes are exactly the chosen integers."""
    n = math.prod(shape)
    count = round(nonzero * n)
    assert 0 <= count < n and 0 < lsb < 2**k
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2 ** (bits - k), (n,), generator=generator) * 2**k
    order = torch.randperm(n, generator=generator)
    codes[order[:count]] += lsb
    codes[order[-1]] = 0
    half = 2 ** (bits - 1)
    return ((codes - half).double() / half).float().reshape(shape)


def set_weights(qmodel: nn.Module, index: int, values: torch.Tensor) -> None:
    with torch.no_grad():
        latent(qmodel, index).copy_(values)


def set_betas(qmodel: nn.Module, betas, bits: int = 8, k: int = 1) -> None:
    for index, beta in enumerate(betas):
        shape = latent(qmodel, index).shape
        set_weights(qmodel, index, lsb_weights(shape, beta, bits=bits, k=k, seed=index))


def bits_of(qmodel: nn.Module) -> list[int]:
    return [int(layer.weight_quantizer.bits) for layer in qmodel.layers]


def compression(widths, bits) -> float:
    params = [IN_FEATURES * w for w in widths]
    return 32 * sum(params) / sum(b * p for b, p in zip(bits, params))

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------- the helper itself

def test_lsb_weights_fix_beta_exactly_as_quant_measures_it():
    w = lsb_weights((8, 8), 0.25)
    assert quant.lsb_nonzero_rate(w, 8, 1) == 0.25
    assert quant.lsb_nonzero_rate(lsb_weights((8, 8), 0.0), 8, 1) == 0.0
    assert torch.equal(quant.quantize_value(w, 8), w)  # on the grid: no quantization error


# ------------------------------------------------------------------------- (a) threshold alpha

def test_group_with_beta_below_alpha_loses_p_lsbs_and_one_above_keeps_its_bits():
    widths = [8, 8]
    qmodel, ctl = prepared(widths, prune_threshold=0.3, target_compression=16.0, prune_interval=1)
    set_betas(qmodel, [0.1, 0.6])
    records = ctl.epoch_end(1, batches(widths), F.mse_loss)
    assert bits_of(qmodel) == [7, 8]
    assert [r.lsbs_dropped for r in records] == [1, 0]
    assert [r.beta for r in records] == pytest.approx([0.1, 0.6], abs=1 / 64)


def test_beta_equal_to_alpha_is_not_below_it_and_keeps_the_bits():
    widths = [8, 8]
    qmodel, ctl = prepared(widths, prune_threshold=0.25, target_compression=16.0, prune_interval=1)
    set_betas(qmodel, [0.25, 0.0])  # 16 of 64 codes odd: beta == alpha exactly
    ctl.epoch_end(1, batches(widths), F.mse_loss)
    assert bits_of(qmodel) == [8, 7]


def test_group_with_prune_step_two_loses_two_lsbs():
    widths = [8]
    qmodel, ctl = prepared(widths, target_compression=16.0, prune_interval=1,
                           prune_step_policy="fixed")
    set_weights(qmodel, 0, lsb_weights((8, 8), 0.0, k=2))
    quantizer(qmodel, 0).prune_step.fill_(2)
    (record,) = ctl.epoch_end(1, [], F.mse_loss)
    assert bits_of(qmodel) == [6]
    assert (record.bits_before, record.bits_after, record.lsbs_dropped) == (8, 6, 2)


@pytest.mark.parametrize("p, pruned", [(1, True), (2, False)])
def test_beta_counts_a_weight_whose_p_lsbs_are_not_all_zero(p, pruned):
    # Every code is 2 mod 4: its lowest bit is zero (beta=0 at p=1), its second is not
    # (beta=1 at p=2).
    widths = [8]
    qmodel, ctl = prepared(widths, target_compression=16.0, prune_interval=1,
                           prune_step_policy="fixed")
    set_weights(qmodel, 0, lsb_weights((8, 8), 63 / 64, k=2, lsb=2))
    quantizer(qmodel, 0).prune_step.fill_(p)
    (record,) = ctl.epoch_end(1, [], F.mse_loss)
    assert record.beta == pytest.approx(0.0 if p == 1 else 63 / 64)
    assert bits_of(qmodel) == ([8 - p] if pruned else [8])


# ------------------------------------------------------------------------- (b) order and Gamma

#: Module order deliberately differs from beta order; all four layers have 64 weights, so
#: pruning j of them by one bit gives compression 128 / (32 - j): 4.129, 4.267, 4.414.
ORDER_BETAS = [0.2, 0.5, 0.0, 0.1]


@pytest.mark.parametrize("gamma, pruned, done", [
    (4.1, {2}, True),          # the lowest-beta layer alone reaches Gamma
    (4.2, {2, 3}, True),       # layers.0 is below alpha too but Gamma was already reached
    (4.3, {0, 2, 3}, True),
    (4.5, {0, 2, 3}, False),   # every layer below alpha pruned; layers.1 (beta 0.5) never
])
def test_groups_are_pruned_in_ascending_beta_order_until_gamma_is_reached(gamma, pruned, done):
    widths = [8, 8, 8, 8]
    qmodel, ctl = prepared(widths, prune_threshold=0.3, target_compression=gamma, prune_interval=1)
    set_betas(qmodel, ORDER_BETAS)
    records = ctl.epoch_end(1, batches(widths), F.mse_loss)
    assert {i for i, b in enumerate(bits_of(qmodel)) if b == 7} == pruned
    assert {i for i, b in enumerate(bits_of(qmodel)) if b == 8} == set(range(4)) - pruned
    assert ctl.done is done
    assert ctl.compression() == pytest.approx(compression(widths, bits_of(qmodel)))
    assert (ctl.compression() >= gamma) is done
    assert [r.group for r in records] == [f"layers.{i}.weight" for i in range(4)]


def test_stop_rule_prefers_the_lowest_beta_group_even_when_it_is_smallest():
    # layers.0 (beta 0) is small; layers.1 (beta 0.1) is large. Ascending beta: layers.0 first.
    widths = [2, 32]
    qmodel, ctl = prepared(widths, prune_threshold=0.3, prune_interval=1,
                           target_compression=compression(widths, [7, 8]) - 1e-9)
    set_betas(qmodel, [0.0, 0.1])
    ctl.epoch_end(1, batches(widths), F.mse_loss)
    assert bits_of(qmodel) == [7, 8]
    assert ctl.done


@pytest.mark.parametrize("last_prune, width", [("fit", 7), ("full", 6)])
def test_the_last_prune_drops_only_the_lsbs_the_target_needs_unless_told_full(last_prune, width):
    # p = 2 for layers.0, but one LSB already reaches Gamma: "fit" drops 1, "full" drops 2.
    widths = [32, 2]
    qmodel, ctl = prepared(widths, target_compression=compression(widths, [7, 8]),
                           pruning=dict(threshold=0.3, interval=1, last_prune=last_prune))
    ctl.groups[0].set_prune_step(2)
    set_betas(qmodel, [0.0, 0.5], k=2)
    ctl.epoch_end(1, batches(widths), F.mse_loss)
    assert bits_of(qmodel) == [width, 8]
    assert ctl.done


@pytest.mark.parametrize("drop_order, widths_after", [("beta", [7, 8]), ("omega", [8, 7])])
def test_the_prune_that_reaches_gamma_drops_by_beta_or_by_omega_growth_per_bit(drop_order,
                                                                              widths_after):
    # layers.0: beta 0.5 but ~1e5 times the curvature; layers.1: beta 0.9, insensitive. One
    # drop reaches Gamma: ascending beta takes layers.0, ascending Omega growth layers.1.
    widths = [8, 8]
    qmodel, ctl = prepared(widths, [30.0, 0.1], target_compression=compression(widths, [7, 8]),
                           pruning=dict(threshold=1.0, interval=1, drop_order=drop_order))
    set_betas(qmodel, [0.5, 0.9])
    ctl.epoch_end(1, batches(widths), F.mse_loss)
    assert bits_of(qmodel) == widths_after
    assert ctl.done


def test_omega_growth_per_bit_is_the_trace_times_the_error_added_per_weight_and_lsb():
    widths = [8, 8]
    qmodel, ctl = prepared(widths, [30.0, 0.1], target_compression=16.0,
                           pruning=dict(threshold=1.0, interval=1, drop_order="omega"))
    set_betas(qmodel, [0.5, 0.9])
    group = ctl.groups[0]
    group.set_prune_step(2)
    traces = {id(latent(qmodel, 0)): 3.0}
    q = quantizer(qmodel, 0)
    added = q.quantization_error(latent(qmodel, 0), 6) - q.quantization_error(latent(qmodel, 0), 8)
    assert group.omega_growth_per_bit(traces, 1) == pytest.approx(3.0 * added / (64 * 2))
    group.set_bits(1)
    assert group.omega_growth_per_bit(traces, 1) == math.inf


def test_omega_drop_order_takes_hessian_traces_under_the_fixed_step_policy():
    widths = [8, 8]
    qmodel, ctl = prepared(widths, [30.0, 0.1], target_compression=compression(widths, [7, 8]),
                           pruning=dict(threshold=1.0, interval=1, drop_order="omega",
                                        step_policy="fixed"))
    set_betas(qmodel, [0.5, 0.9])
    records = ctl.epoch_end(1, batches(widths), F.mse_loss)
    assert bits_of(qmodel) == [8, 7]
    assert all(r.hessian_method is not None for r in records)
    assert [r.next_prune_step for r in records] == [1, 1]  # p stays fixed


@pytest.mark.parametrize("scale_after_prune", ["keep", "refit"])
def test_a_prune_keeps_or_refits_the_learned_scales_of_the_groups_it_pruned(scale_after_prune):
    # layers.1 (beta 0.9) is not pruned: its scale stays either way.
    widths = [8, 8]
    qmodel, ctl = prepared(widths, quantization=dict(scale="channel"), target_compression=16.0,
                           pruning=dict(threshold=0.5, interval=1, bn_recalibration_batches=0,
                                        scale_after_prune=scale_after_prune))
    set_betas(qmodel, [0.0, 0.9])
    with torch.no_grad():  # the grid set_betas put the weights on
        for index in range(2):
            quantizer(qmodel, index).learned_scale.fill_(1.0)
    ctl.epoch_end(1, batches(widths), F.mse_loss)
    assert bits_of(qmodel) == [7, 8]
    pruned, kept = quantizer(qmodel, 0).learned_scale, quantizer(qmodel, 1).learned_scale
    refit = quant.best_clip(latent(qmodel, 0), 7, "nested", tuple(pruned.shape))
    assert not torch.equal(refit, torch.ones_like(refit))
    assert torch.equal(pruned, torch.ones_like(pruned) if scale_after_prune == "keep" else refit)
    assert torch.equal(kept, torch.ones_like(kept))


# ------------------------------------------------------------------------- (c) p from Omega

SENSITIVE = [30.0, 0.1, 0.1, 0.1]  # Tr(H) of layers.0 is ~1e5 times the others'


def test_first_prune_uses_p_1_for_every_group():
    widths = [8, 8, 8, 8]
    qmodel, ctl = prepared(widths, SENSITIVE, prune_threshold=1.0, target_compression=16.0,
                           prune_interval=1)
    records = ctl.epoch_end(1, batches(widths), F.mse_loss)
    assert [r.lsbs_dropped for r in records] == [1, 1, 1, 1]
    assert bits_of(qmodel) == [7, 7, 7, 7]


def test_hessian_policy_gives_p_2_to_groups_with_omega_below_the_mean():
    widths = [8, 8, 8, 8]
    qmodel, ctl = prepared(widths, SENSITIVE, prune_threshold=1.0, target_compression=16.0,
                           prune_interval=1)
    records = ctl.epoch_end(1, batches(widths), F.mse_loss)
    omegas = [r.omega for r in records]
    assert omegas[0] > 1e3 * max(omegas[1:])  # the construction works: layers.0 is sensitive
    mean = sum(omegas) / len(omegas)
    assert [r.next_prune_step for r in records] == [2 if o < mean else 1 for o in omegas]
    assert [int(quantizer(qmodel, i).prune_step) for i in range(4)] == [1, 2, 2, 2]


@pytest.mark.parametrize("omega_scale", ["total", "per_weight"])
def test_omega_is_compared_in_total_or_per_weight(omega_scale):
    # Equal per-weight curvature and error; layers.1 has 8 times the weights. In total its
    # Omega is about 64 times layers.0's (p = 1 for it, 2 for the small one); per weight they
    # are comparable, so neither is judged more sensitive for its size alone.
    widths = [4, 32]
    qmodel, ctl = prepared(widths, target_compression=16.0,
                           pruning=dict(threshold=1.0, interval=1, omega_scale=omega_scale))
    records = ctl.epoch_end(1, batches(widths), F.mse_loss)
    totals = [r.hessian_trace * quantizer(qmodel, i).quantization_error(latent(qmodel, i), 8)
              for i, r in enumerate(records)]
    params = [IN_FEATURES * w for w in widths]
    expected = totals if omega_scale == "total" else [t / n**2 for t, n in zip(totals, params)]
    assert [r.omega for r in records] == pytest.approx(expected, rel=1e-6)
    if omega_scale == "total":
        assert [r.next_prune_step for r in records] == [2, 1]
    else:
        assert 0.1 < records[0].omega / records[1].omega < 10


def test_second_prune_drops_the_p_assigned_after_the_first():
    widths = [8, 8, 8, 8]
    qmodel, ctl = prepared(widths, SENSITIVE, prune_threshold=1.0, target_compression=16.0,
                           prune_interval=1)
    data = batches(widths)
    ctl.epoch_end(1, data, F.mse_loss)
    records = ctl.epoch_end(2, data, F.mse_loss)
    assert [r.lsbs_dropped for r in records] == [1, 2, 2, 2]
    assert bits_of(qmodel) == [6, 5, 5, 5]
    omegas = [r.omega for r in records]
    mean = sum(omegas) / len(omegas)
    assert [r.next_prune_step for r in records] == [2 if o < mean else 1 for o in omegas]


def test_equal_omegas_are_not_below_their_mean_and_keep_p_1():
    # On-grid weights have no quantization error, so every Omega is 0 == mean(Omega).
    widths = [8, 8]
    qmodel, ctl = prepared(widths, [30.0, 0.1], prune_threshold=0.5, target_compression=16.0,
                           prune_interval=1)
    set_betas(qmodel, [0.0, 0.0], k=2)
    records = ctl.epoch_end(1, batches(widths), F.mse_loss)
    assert [r.omega for r in records] == [0.0, 0.0]
    assert [r.next_prune_step for r in records] == [1, 1]


def test_fixed_policy_keeps_p_1_and_computes_no_hessian():
    widths = [8, 8, 8, 8]
    qmodel, ctl = prepared(widths, SENSITIVE, prune_threshold=1.0, target_compression=16.0,
                           prune_interval=1, prune_step_policy="fixed")
    for epoch in (1, 2, 3):
        records = ctl.epoch_end(epoch, [], F.mse_loss)  # no batches needed: no Hessian
        assert [r.lsbs_dropped for r in records] == [1, 1, 1, 1]
        assert all(r.next_prune_step == 1 and r.omega is None and r.hessian_trace is None
                   for r in records)
    assert bits_of(qmodel) == [5, 5, 5, 5]


# ------------------------------------------------------------------------- (d) the floor

def test_a_two_bit_prune_is_clipped_at_min_bits():
    widths = [8, 8]
    qmodel, ctl = prepared(widths, prune_threshold=0.5, target_compression=16.0, prune_interval=1,
                           prune_step_policy="fixed", min_bits=2)
    for index in (0, 1):
        quantizer(qmodel, index).bits.fill_(3)
        quantizer(qmodel, index).prune_step.fill_(2)
        set_weights(qmodel, index, lsb_weights((8, 8), 0.0, bits=3, k=2, seed=index))
    records = ctl.epoch_end(1, [], F.mse_loss)
    assert bits_of(qmodel) == [2, 2]
    assert [(r.bits_before, r.bits_after, r.lsbs_dropped) for r in records] == [(3, 2, 1)] * 2


def test_groups_at_min_bits_are_not_pruned_reported_or_regularized():
    widths = [8, 8]
    qmodel, ctl = prepared(widths, prune_threshold=1.0, target_compression=10.0, prune_interval=1,
                           prune_step_policy="fixed", min_bits=3)
    quantizer(qmodel, 0).bits.fill_(3)
    reg = ctl.regularization()
    reg.backward()
    assert latent(qmodel, 0).grad is None and latent(qmodel, 1).grad is not None
    records = ctl.epoch_end(1, [], F.mse_loss)
    assert [r.group for r in records] == ["layers.1.weight"]
    assert bits_of(qmodel) == [3, 7]


def test_repeated_pruning_never_goes_below_min_bits_and_ends_at_the_floor():
    widths = [8, 8, 8, 8]
    qmodel, ctl = prepared(widths, SENSITIVE, prune_threshold=1.0, prune_interval=1,
                           target_compression=32 / 3, min_bits=3)
    data, trajectory = batches(widths), [bits_of(qmodel)]
    for epoch in range(1, 9):
        ctl.epoch_end(epoch, data, F.mse_loss)
        trajectory.append(bits_of(qmodel))
    assert all(b >= 3 for row in trajectory for b in row)
    assert all(a >= b for old, new in zip(trajectory, trajectory[1:]) for a, b in zip(old, new))
    assert trajectory[-1] == [3, 3, 3, 3] and ctl.done
    assert any(r.lsbs_dropped == 2 for r in ctl.history)  # p = 2 did occur along the way


# ------------------------------------------------------------------------- (e) after Gamma

def test_after_gamma_regularization_is_zero_and_pruning_stops_for_good():
    widths = [8, 8]
    qmodel, ctl = prepared(widths, prune_threshold=0.3, prune_interval=1,
                           target_compression=compression(widths, [7, 8]) - 1e-9)
    set_betas(qmodel, [0.0, 0.5])
    assert ctl.regularization().item() > 0
    ctl.epoch_end(1, batches(widths), F.mse_loss)
    assert ctl.done and bits_of(qmodel) == [7, 8]
    set_betas(qmodel, [0.0, 0.0])  # would be pruned again if pruning still ran
    for epoch in (2, 3, 4):
        assert torch.equal(ctl.regularization(), torch.zeros(()))
        assert ctl.epoch_end(epoch, batches(widths), F.mse_loss) == []
    assert bits_of(qmodel) == [7, 8]
    assert len(ctl.history) == 2  # only the first round's rows


def test_controller_of_a_model_already_at_gamma_never_prunes():
    widths = [8, 8]
    qmodel, ctl = prepared(widths, init_bits=4, target_compression=8.0, prune_interval=1)
    set_betas(qmodel, [0.0, 0.0], bits=4)
    assert ctl.done
    assert torch.equal(ctl.regularization(), torch.zeros(()))
    assert ctl.epoch_end(1, batches(widths), F.mse_loss) == []
    assert bits_of(qmodel) == [4, 4]


# ------------------------------------------------------------------------- (f) interval I

def test_epoch_end_prunes_only_when_the_interval_divides_the_epoch():
    widths = [8]
    qmodel, ctl = prepared(widths, prune_threshold=0.3, target_compression=16.0, prune_interval=3)
    set_betas(qmodel, [0.0], k=2)
    pruned_at = []
    for epoch in range(1, 8):
        bits = bits_of(qmodel)
        # Off-interval epochs need no batches; an empty list would fail a Hessian.
        records = ctl.epoch_end(epoch, batches(widths) if epoch % 3 == 0 else [], F.mse_loss)
        if records:
            pruned_at.append(epoch)
        assert (bits_of(qmodel) != bits) is (epoch % 3 == 0)
    assert pruned_at == [3, 6]
    assert {r.epoch for r in ctl.history} == {3, 6}


def test_epochs_may_be_skipped_and_only_multiples_of_the_interval_prune():
    widths = [8]
    qmodel, ctl = prepared(widths, target_compression=16.0, prune_interval=2,
                           prune_step_policy="fixed")
    set_betas(qmodel, [0.0])
    assert ctl.epoch_end(3, [], F.mse_loss) == []
    assert len(ctl.epoch_end(4, [], F.mse_loss)) == 1
    assert bits_of(qmodel) == [7]


# ------------------------------------------------------------------------- (g) regularization

def test_regularization_is_lambda_times_the_lsb_l1_of_the_active_groups():
    # layers.0/4: fixed width (first/last); layers.3: at the floor; layers.1: 8 bits, p=1;
    # layers.2: 6 bits, p=2. Only layers.1 and layers.2 are regularized, each at its own p.
    widths = [4, 8, 16, 8, 4]
    lam = 3e-3
    qmodel, ctl = prepared(widths, reg_strength=lam, first_last="fixed", min_bits=2)
    quantizer(qmodel, 2).bits.fill_(6)
    quantizer(qmodel, 2).prune_step.fill_(2)
    quantizer(qmodel, 3).bits.fill_(2)
    expected = lam * sum(float(quant.lsb_value(latent(qmodel, i).detach(), bits, k).abs().sum())
                         for i, bits, k in ((1, 8, 1), (2, 6, 2)))
    reg = ctl.regularization()
    assert reg.item() == pytest.approx(expected, rel=1e-5)
    assert expected > 0
    reg.backward()
    assert ([latent(qmodel, i).grad is not None for i in range(5)]
            == [False, True, True, False, False])


def test_weight_unit_regularization_counts_each_lsb_residual_times_its_layer_s_step():
    widths = [8, 16]
    lam = 3e-3
    qmodel, ctl = prepared(widths, pruning=dict(reg_strength=lam, penalty_units="weight"))
    quantizer(qmodel, 1).bits.fill_(5)
    expected = lam * sum(
        float((quant.lsb_value(w, bits, 1).abs() * quant.weight_scale(w) * 2.0 ** (1 - bits)).sum())
        for w, bits in ((latent(qmodel, 0).detach(), 8), (latent(qmodel, 1).detach(), 5)))
    assert ctl.regularization().item() == pytest.approx(expected, rel=1e-5)


def test_regularization_is_zero_when_lambda_is_zero():
    qmodel, ctl = prepared([8, 8], reg_strength=0.0)
    assert ctl.regularization().item() == 0.0


def test_regularization_gradient_pulls_each_weight_toward_zero_lsbs():
    # dR/dw = lambda * sign(B_p) * dx/dw with x = w 2^(n-1) / S + 2^(n-1) (paper Eq. 7).
    lam = 1e-2
    qmodel, ctl = prepared([8], reg_strength=lam, first_last="quantize")
    ctl.regularization().backward()
    w = latent(qmodel, 0).detach()
    b = quant.lsb_value(w, 8, 1)
    expected = lam * torch.sign(b) * (2**7 / w.abs().max())
    inside = (b.abs() < 1) & (b != 0)  # |B_1| <= 1; the clamped top bin has no slope
    assert int(inside.sum()) > 48
    assert torch.allclose(latent(qmodel, 0).grad[inside], expected[inside], rtol=1e-5)


# ------------------------------------------------------------------------- (h) history

def test_history_records_every_active_group_at_every_prune():
    widths = [8, 8, 8, 8]
    qmodel, ctl = prepared(widths, SENSITIVE, prune_threshold=1.0, target_compression=16.0,
                           prune_interval=1)
    data = batches(widths)
    first = ctl.epoch_end(1, data, F.mse_loss)
    first_compression = ctl.compression()
    second = ctl.epoch_end(2, data, F.mse_loss)
    assert ctl.history == first + second
    assert [(r.epoch, r.group) for r in ctl.history] == [
        (e, f"layers.{i}.weight") for e in (1, 2) for i in range(4)]
    assert all(r.kind == "linear" and r.params == 64 for r in ctl.history)
    assert [r.bits_before for r in second] == [r.bits_after for r in first]
    assert all(r.lsbs_dropped == r.bits_before - r.bits_after for r in ctl.history)
    assert all(r.compression == pytest.approx(first_compression) for r in first)
    assert all(r.compression == pytest.approx(ctl.compression()) for r in second)
    assert [r.bits_after for r in second] == bits_of(qmodel)
    assert [r.next_prune_step for r in second] == [int(quantizer(qmodel, i).prune_step)
                                                   for i in range(4)]


def test_history_omega_is_trace_times_quantization_error_at_the_pre_prune_width():
    widths = [8, 8, 8, 8]
    qmodel, ctl = prepared(widths, SENSITIVE, prune_threshold=1.0, target_compression=16.0,
                           prune_interval=1)
    records = ctl.epoch_end(1, batches(widths), F.mse_loss)
    for i, r in enumerate(records):
        error = quant.quantization_error(latent(qmodel, i), r.bits_before)
        assert r.hessian_trace > 0
        assert r.omega == pytest.approx(r.hessian_trace * error, rel=1e-9)
        assert r.beta == pytest.approx(quant.lsb_nonzero_rate(latent(qmodel, i).detach(), 8, 1))


def test_a_trace_margin_adds_that_many_standard_errors_to_every_layer_s_trace():
    widths = [8, 8, 8, 8]

    def traces(margin: float) -> torch.Tensor:
        _, ctl = prepared(widths, SENSITIVE, target_compression=16.0,
                          pruning={"threshold": 1.0, "interval": 1},
                          hessian={"trace_margin": margin})
        return torch.tensor([r.hessian_trace for r in ctl.epoch_end(1, batches(widths),
                                                                     F.mse_loss)],
                            dtype=torch.float64)

    mean, one, two = traces(0.0), traces(1.0), traces(2.0)
    stderr = one - mean  # the same probes in every run: only the margin differs
    assert (stderr > 0).all()
    torch.testing.assert_close(two - mean, 2 * stderr, rtol=1e-9, atol=1e-12 * float(mean.max()))


def test_hessian_traces_follow_the_constructed_sensitivity():
    # Tr(H_i) of MSE through a linear branch scales with scales[i]**2.
    widths = [8, 8]
    qmodel, ctl = prepared(widths, [10.0, 1.0], prune_threshold=1.0, target_compression=16.0,
                           prune_interval=1, hessian_max_samples=64, hessian_min_samples=64)
    records = ctl.epoch_end(1, batches(widths), F.mse_loss)
    assert records[0].hessian_trace / records[1].hessian_trace == pytest.approx(100, rel=0.2)


def test_history_table_has_one_row_per_record_with_its_values():
    widths = [8, 8]
    qmodel, ctl = prepared(widths, prune_threshold=0.3, target_compression=16.0, prune_interval=1)
    set_betas(qmodel, [0.0, 0.5])
    ctl.epoch_end(1, batches(widths), F.mse_loss)
    lines = ctl.history_table().splitlines()
    for header in ("epoch", "group", "kind", "params", "beta", "Omega", "bits before",
                   "bits after", "next p", "compression"):
        assert header in lines[0]
    rows = [line.split() for line in lines[2:]]
    assert len(rows) == len(ctl.history) == 2
    for row, record in zip(rows, ctl.history):
        assert row[:4] == [str(record.epoch), record.group, "linear", str(record.params)]
        assert float(row[4]) == pytest.approx(record.beta, abs=5e-4)
        assert row[6:] == [str(record.bits_before), str(record.bits_after),
                           str(record.next_prune_step), f"{record.compression:.2f}"]
    assert rows[0][6:8] == ["8", "7"] and rows[1][6:8] == ["8", "8"]


def test_history_table_shows_a_dash_for_omega_without_hessian_and_honours_tablefmt():
    qmodel, ctl = prepared([8], target_compression=16.0, prune_interval=1,
                           prune_step_policy="fixed")
    ctl.epoch_end(1, [], F.mse_loss)
    assert ctl.history_table().splitlines()[2].split()[5] == "-"
    assert ctl.history_table(tablefmt="github").splitlines()[0].startswith("|")


def test_history_table_of_prunes_counted_in_steps_has_a_step_column():
    qmodel, ctl = prepared([8], target_compression=16.0,
                           pruning={"interval": 2, "interval_unit": "step",
                                    "step_policy": "fixed", "threshold": 1.0})
    for step in (1, 2, 3, 4):
        ctl.step_end(step, [], F.mse_loss)
    lines = ctl.history_table().splitlines()
    assert lines[0].split()[:3] == ["epoch", "step", "group"]
    assert [line.split()[:2] for line in lines[2:]] == [["0", "2"], ["0", "4"]]


def test_history_is_empty_before_the_first_prune():
    qmodel, ctl = prepared([8], prune_interval=5)
    ctl.epoch_end(1, [], F.mse_loss)
    assert ctl.history == []
    assert len(ctl.history_table().splitlines()) == 2  # header and rule only


# ------------------------------------------------------------------------- (i) errors

@pytest.mark.parametrize("epoch", [0, -1, 1.0, "1"])
def test_epoch_end_rejects_an_epoch_that_is_not_a_positive_int(epoch):
    qmodel, ctl = prepared([8], prune_interval=1)
    with pytest.raises(ValueError, match="count completed epochs from 1"):
        ctl.epoch_end(epoch, batches([8]), F.mse_loss)
    assert ctl.history == [] and bits_of(qmodel) == [8]


@pytest.mark.parametrize("again", [3, 2])
def test_epoch_end_rejects_an_epoch_already_processed(again):
    qmodel, ctl = prepared([8], prune_interval=5)
    ctl.epoch_end(3, [], F.mse_loss)
    with pytest.raises(ValueError, match="epoch 3 was already processed; continue with epoch 4"):
        ctl.epoch_end(again, [], F.mse_loss)


def test_epoch_end_with_no_batches_for_the_hessian_is_refused_without_pruning():
    qmodel, ctl = prepared([8], prune_threshold=1.0, target_compression=16.0, prune_interval=1)
    with pytest.raises(ValueError, match="yielded no"):
        ctl.epoch_end(1, iter(()), F.mse_loss)
    assert bits_of(qmodel) == [8] and ctl.history == [] and ctl.prune_count == 0


def test_controller_of_an_unprepared_model_is_refused():
    with pytest.raises(msq_fx.MSQError, match=r"msq_fx.prepare\(\)"):
        msq_fx.MSQController(Branches([8]))


def test_controller_defaults_to_the_config_stored_by_prepare():
    qmodel, ctl = prepared([8], prune_interval=7, target_compression=5.0)
    # The flat form is the older files' form: it migrates to the full last prune they ran with.
    assert ctl.config == msq_fx.MSQConfig(target_compression=5.0,
                                          pruning=dict(interval=7, last_prune="full"))


# ------------------------------------------------------------------------- robustness

def test_a_failed_epoch_end_can_be_retried_with_good_batches():
    widths = [8, 8]
    qmodel, ctl = prepared(widths, target_compression=16.0, prune_interval=1)
    set_betas(qmodel, [0.0, 0.0])
    with pytest.raises(ValueError, match="yielded no"):
        ctl.epoch_end(1, [], F.mse_loss)
    records = ctl.epoch_end(1, batches(widths), F.mse_loss)
    assert [r.bits_after for r in records] == [7, 7]


def test_beta_counts_only_the_lsbs_a_prune_clipped_at_the_floor_would_drop():
    # At 3 bits with p = 2 and a 2-bit floor, only the lowest bit can go: beta is measured on it.
    widths = [8]
    qmodel, ctl = prepared(widths, target_compression=15.0, prune_interval=1, min_bits=2,
                           prune_step_policy="fixed")
    quantizer(qmodel, 0).bits.fill_(3)
    quantizer(qmodel, 0).prune_step.fill_(2)
    set_weights(qmodel, 0, lsb_weights((8, IN_FEATURES), 0.0, bits=3, k=1))
    # Every other code has its second bit set: beta over 2 bits would be about 0.5.
    records = ctl.epoch_end(1, batches(widths), F.mse_loss)
    assert records[0].beta == 0.0
    assert bits_of(qmodel) == [2]


def test_history_table_keeps_its_fixed_decimals():
    widths = [8, 8]
    qmodel, ctl = prepared(widths, target_compression=16.0, prune_interval=1)
    set_betas(qmodel, [0.5, 0.0])
    ctl.epoch_end(1, batches(widths), F.mse_loss)
    assert "0.500" in ctl.history_table()


# ------------------------------------------------------------------ how H v is computed

class SmallConvNet(nn.Module):
    """Conv -> ReLU -> Linear: a loss that is not quadratic in the weights, with kinks that the
    finite differences must hold fixed to agree with the double backward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.conv(x)).flatten(1))


def conv_net_traces(pruning=None, **hessian) -> list[msq_fx.precision_groups.PruneRecord]:
    torch.manual_seed(0)
    config = msq_fx.MSQConfig(pruning=dict(threshold=1.0, interval=1, **(pruning or {})),
                              hessian=dict(min_samples=4, max_samples=4, **hessian))
    qmodel = msq_fx.prepare(SmallConvNet(), torch.randn(2, 3, 6, 6), config)
    generator = torch.Generator().manual_seed(5)
    data = [(torch.randn(16, 3, 6, 6, generator=generator),
             torch.randint(0, 5, (16,), generator=generator))]
    return msq_fx.MSQController(qmodel).epoch_end(1, data, F.cross_entropy)


def test_finite_difference_traces_equal_the_double_backward_at_the_quantized_point():
    # Same probes (same seed), so the two methods agree sample for sample up to the step's O(h^2)
    # and float32 rounding; displacing the latents instead would be swallowed by rounding.
    exact = conv_net_traces(method="autograd")
    by_differences = conv_net_traces(method="finite_difference")
    assert [r.hessian_method for r in exact] == ["autograd"] * 2
    assert [r.hessian_method for r in by_differences] == ["finite_difference"] * 2
    for a, b in zip(exact, by_differences):
        assert a.hessian_trace > 0
        assert b.hessian_trace == pytest.approx(a.hessian_trace, rel=1e-2)


def test_finite_difference_traces_are_exact_for_a_quadratic_loss():
    widths = [8, 8]
    exact = prepared(widths, SENSITIVE[:2], prune_threshold=1.0, prune_interval=1,
                     target_compression=16.0)[1].epoch_end(1, batches(widths), F.mse_loss)
    by_differences = prepared(widths, SENSITIVE[:2], prune_threshold=1.0, prune_interval=1,
                              target_compression=16.0, hessian_method="finite_difference",
                              )[1].epoch_end(1, batches(widths), F.mse_loss)
    for a, b in zip(exact, by_differences):
        assert b.hessian_trace == pytest.approx(a.hessian_trace, rel=1e-3)


def test_finite_differences_leave_latents_quantizers_and_grads_as_they_were():
    torch.manual_seed(0)
    qmodel = msq_fx.prepare(SmallConvNet(), torch.randn(2, 3, 6, 6),
                            msq_fx.MSQConfig(hessian=dict(method="finite_difference"),
                                             pruning=dict(interval=1)))
    latents = {name: p.detach().clone() for name, p in qmodel.named_parameters()}
    qmodel.fc._parameters["weight"].grad = torch.full_like(latents["fc.weight"], 7.0)
    msq_fx.MSQController(qmodel).epoch_end(
        1, [(torch.randn(4, 3, 6, 6), torch.randint(0, 5, (4,)))], F.cross_entropy)
    for name, p in qmodel.named_parameters():
        assert torch.equal(p.detach(), latents[name]), name
    assert torch.equal(qmodel.fc._parameters["weight"].grad,
                       torch.full_like(latents["fc.weight"], 7.0))
    assert not qmodel.conv.weight_quantizer._forward_hooks


OUT_OF_MEMORY = "DefaultCPUAllocator: can't allocate memory: you tried to allocate 1073741824 bytes"
NO_SECOND_DERIVATIVE = "the derivative for '_some_fused_kernel_backward' is not implemented."


def failing_double_backward(message: str):
    def hutchinson_traces(*args, **kwargs):
        raise RuntimeError(message)
    return hutchinson_traces


@pytest.mark.parametrize("message", [OUT_OF_MEMORY, NO_SECOND_DERIVATIVE])
def test_auto_falls_back_to_finite_differences_and_warns(monkeypatch, caplog, message):
    monkeypatch.setattr("msq_fx.sensitivity.hutchinson_traces", failing_double_backward(message))
    with caplog.at_level("WARNING", logger="msq_fx"):
        records = conv_net_traces()
    assert [r.hessian_method for r in records] == ["finite_difference"] * 2
    assert all(r.hessian_trace > 0 for r in records)
    assert "finite differences" in caplog.text and message.split(":")[0] in caplog.text


class RoIPooledNet(nn.Module):
    """A conv whose features go through torchvision's roi_align (a C++ op with no double
    backward, as in every R-CNN head) into a linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 2 * 2, 5)

    def forward(self, x):
        from torchvision.ops import roi_align
        boxes = torch.tensor([[0.0, 0.0, 5.0, 5.0]]).expand(x.shape[0], 4)
        boxes = torch.cat([torch.arange(x.shape[0], dtype=x.dtype)[:, None], boxes], dim=1)
        return self.fc(roi_align(self.conv(x), boxes, output_size=2).flatten(1))


def test_auto_falls_back_to_finite_differences_for_torchvision_roi_align():
    torch.manual_seed(0)
    qmodel = msq_fx.prepare(RoIPooledNet(), torch.randn(2, 3, 6, 6),
                            msq_fx.MSQConfig(pruning=dict(threshold=1.0, interval=1),
                                             hessian=dict(min_samples=2, max_samples=2)))
    data = [(torch.randn(4, 3, 6, 6), torch.randint(0, 5, (4,)))]
    records = msq_fx.MSQController(qmodel).epoch_end(1, data, F.cross_entropy)
    assert {r.hessian_method for r in records} == {"finite_difference"}
    assert all(math.isfinite(r.hessian_trace) for r in records)
    assert any(r.hessian_trace != 0 for r in records)


class NormOfZeroVectors(nn.Module):
    """Normalizes what a bias-free linear makes of its input, as cosine attention does: where
    the input is zero (a padded token) the norm's second derivative is NaN, its first
    derivative finite."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4, bias=False)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(F.normalize(self.fc(x), dim=-1))


def test_auto_falls_back_to_finite_differences_where_the_double_backward_is_not_finite(caplog):
    torch.manual_seed(0)
    inputs, targets = torch.randn(6, 4), torch.randint(0, 3, (6,))
    inputs[::2] = 0  # padded tokens
    config = msq_fx.MSQConfig(pruning=dict(threshold=1.0, interval=1))
    qmodel = msq_fx.prepare(NormOfZeroVectors(), (inputs,), config)
    with caplog.at_level("WARNING", logger="msq_fx"):
        records = msq_fx.MSQController(qmodel, config).epoch_end(1, [(inputs, targets)],
                                                                 F.cross_entropy)
    assert {r.hessian_method for r in records} == {"finite_difference"}
    assert all(math.isfinite(r.hessian_trace) for r in records)
    assert "non-finite Hessian trace for fc.weight" in caplog.text


class LossInTrainMode(nn.Module):
    """Like a torchvision detector: ``model(x, targets)`` returns its losses in train mode and
    its predictions in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 5)

    def forward(self, x, targets=None):
        logits = self.fc(self.conv(x).mean((2, 3)))
        return {"loss_classifier": F.cross_entropy(logits, targets)} if self.training else logits


@pytest.mark.parametrize("method", ["autograd", "finite_difference"])
def test_the_hessian_takes_a_train_mode_loss_when_asked(method):
    torch.manual_seed(0)
    config = msq_fx.MSQConfig(pruning=dict(threshold=1.0, interval=1),
                              hessian=dict(min_samples=2, max_samples=2, method=method,
                                           model_mode="train"))
    qmodel = msq_fx.prepare(LossInTrainMode(), torch.randn(2, 3, 6, 6), config).eval()
    batches = [((torch.randn(4, 3, 6, 6), torch.randint(0, 5, (4,))), None)]
    records = msq_fx.MSQController(qmodel).epoch_end(
        1, batches, lambda losses, _: sum(losses.values()))
    assert {r.hessian_method for r in records} == {method}
    assert all(math.isfinite(r.hessian_trace) and r.hessian_trace != 0 for r in records)
    assert not any(module.training for module in qmodel.modules())


def test_the_hessian_runs_in_eval_mode_by_default():
    torch.manual_seed(0)
    qmodel = msq_fx.prepare(LossInTrainMode(), torch.randn(2, 3, 6, 6),
                            msq_fx.MSQConfig(pruning=dict(threshold=1.0, interval=1),
                                             hessian=dict(min_samples=2, max_samples=2)))
    seen = []
    msq_fx.MSQController(qmodel.train()).epoch_end(
        1, [(torch.randn(4, 3, 6, 6), torch.randint(0, 5, (4,)))],
        lambda outputs, targets: seen.append(type(outputs)) or F.cross_entropy(outputs, targets))
    assert seen and set(seen) == {torch.Tensor}
    assert all(module.training for module in qmodel.modules())


def test_explicit_autograd_without_a_second_derivative_names_both_ways_out(monkeypatch):
    monkeypatch.setattr("msq_fx.sensitivity.hutchinson_traces",
                        failing_double_backward(NO_SECOND_DERIVATIVE))
    with pytest.raises(RuntimeError, match="'method': 'finite_difference'.*'step_policy': 'fixed'"):
        conv_net_traces(method="autograd")


def test_explicit_autograd_out_of_memory_is_raised_as_is(monkeypatch):
    monkeypatch.setattr("msq_fx.sensitivity.hutchinson_traces",
                        failing_double_backward(OUT_OF_MEMORY))
    with pytest.raises(RuntimeError, match="can't allocate memory"):
        conv_net_traces(method="autograd")


def test_auto_does_not_hide_other_errors_of_the_double_backward(monkeypatch):
    monkeypatch.setattr("msq_fx.sensitivity.hutchinson_traces",
                        failing_double_backward("shape mismatch in layer fc"))
    with pytest.raises(RuntimeError, match="shape mismatch in layer fc"):
        conv_net_traces()


def test_records_say_no_hessian_method_under_the_fixed_policy():
    assert {r.hessian_method for r in conv_net_traces(pruning={"step_policy": "fixed"})} == {None}


def test_history_from_a_checkpoint_without_hessian_method_loads():
    records = conv_net_traces()
    state = {"last_epoch": 1, "prune_count": 1, "done": False,
             "history": [{k: v for k, v in dataclasses.asdict(r).items() if k != "hessian_method"}
                         for r in records]}
    torch.manual_seed(0)
    qmodel = msq_fx.prepare(SmallConvNet(), torch.randn(2, 3, 6, 6), msq_fx.MSQConfig())
    controller = msq_fx.MSQController(qmodel)
    controller.load_state_dict(state)
    assert [r.hessian_method for r in controller.history] == [None, None]


# ------------------------------------------------------------------ Hessian batches in chunks

def chunked_traces(chunk_size, method="autograd", data=None) -> list[float]:
    torch.manual_seed(0)
    qmodel = msq_fx.prepare(SmallConvNet(), torch.randn(2, 3, 6, 6),
                            msq_fx.MSQConfig(pruning=dict(threshold=1.0, interval=1),
                                             hessian=dict(min_samples=3, max_samples=3,
                                                          method=method, chunk_size=chunk_size,
                                                          batches=2)))
    generator = torch.Generator().manual_seed(5)
    data = data or [(torch.randn(n, 3, 6, 6, generator=generator),
                     torch.randint(0, 5, (n,), generator=generator)) for n in (7, 4)]
    records = msq_fx.MSQController(qmodel).epoch_end(1, data, F.cross_entropy)
    return [r.hessian_trace for r in records]


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 100])
def test_hessian_in_chunks_gives_the_traces_of_the_whole_batches(chunk_size):
    # Batches of 7 and 4 samples: chunks of 3 leave remainders, weighted by their share.
    assert chunked_traces(chunk_size) == pytest.approx(chunked_traces(None), rel=1e-5)


def test_finite_differences_in_chunks_give_the_traces_of_the_whole_batches():
    whole = chunked_traces(None, "finite_difference")
    assert chunked_traces(2, "finite_difference") == pytest.approx(whole, rel=1e-3)


def test_hessian_chunks_split_every_tensor_of_tuple_inputs():
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = SmallConvNet()

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.net(x + y)

    torch.manual_seed(0)
    example = (torch.randn(2, 3, 6, 6), torch.randn(2, 3, 6, 6))
    generator = torch.Generator().manual_seed(5)
    data = [((torch.randn(6, 3, 6, 6, generator=generator),
              torch.randn(6, 3, 6, 6, generator=generator)),
             torch.randint(0, 5, (6,), generator=generator))]
    model, traces = TwoInputs(), {}
    for chunk_size in (None, 2):
        qmodel = msq_fx.prepare(model, example,
                                msq_fx.MSQConfig(pruning=dict(threshold=1.0, interval=1),
                                                 hessian=dict(min_samples=2, max_samples=2,
                                                              chunk_size=chunk_size)))
        records = msq_fx.MSQController(qmodel).epoch_end(1, data, F.cross_entropy)
        traces[chunk_size] = [r.hessian_trace for r in records]
    assert traces[2] == pytest.approx(traces[None], rel=1e-5)


def test_hessian_chunks_of_non_tensor_inputs_are_refused_with_the_batch_index():
    torch.manual_seed(0)
    qmodel = msq_fx.prepare(SmallConvNet(), torch.randn(2, 3, 6, 6),
                            msq_fx.MSQConfig(pruning=dict(interval=1), hessian=dict(chunk_size=2)))
    with pytest.raises(ValueError, match="Hessian batch 0 are a dict.*hessian.chunk_size=None"):
        msq_fx.MSQController(qmodel).epoch_end(1, [({"x": 1}, None)], F.cross_entropy)


def test_auto_does_not_fall_back_under_torch_distributed_and_says_what_to_set(monkeypatch):
    # A rank that restarted with another method would meet the others' all-reduce out of step.
    monkeypatch.setattr("msq_fx.sensitivity.distributed_mean", lambda: (lambda values: values))
    monkeypatch.setattr("msq_fx.sensitivity.hutchinson_traces",
                        failing_double_backward(OUT_OF_MEMORY))
    with pytest.raises(RuntimeError, match="under torch.distributed 'auto' does not fall back.*"
                                           "'chunk_size'.*'method': 'finite_difference'"):
        conv_net_traces()


@pytest.mark.parametrize("frozen", [True, False])
def test_the_config_decides_whether_finite_differences_freeze_kinks(monkeypatch, frozen):
    seen = []
    real = msq_fx.sensitivity.finite_difference_traces

    def spy(*args, **kwargs):
        seen.append(kwargs["frozen_kinks"])
        return real(*args, **kwargs)

    monkeypatch.setattr("msq_fx.sensitivity.finite_difference_traces", spy)
    conv_net_traces(method="finite_difference", frozen_kinks=frozen)
    assert seen == [frozen]


def test_a_target_of_32_over_min_bits_is_warned_to_end_in_uniform_precision(caplog):
    with caplog.at_level("WARNING", logger="msq_fx"):
        prepared([4, 4], target_compression=16.0, min_bits=2)
    assert "uniform precision" in caplog.text and "equal to 32/min_bits" in caplog.text


def test_a_target_with_room_for_mixed_precision_is_not_warned(caplog):
    with caplog.at_level("WARNING", logger="msq_fx"):
        prepared([4, 4], target_compression=10.67, min_bits=2)
    assert "uniform precision" not in caplog.text


def test_omega_growth_per_bit_per_weight_takes_the_average_trace():
    widths = [8, 8]
    qmodel, ctl = prepared(widths, [30.0, 0.1], target_compression=16.0,
                           pruning=dict(threshold=1.0, interval=1, drop_order="omega"))
    group = ctl.groups[0]
    traces = {id(latent(qmodel, 0)): 3.0}
    total = group.omega_growth_per_bit(traces, 1)
    assert total > 0
    assert group.omega_growth_per_bit(traces, 1, per_weight=True) == pytest.approx(total / 64)


def test_the_omega_drop_order_follows_the_omega_scale():
    # layers.0 holds 16x the weights of layers.1 at 9x less curvature per weight, and both lose
    # as much per weight in a drop: by the raw trace layers.0 costs 16/9 times more per bit
    # saved, by the average trace 9 times less.
    widths = [64, 4]
    orders = {}
    for omega_scale in ("total", "per_weight"):
        qmodel, ctl = prepared(widths, [10.0, 30.0],
                               target_compression=compression(widths, [8, 7]),
                               pruning=dict(threshold=1.0, interval=1, drop_order="omega",
                                            omega_scale=omega_scale))
        set_betas(qmodel, [0.5, 0.5])
        ctl.epoch_end(1, batches(widths), F.mse_loss)
        orders[omega_scale] = bits_of(qmodel)
    assert orders == {"total": [8, 7], "per_weight": [7, 8]}


@pytest.mark.parametrize("omega_scale, widths_after", [("total", [8, 7]),
                                                      ("per_weight", [7, 8])])
def test_the_one_shot_allocation_follows_the_omega_scale(omega_scale, widths_after):
    from msq_fx.allocation import allocate_bits_once

    widths = [64, 4]  # as in the drop-order test above
    qmodel, ctl = prepared(widths, [10.0, 30.0], target_compression=compression(widths, [8, 7]),
                           pruning=dict(omega_scale=omega_scale))
    set_betas(qmodel, [0.5, 0.5])
    allocate_bits_once(ctl, batches(widths), F.mse_loss)
    assert bits_of(qmodel) == widths_after and ctl.done


@pytest.mark.parametrize("last_prune, widths_after", [("fit", [7, 8]), ("cheapest", [8, 7])])
def test_the_cheapest_last_prune_closes_a_small_gap_with_the_drop_that_adds_least_omega(
        last_prune, widths_after):
    # Dropping one LSB of the small layers.1 reaches the target; ascending beta takes the large
    # layers.0 first, overshooting it; its drop adds far more Omega than layers.1's.
    widths = [64, 4]
    qmodel, ctl = prepared(widths, [1.0, 3.0], target_compression=compression(widths, [8, 7]),
                           pruning=dict(threshold=1.0, interval=1, last_prune=last_prune))
    set_betas(qmodel, [0.3, 0.6])
    ctl.epoch_end(1, batches(widths), F.mse_loss)
    assert bits_of(qmodel) == widths_after and ctl.done


def test_the_cheapest_last_prune_takes_hessian_traces_under_the_fixed_step_policy():
    widths = [64, 4]
    qmodel, ctl = prepared(widths, [1.0, 3.0], target_compression=compression(widths, [8, 7]),
                           pruning=dict(threshold=1.0, interval=1, last_prune="cheapest",
                                        step_policy="fixed"))
    set_betas(qmodel, [0.3, 0.6])
    ctl.epoch_end(1, batches(widths), F.mse_loss)
    assert bits_of(qmodel) == [8, 7]
    assert ctl.history[0].hessian_trace is not None


def with_negated_trace(index: int):
    """msq_fx.sensitivity.group_traces as a noisy estimate gives it: layers.<index>'s trace
    comes out below zero."""
    from msq_fx.sensitivity import group_traces

    def noisy(model, members, *args, **kwargs):
        traces, method = group_traces(model, members, *args, **kwargs)
        key = id(latent(model, index))
        return {**traces, key: -abs(traces[key])}, method
    return noisy


@pytest.mark.parametrize("trace_margin, remedy", [(0.0, "'trace_margin': 2.0"),
                                                  (2.0, "hessian.min_samples")])
def test_a_drop_chosen_on_a_negative_trace_estimate_is_warned_naming_the_layer(
        monkeypatch, caplog, trace_margin, remedy):
    # As in the cheapest-finish test, except that layers.0's trace comes out negative, so its
    # overshooting drop looks cheaper than layers.1's.
    monkeypatch.setattr("msq_fx.controller.group_traces", with_negated_trace(0))
    widths = [64, 4]
    qmodel, ctl = prepared(widths, [1.0, 3.0], target_compression=compression(widths, [8, 7]),
                           pruning=dict(threshold=1.0, interval=1, last_prune="cheapest"),
                           hessian=dict(trace_margin=trace_margin))
    set_betas(qmodel, [0.3, 0.6])
    with caplog.at_level("WARNING", logger="msq_fx"):
        ctl.epoch_end(1, batches(widths), F.mse_loss)
    assert bits_of(qmodel) == [7, 8]
    assert "negative Hessian trace estimate: layers.0" in caplog.text
    assert "layers.1" not in caplog.text and remedy in caplog.text


def test_a_drop_chosen_on_positive_trace_estimates_is_not_warned(caplog):
    widths = [64, 4]
    qmodel, ctl = prepared(widths, [1.0, 3.0], target_compression=compression(widths, [8, 7]),
                           pruning=dict(threshold=1.0, interval=1, last_prune="cheapest"))
    set_betas(qmodel, [0.3, 0.6])
    with caplog.at_level("WARNING", logger="msq_fx"):
        ctl.epoch_end(1, batches(widths), F.mse_loss)
    assert bits_of(qmodel) == [8, 7]
    assert "negative Hessian trace" not in caplog.text


def test_a_one_shot_allocation_on_a_negative_trace_estimate_is_warned(monkeypatch, caplog):
    from msq_fx.allocation import allocate_bits_once

    monkeypatch.setattr("msq_fx.allocation.group_traces", with_negated_trace(0))
    widths = [64, 4]
    qmodel, ctl = prepared(widths, [1.0, 3.0], target_compression=compression(widths, [7, 8]))
    set_betas(qmodel, [0.5, 0.5])
    with caplog.at_level("WARNING", logger="msq_fx"):
        allocate_bits_once(ctl, batches(widths), F.mse_loss)
    assert "allocate_bits_once: lowered on a negative Hessian trace estimate: layers.0" \
        in caplog.text


def test_the_one_shot_schedule_sets_every_width_at_the_first_due_prune_as_allocate_bits_once():
    from msq_fx.allocation import allocate_bits_once

    widths = [16, 8, 4]
    target = compression(widths, [5, 6, 4])
    decided = []
    for schedule in ("one_shot", None):
        qmodel, ctl = prepared(widths, [1.0, 5.0, 30.0], target_compression=target,
                               pruning=dict(interval=2, schedule=schedule or "gradual"))
        set_betas(qmodel, [0.5, 0.5, 0.5])
        if schedule:
            assert ctl.epoch_end(1, batches(widths), F.mse_loss) == [] and not ctl.done
            ctl.epoch_end(2, batches(widths), F.mse_loss)
        else:
            allocate_bits_once(ctl, batches(widths), F.mse_loss)
        assert ctl.done and ctl.compression() >= target
        decided.append(bits_of(qmodel))
    assert decided[0] == decided[1]
    assert len(set(decided[0])) > 1  # mixed widths, not one bit off every layer


def test_the_one_shot_schedule_adds_no_lsb_penalty():
    widths = [16, 8]
    qmodel, ctl = prepared(widths, target_compression=6.0,
                           pruning=dict(schedule="one_shot", reg_strength=1.0))
    set_betas(qmodel, [0.5, 0.5])
    assert ctl.regularization().item() == 0.0
    _, gradual = prepared(widths, target_compression=6.0, pruning=dict(reg_strength=1.0))
    assert gradual.regularization().item() > 0.0


def test_a_one_shot_allocation_that_cannot_reach_the_target_says_so(caplog):
    # The first and last layers keep 8 bits: with the middle one at 4 the model is at 4.67x.
    widths = [16, 8, 4]
    qmodel, ctl = prepared(widths, target_compression=6.0,
                           quantization=dict(min_bits=4, first_last="fixed"),
                           pruning=dict(interval=1, schedule="one_shot"))
    with caplog.at_level("WARNING", logger="msq_fx"):
        ctl.epoch_end(1, batches(widths), F.mse_loss)
    assert bits_of(qmodel) == [8, 4, 8] and ctl.done
    assert "stays below the target 6.00x" in caplog.text


# ------------------------------------------------------------------------- penalty scope

#: layers.3 is by far the least sensitive; after the first prune (every layer 8 -> 7 bits) one
#: more LSB of it reaches the target, so the next prune would take it alone.
SCOPE_WIDTHS = [8, 8, 8, 8]
SCOPE_SCALES = [30.0, 10.0, 3.0, 0.1]
SCOPE_TARGET = compression(SCOPE_WIDTHS, [7, 7, 7, 6]) - 1e-9


def after_first_prune(penalty_scope: str, target: float = SCOPE_TARGET, threshold: float = 1.0,
                      beta: float = 0.5):
    qmodel, ctl = prepared(SCOPE_WIDTHS, SCOPE_SCALES, target_compression=target,
                           pruning=dict(threshold=threshold, interval=1, drop_order="omega",
                                        reg_strength=1e-2, penalty_scope=penalty_scope))
    set_betas(qmodel, [beta] * 4)
    ctl.epoch_end(1, batches(SCOPE_WIDTHS), F.mse_loss)
    assert bits_of(qmodel) == [7, 7, 7, 7] and not ctl.done
    return qmodel, ctl


def penalized_latents(qmodel, ctl) -> list[bool]:
    for index in range(len(SCOPE_WIDTHS)):
        latent(qmodel, index).grad = None
    ctl.regularization().backward()
    return [latent(qmodel, i).grad is not None and bool(latent(qmodel, i).grad.any())
            for i in range(len(SCOPE_WIDTHS))]


def test_the_planned_penalty_pulls_only_the_groups_the_next_prune_would_take():
    qmodel, ctl = after_first_prune("planned")
    assert ctl.penalized == {"layers.3.weight"}
    assert penalized_latents(qmodel, ctl) == [False, False, False, True]


def test_the_paper_s_penalty_pulls_every_group_still_pruning():
    qmodel, ctl = after_first_prune("all")
    assert ctl.penalized is None
    assert penalized_latents(qmodel, ctl) == [True, True, True, True]


def test_planning_the_next_prune_changes_no_width_and_does_not_end_the_run():
    qmodel, ctl = after_first_prune("planned")
    assert ctl.penalized == {"layers.3.weight"}  # the plan ran the next prune's rules
    assert bits_of(qmodel) == [7, 7, 7, 7] and not ctl.done
    assert ctl.compression() == pytest.approx(32 / 7)


def test_the_next_prune_takes_the_planned_groups():
    qmodel, ctl = after_first_prune("planned")
    planned = ctl.penalized
    ctl.epoch_end(2, batches(SCOPE_WIDTHS), F.mse_loss)
    assert ctl.done
    assert {g.name for g in ctl.groups if g.bits < 7} == planned


def test_the_penalty_stays_on_every_group_while_the_next_prune_cannot_reach_the_target():
    qmodel, ctl = after_first_prune("planned", target=compression(SCOPE_WIDTHS, [4, 4, 4, 4]))
    assert ctl.penalized is None
    assert penalized_latents(qmodel, ctl) == [True, True, True, True]


def test_a_resumed_controller_keeps_the_planned_penalty():
    qmodel, ctl = after_first_prune("planned")
    resumed = msq_fx.MSQController(qmodel)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.penalized == ctl.penalized == {"layers.3.weight"}


def test_a_checkpoint_from_before_the_penalty_scope_resumes_with_every_group_penalized():
    qmodel, ctl = after_first_prune("planned")
    state = ctl.state_dict()
    del state["penalized"]
    ctl.load_state_dict(state)
    assert ctl.penalized is None


def planned_at_alpha_0_3():
    """After a first prune (every layer 8 -> 7 bits) under alpha 0.3 and the planned penalty:
    the plan is layers.3 alone."""
    qmodel, ctl = after_first_prune("planned", threshold=0.3, beta=0.0)
    assert ctl.penalized == {"layers.3.weight"}
    return qmodel, ctl


def test_while_a_plan_holds_only_the_planned_groups_can_be_pruned():
    # layers.0-2 were not pulled: a beta under alpha there is chance, not emptied LSBs.
    qmodel, ctl = planned_at_alpha_0_3()
    set_betas(qmodel, [0.0, 0.0, 0.0, 0.6], bits=7)
    ctl.epoch_end(2, batches(SCOPE_WIDTHS), F.mse_loss)
    assert bits_of(qmodel) == [7, 7, 7, 7] and not ctl.done
    set_betas(qmodel, [0.0, 0.0, 0.0, 0.0], bits=7)
    ctl.epoch_end(3, batches(SCOPE_WIDTHS), F.mse_loss)
    assert bits_of(qmodel)[:3] == [7, 7, 7] and bits_of(qmodel)[3] < 7 and ctl.done


def test_a_plan_holds_while_no_prune_changes_a_width(monkeypatch):
    # Re-planning on a prune's fresh Hessian estimate could switch the pull to another group;
    # a prune that lowers nothing (no group under alpha) must keep the plan it had.
    qmodel, ctl = planned_at_alpha_0_3()
    set_betas(qmodel, [0.6] * 4, bits=7)
    monkeypatch.setattr(ctl, "_planned_prune", lambda *args: {"layers.0.weight"})
    ctl.epoch_end(2, batches(SCOPE_WIDTHS), F.mse_loss)
    assert bits_of(qmodel) == [7, 7, 7, 7] and not ctl.done
    assert ctl.penalized == {"layers.3.weight"}


def test_the_controller_s_penalty_compiles_into_one_graph_with_the_model_s_loss():
    torch._dynamo.reset()
    config = msq_fx.MSQConfig(target_compression=8.0)
    qmodel = msq_fx.prepare(msq_fx.resnet20(), torch.randn(2, 3, 32, 32), config)
    controller = msq_fx.MSQController(qmodel, config)
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])

    def loss(images, labels):
        return F.cross_entropy(qmodel(images), labels) + controller.regularization()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)  # a break would raise
    torch.testing.assert_close(compiled(images, labels), loss(images, labels))
