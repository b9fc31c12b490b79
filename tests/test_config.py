"""MSQConfig: validated on construction, frozen, round-trips through plain data."""
from __future__ import annotations

import dataclasses

import pytest

from msq_fx import MSQConfig


@pytest.mark.parametrize("field, value", [
    ("init_bits", 9), ("init_bits", 1), ("init_bits", 8.0), ("min_bits", 0), ("min_bits", 9),
    ("act_bits", 1), ("grid", "uniform"), ("first_last", "skip"), ("exclude", ("[",)),
    ("reg_strength", -1.0), ("prune_threshold", 0.0), ("prune_threshold", 1.5),
    ("prune_interval", 0), ("target_compression", 1.0), ("target_compression", 64.0),
    ("prune_step_policy", "random"), ("hessian_max_samples", 0), ("hessian_tol", 0.0),
    ("hessian_batches", 0), ("groups", ((),)), ("filter_fn", "not callable"),
    ("on_unquantizable", "skip"), ("hessian_method", "exact"), ("hessian_chunk_size", 0),
    ("hessian_chunk_size", 2.5), ("hessian_relative_step", 0.0), ("hessian_relative_step", 1.0),
    ("hessian_frozen_kinks", "yes"), ("hessian_model_mode", "training"),
])
def test_invalid_values_are_rejected_with_the_field_named(field, value):
    with pytest.raises(ValueError, match=rf"MSQConfig\.{field.split('_')[0]}"):
        MSQConfig(**{field: value})


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        MSQConfig().init_bits = 4


def test_target_beyond_the_floor_is_explained():
    with pytest.raises(ValueError, match="32/min_bits"):
        MSQConfig(min_bits=4, target_compression=10.0)


def test_to_dict_from_dict_round_trip():
    config = MSQConfig(init_bits=6, exclude=("head",), groups=(("a", "b"),), act_bits=4)
    assert MSQConfig.from_dict(config.to_dict()) == config


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown field"):
        MSQConfig.from_dict({"bits": 4})


def test_replace_validates_again():
    with pytest.raises(ValueError):
        MSQConfig().replace(min_bits=0)
