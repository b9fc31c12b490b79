"""MSQConfig: nested by concern, validated on construction, frozen, round-trips through plain
data, and reads the flat form older saved files hold."""
from __future__ import annotations

import dataclasses
import math
import re

import pytest

from msq_fx import MSQConfig
from msq_fx.config import HessianConfig, PruningConfig, QuantizationConfig


@pytest.mark.parametrize("section, field, value", [
    ("quantization", "init_bits", 9), ("quantization", "init_bits", 1),
    ("quantization", "init_bits", 8.0), ("quantization", "min_bits", 0),
    ("quantization", "min_bits", 9), ("quantization", "act_bits", 1),
    ("quantization", "grid", "uniform"), ("quantization", "first_last", "skip"),
    ("quantization", "first_last_bits", 0), ("quantization", "first_last_bits", 9),
    ("quantization", "first_last_bits", 4.0),
    ("quantization", "exclude", ("[",)), ("quantization", "groups", ((),)),
    ("quantization", "on_unquantizable", "skip"),
    ("quantization", "recompute_quantized_weights", 1),
    ("pruning", "reg_strength", -1.0), ("pruning", "threshold", 0.0),
    ("pruning", "threshold", 1.5), ("pruning", "interval", 0),
    ("pruning", "step_policy", "random"),
    ("pruning", "last_prune", "overshoot"),
    ("pruning", "penalty_units", "bits"),
    ("pruning", "drop_order", "size"),
    ("pruning", "omega_scale", "mean"), ("pruning", "schedule", "once"),
    ("pruning", "penalty_scope", "some"),
    ("hessian", "max_samples", 0), ("hessian", "tol", 0.0), ("hessian", "batches", 0),
    ("hessian", "method", "exact"), ("hessian", "chunk_size", 0), ("hessian", "chunk_size", 2.5),
    ("hessian", "relative_step", 0.0), ("hessian", "relative_step", 1.0),
    ("hessian", "frozen_kinks", "yes"), ("hessian", "model_mode", "training"),
    ("hessian", "trace_margin", -1.0), ("hessian", "trace_margin", math.inf),
    ("hessian", "trace_margin", "2"), ("hessian", "curvature", "gauss_newton"),
])
def test_invalid_values_are_rejected_with_the_whole_field_named(section, field, value):
    with pytest.raises(ValueError,
                       match=re.escape(f"MSQConfig.{section}.{field}={value!r} is invalid")):
        MSQConfig(**{section: {field: value}})


@pytest.mark.parametrize("policy", ["quantize", "float"])
def test_first_last_bits_is_rejected_unless_first_last_is_fixed(policy):
    with pytest.raises(ValueError, match=r"first_last_bits=8 is invalid: expected None unless "
                                         r"first_last='fixed'"):
        MSQConfig(quantization=dict(first_last=policy, first_last_bits=8))


@pytest.mark.parametrize("value", [1.0, 64.0, "8"])
def test_an_invalid_target_is_rejected_with_its_name(value):
    with pytest.raises(ValueError, match=r"MSQConfig\.target_compression="):
        MSQConfig(target_compression=value)


def test_a_sub_config_of_the_wrong_type_is_rejected():
    with pytest.raises(ValueError, match=r"MSQConfig\.pruning=.*PruningConfig"):
        MSQConfig(pruning=HessianConfig())


def test_config_and_its_sections_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        MSQConfig().target_compression = 4.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        MSQConfig().quantization.init_bits = 4


def test_a_dict_for_a_section_builds_that_section():
    config = MSQConfig(quantization={"init_bits": 6}, pruning={"interval": 2})
    assert config.quantization == QuantizationConfig(init_bits=6)
    assert config.pruning == PruningConfig(interval=2)


def test_target_beyond_the_floor_is_explained():
    with pytest.raises(ValueError, match="32/min_bits"):
        MSQConfig(quantization={"min_bits": 4}, target_compression=10.0)


def test_to_dict_from_dict_round_trip():
    config = MSQConfig(quantization=dict(init_bits=6, exclude=("head",), groups=(("a", "b"),),
                                         act_bits=4),
                       hessian=dict(chunk_size=3), target_compression=5.0, seed=3)
    assert MSQConfig.from_dict(config.to_dict()) == config


def test_from_dict_migrates_the_flat_form_of_older_files():
    flat = {"init_bits": 6, "min_bits": 2, "grid": "nested", "prune_interval": 3,
            "prune_threshold": 0.4, "prune_step_policy": "fixed", "hessian_batches": 2,
            "hessian_method": "finite_difference", "target_compression": 9.0, "seed": 1}
    config = MSQConfig.from_dict(flat)
    assert config == MSQConfig(
        target_compression=9.0, seed=1, quantization=QuantizationConfig(init_bits=6),
        pruning=PruningConfig(interval=3, threshold=0.4, step_policy="fixed", last_prune="full"),
        hessian=HessianConfig(batches=2, method="finite_difference"))


@pytest.mark.parametrize("data", [{"bits": 4}, {"quantization": {"bits": 4}}])
def test_from_dict_rejects_unknown_fields(data):
    with pytest.raises(ValueError, match="unknown field.*bits"):
        MSQConfig.from_dict(data)


def test_replace_changes_only_the_named_fields_of_a_section():
    config = MSQConfig(quantization={"init_bits": 6, "min_bits": 3})
    changed = config.replace(quantization={"min_bits": 4})
    assert (changed.quantization.init_bits, changed.quantization.min_bits) == (6, 4)


def test_replace_validates_again():
    with pytest.raises(ValueError, match=r"MSQConfig\.quantization\.min_bits=0"):
        MSQConfig().replace(quantization={"min_bits": 0})


def test_the_fine_tuning_preset_prunes_on_steps_in_weight_units_with_channel_scales():
    config = MSQConfig.fine_tuning(10.0)
    assert config.target_compression == 10.0
    assert (config.pruning.interval, config.pruning.interval_unit) == (25, "step")
    assert (config.pruning.penalty_units, config.pruning.reg_strength) == ("weight", 1e-2)
    assert (config.pruning.scale_after_prune, config.pruning.drop_order) == ("refit", "omega")
    assert config.quantization.scale == "channel"


@pytest.mark.parametrize("target, init_bits", [(4.0, 8), (6.0, 7), (8.0, 5), (8.5, 5),
                                               (32 / 3, 4), (12.0, 4), (16.0, 3), (18.0, 3)])
def test_the_fine_tuning_preset_starts_one_bit_above_the_uniform_width_of_the_target(target,
                                                                                      init_bits):
    assert MSQConfig.fine_tuning(target).quantization.init_bits == init_bits


def test_the_fine_tuning_preset_closes_the_last_gap_with_the_cheapest_drop():
    assert MSQConfig.fine_tuning(8.0).pruning.last_prune == "cheapest"


@pytest.mark.parametrize("target, scope", [(8.0, "planned"), (32 / 3, "planned"),
                                           (16.0, "all"), (18.0, "all")])
def test_the_fine_tuning_preset_pulls_only_the_planned_groups_under_16x(target, scope):
    assert MSQConfig.fine_tuning(target).pruning.penalty_scope == scope


def test_the_paper_s_defaults_pull_every_group():
    assert MSQConfig().pruning.penalty_scope == "all"


@pytest.mark.parametrize("target, floor, grid", [(10.0, 2, "nested"), (15.9, 2, "nested"),
                                                 (16.0, 1, "literal"), (20.0, 1, "literal")])
def test_the_fine_tuning_preset_allows_binary_layers_from_16x(target, floor, grid):
    quantization = MSQConfig.fine_tuning(target).quantization
    assert (quantization.min_bits, quantization.grid) == (floor, grid)


def test_changes_to_the_fine_tuning_preset_replace_only_the_fields_they_name():
    config = MSQConfig.fine_tuning(8.0, pruning={"interval": 50}, seed=3)
    assert (config.pruning.interval, config.pruning.interval_unit) == (50, "step")
    assert config.pruning.penalty_units == "weight" and config.seed == 3
    with pytest.raises(ValueError, match="MSQConfig.pruning.interval=0 is invalid"):
        MSQConfig.fine_tuning(8.0, pruning={"interval": 0})
