"""Specification of msq_fx.modules: weight/activation quantizers, lowering, the owner-class swap."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import count_calls
from msq_fx import quant
from msq_fx.modules import ActivationFakeQuant, LoweredActivation, LoweredWeight, WeightFakeQuant
from msq_fx.owners import is_quantized_owner, iter_quantized_weights, quantized_class
from msq_fx.weight_cache import cached_quantized_weights

GRID_AND_BITS = [(grid, bits) for grid in quant.GRIDS for bits in range(2, 9)]


# ---------------------------------------------------------------- helpers


def latent_weight(*shape: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def quantized_linear(bits: int = 4, grid: str = "nested", seed: int = 0) -> nn.Linear:
    """An nn.Linear rewritten the way passes/rewrite.py does it: class swap + quantizer child."""
    torch.manual_seed(seed)
    layer = nn.Linear(5, 3)
    layer.__class__ = quantized_class(nn.Linear, ("weight",))
    layer.add_module("weight_quantizer", WeightFakeQuant(bits, "linear", ("weight",), grid))
    return layer


def inputs(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- WeightFakeQuant


@pytest.mark.parametrize("grid,bits", GRID_AND_BITS)
def test_weight_fake_quant_forward_equals_fake_quantize_at_its_bits(grid, bits):
    w = latent_weight(6, 4)
    quantizer = WeightFakeQuant(bits, "linear", ("fc.weight",), grid)
    assert torch.equal(quantizer(w), quant.fake_quantize(w, bits, grid))


def test_weight_fake_quant_follows_its_bits_buffer_after_a_prune():
    w = latent_weight(6, 4)
    quantizer = WeightFakeQuant(8, "conv", ("conv.weight",))
    quantizer.bits.fill_(3)
    assert torch.equal(quantizer(w), quant.quantize_value(w, 3))


def test_weight_fake_quant_passes_the_gradient_straight_through():
    w = latent_weight(6, 4).requires_grad_()
    upstream = latent_weight(6, 4, seed=3)
    WeightFakeQuant(4, "linear", ("fc.weight",))(w).backward(upstream)
    assert torch.equal(w.grad, upstream)


def test_weight_fake_quant_state_dict_round_trips_bits_and_prune_step():
    source = WeightFakeQuant(8, "linear", ("fc.weight",))
    source.bits.fill_(5)
    source.prune_step.fill_(2)
    target = WeightFakeQuant(8, "linear", ("fc.weight",))
    target.load_state_dict(source.state_dict())
    assert (target.num_bits, int(target.prune_step)) == (5, 2)


def test_a_quantized_layer_compiles_into_one_graph():
    torch._dynamo.reset()
    layer = quantized_linear(bits=4)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)  # a break would raise
    assert torch.equal(compiled(inputs(2, 5)), layer(inputs(2, 5)))


def test_a_compiled_layer_follows_a_width_set_after_it_was_compiled():
    torch._dynamo.reset()
    layer = quantized_linear(bits=4)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    compiled(inputs(2, 5))
    layer.weight_quantizer.set_bits(2)
    expected = F.linear(inputs(2, 5), quant.fake_quantize(layer.weight.detach(), 2), layer.bias)
    assert torch.equal(compiled(inputs(2, 5)), expected)


def test_a_compiled_layer_follows_a_width_loaded_from_a_state_dict():
    torch._dynamo.reset()
    layer, narrower = quantized_linear(bits=4), quantized_linear(bits=4)
    narrower.weight_quantizer.set_bits(2)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    compiled(inputs(2, 5))
    layer.load_state_dict(narrower.state_dict())
    assert layer.weight_quantizer.static_bits == 2
    assert torch.equal(compiled(inputs(2, 5)), narrower(inputs(2, 5)))


def test_the_width_s_python_copy_follows_the_buffer_once_read_eagerly():
    quantizer = WeightFakeQuant(8, "conv", ("conv.weight",))
    quantizer.bits.fill_(3)  # not through set_bits
    assert quantizer.num_bits == 3 and quantizer.static_bits == 3


def test_p_s_python_copy_follows_the_buffer_once_read_eagerly():
    quantizer = WeightFakeQuant(8, "conv", ("conv.weight",))
    quantizer.prune_step.fill_(2)  # not through set_prune_step
    assert quantizer.prune_lsbs == 2 and quantizer.static_prune_step == 2


def test_p_loaded_from_a_state_dict_reaches_its_python_copy():
    source, target = (WeightFakeQuant(8, "conv", ("conv.weight",)) for _ in range(2))
    source.set_prune_step(2)
    target.load_state_dict(source.state_dict())
    assert target.static_prune_step == 2


def test_the_lsb_penalty_compiles_into_one_graph_that_follows_p():
    torch._dynamo.reset()
    w = latent_weight(6, 4)
    quantizer = WeightFakeQuant(6, "linear", ("fc.weight",))
    compiled = torch.compile(quantizer.lsb_l1, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(w), quant.lsb_value(w, 6, 1).abs().sum())
    quantizer.set_prune_step(2)
    assert torch.equal(compiled(w), quant.lsb_value(w, 6, 2).abs().sum())


def test_a_quantizer_without_the_python_copies_still_compiles_to_the_right_penalty():
    """As one unpickled from before the copies existed: the buffers are read instead."""
    torch._dynamo.reset()
    w = latent_weight(6, 4)
    quantizer = WeightFakeQuant(6, "linear", ("fc.weight",))
    quantizer.set_prune_step(2)
    del quantizer.__dict__["static_prune_step"], quantizer.__dict__["static_bits"]
    compiled = torch.compile(quantizer.lsb_l1, backend="aot_eager")
    assert torch.equal(compiled(w), quant.lsb_value(w, 6, 2).abs().sum())


def test_weight_fake_quant_lsb_l1_is_the_sum_of_lsb_magnitudes_at_the_prune_step():
    w = latent_weight(6, 4)
    quantizer = WeightFakeQuant(6, "linear", ("fc.weight",))
    quantizer.prune_step.fill_(2)
    assert torch.equal(quantizer.lsb_l1(w), quant.lsb_value(w, 6, 2).abs().sum())


def test_weight_fake_quant_lsb_l1_is_zero_at_one_bit():
    quantizer = WeightFakeQuant(1, "linear", ("fc.weight",))
    assert float(quantizer.lsb_l1(latent_weight(6, 4))) == 0.0


@pytest.mark.parametrize("kwargs", [{"kind": "embedding"}, {"kind": "linear", "grid": "dorefa"}])
def test_weight_fake_quant_rejects_unknown_kind_or_grid(kwargs):
    with pytest.raises(ValueError):
        WeightFakeQuant(8, names=("fc.weight",), **kwargs)


# ---------------------------------------------------------------- LoweredWeight


@pytest.mark.parametrize("grid,bits", GRID_AND_BITS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lowered_weight_equals_the_fake_quant_weight_bitwise(grid, bits, dtype):
    w = latent_weight(8, 3, 3, dtype=dtype)
    quantizer = WeightFakeQuant(bits, "conv", ("conv.weight",), grid)
    lowered = LoweredWeight.from_fake_quant(quantizer, w)
    assert torch.equal(lowered(), quantizer(w))


@pytest.mark.parametrize("bits", range(2, 9))
def test_lowered_weight_stores_int8_codes_in_the_signed_n_bit_range(bits):
    w = latent_weight(16, 16)
    lowered = LoweredWeight.from_fake_quant(WeightFakeQuant(bits, "linear", ("fc.weight",)), w)
    assert lowered.codes.dtype == torch.int8
    assert lowered.codes.shape == w.shape
    assert int(lowered.codes.min()) >= -(2 ** (bits - 1))
    assert int(lowered.codes.max()) <= 2 ** (bits - 1) - 1


@pytest.mark.parametrize("bits", [9, 12, 16])
def test_lowering_more_than_8_bits_raises_value_error(bits):
    quantizer = WeightFakeQuant(bits, "linear", ("fc.weight",))
    with pytest.raises(ValueError, match="fc.weight"):
        LoweredWeight.from_fake_quant(quantizer, latent_weight(4, 4))


def test_lowered_weight_keeps_the_quantizer_group_and_names():
    quantizer = WeightFakeQuant(4, "linear", ("a.weight", "b.weight"))
    quantizer.group = "tied"
    lowered = LoweredWeight.from_fake_quant(quantizer, latent_weight(4, 4))
    assert (lowered.group, lowered.names, lowered.num_bits) == ("tied", ("a.weight", "b.weight"), 4)


def test_lowered_weight_survives_a_state_dict_round_trip():
    quantizer = WeightFakeQuant(5, "linear", ("fc.weight",), "literal")
    source = LoweredWeight.from_fake_quant(quantizer, latent_weight(4, 4))
    target = LoweredWeight.from_fake_quant(quantizer, latent_weight(4, 4, seed=9))
    target.load_state_dict(source.state_dict())
    assert torch.equal(target(), source())


# ---------------------------------------------------------------- owner-class swap


def test_swapped_owner_class_is_a_subclass_of_the_original():
    layer = quantized_linear()
    assert issubclass(type(layer), nn.Linear)
    assert type(layer) is not nn.Linear
    assert is_quantized_owner(layer)
    assert not is_quantized_owner(nn.Linear(2, 2))


def test_quantized_class_is_built_once_per_base_and_names():
    assert quantized_class(nn.Linear, ("weight",)) is quantized_class(nn.Linear, ("weight",))
    assert quantized_class(nn.Linear, ("weight",)) is not quantized_class(nn.Conv2d, ("weight",))


def test_swapped_owner_weight_attribute_returns_the_quantized_weight():
    layer = quantized_linear(bits=3)
    latent = layer._parameters["weight"]
    assert torch.equal(layer.weight, quant.quantize_value(latent, 3))
    assert not torch.equal(layer.weight, latent)


def test_swapped_owner_forward_uses_the_quantized_weight():
    layer = quantized_linear(bits=3)
    x = inputs(2, 5)
    expected = F.linear(x, quant.quantize_value(layer._parameters["weight"], 3), layer.bias)
    assert torch.equal(layer(x), expected)


def test_swapped_owner_passes_gradients_to_the_latent_weight():
    layer = quantized_linear(bits=3)
    x = inputs(2, 5)
    layer(x).sum().backward()
    # Straight through: the latent gets exactly the gradient a float Linear's weight would get.
    assert torch.allclose(layer._parameters["weight"].grad, torch.ones(2, 3).T @ x)


def test_swapped_owner_keeps_the_latent_float_weight_in_state_dict():
    torch.manual_seed(0)
    original_weight = nn.Linear(5, 3).weight.detach().clone()
    layer = quantized_linear(bits=3, seed=0)
    state = layer.state_dict()
    assert set(state) == {"weight", "bias", "weight_quantizer.bits", "weight_quantizer.prune_step"}
    assert torch.equal(state["weight"], original_weight)
    assert [name for name, _ in layer.named_parameters()] == ["weight", "bias"]


def test_swapped_owner_loads_a_plain_linear_state_dict():
    plain = nn.Linear(5, 3)
    layer = quantized_linear(bits=4, seed=7)
    layer.load_state_dict(plain.state_dict(), strict=False)
    assert torch.equal(layer._parameters["weight"], plain.weight)
    assert torch.equal(layer.weight, quant.quantize_value(plain.weight.detach(), 4))


def test_swapped_owner_survives_pickle_with_identical_outputs():
    layer = quantized_linear(bits=3, grid="literal")
    restored = pickle.loads(pickle.dumps(layer))
    x = inputs(4, 5)
    assert type(restored) is type(layer)
    assert restored.weight_quantizer.num_bits == 3
    assert torch.equal(restored(x), layer(x))


def test_swapped_owner_deepcopy_has_identical_outputs_and_its_own_parameters():
    layer = quantized_linear(bits=3)
    clone = copy.deepcopy(layer)
    x = inputs(4, 5)
    assert type(clone) is type(layer)
    assert torch.equal(clone(x), layer(x))
    with torch.no_grad():
        clone._parameters["weight"].add_(1.0)
    assert not torch.equal(clone(x), layer(x))


def test_swapped_owner_survives_torch_save_and_load(tmp_path):
    layer = quantized_linear(bits=5)
    torch.save(layer, tmp_path / "layer.pt")
    restored = torch.load(tmp_path / "layer.pt", weights_only=False)
    x = inputs(4, 5)
    assert torch.equal(restored(x), layer(x))


def test_swapped_owner_quantizes_its_input_with_an_input_quantizer_child():
    layer = quantized_linear(bits=4)
    layer.add_module("input_quantizer", ActivationFakeQuant(3))
    x = inputs(4, 5)
    reference = ActivationFakeQuant(3)
    expected = F.linear(reference(x), layer.weight, layer.bias)
    assert torch.equal(layer(x), expected)


def test_swapped_attention_quantizes_a_value_passed_by_keyword_like_a_positional_one():
    # DETR-style call: self_attn(q, k, value=tgt). Every input must meet the input quantizer.
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(8, 2, batch_first=True)
    attention.__class__ = quantized_class(nn.MultiheadAttention, ("in_proj_weight",))
    attention.add_module("in_proj_weight_quantizer",
                         WeightFakeQuant(4, "attention", ("in_proj_weight",)))
    attention.add_module("input_quantizer", ActivationFakeQuant(2))
    q, v = inputs(2, 3, 8), inputs(2, 3, 8, seed=2)
    positional = attention(q, q, v)[0]
    assert torch.equal(attention(q, q, value=v)[0], positional)


def test_iter_quantized_weights_lists_a_shared_quantizer_once():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    shared = WeightFakeQuant(4, "linear", ("0.weight", "1.weight"))
    for child in model:
        child.__class__ = quantized_class(nn.Linear, ("weight",))
        child.add_module("weight_quantizer", shared)
    found = list(iter_quantized_weights(model))
    assert [(q.name, q.quantizer) for q in found] == [("0.weight", shared)]
    assert found[0].latent is model[0]._parameters["weight"]


# ---------------------------------------------------------------- ActivationFakeQuant


def test_activation_quant_calibrates_its_clip_on_the_first_tensor_only():
    quantizer = ActivationFakeQuant(4)
    quantizer(torch.tensor([0.5, 2.0, 1.0]))
    quantizer(torch.tensor([0.5, 9.0]))
    assert bool(quantizer.initialized)
    assert float(quantizer.clip.detach()) == 2.0


def test_activation_quant_uses_an_unsigned_range_for_non_negative_input():
    quantizer = ActivationFakeQuant(4)
    out = quantizer(torch.tensor([0.0, 0.7, 3.0])).detach()
    assert not bool(quantizer.signed)
    assert float(out.min()) == 0.0
    # The later negative input is clamped at zero: the range stays unsigned.
    assert float(quantizer(torch.tensor([-1.0, 1.0])).detach().min()) == 0.0


def test_activation_quant_uses_a_signed_range_when_the_first_input_has_negatives():
    quantizer = ActivationFakeQuant(4)
    out = quantizer(torch.tensor([-0.01, 0.7, 3.0])).detach()
    assert bool(quantizer.signed)
    assert float(quantizer(torch.tensor([-3.0])).detach()) == pytest.approx(-3.0)
    assert float(out.max()) == pytest.approx(3.0)


def test_a_layer_quantizing_its_input_compiles_into_one_graph_once_calibrated():
    torch._dynamo.reset()
    layer = quantized_linear(bits=4)
    layer.add_module("input_quantizer", ActivationFakeQuant(3))
    expected = layer(inputs(4, 5))  # calibrates
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(inputs(4, 5)), expected)


def test_a_compiled_activation_quantizer_calibrates_on_its_first_input_as_an_eager_one_does():
    torch._dynamo.reset()
    compiled_one, eager_one = ActivationFakeQuant(4), ActivationFakeQuant(4)
    compiled = torch.compile(compiled_one, backend="aot_eager")
    first, later = torch.tensor([-0.5, 2.0, 1.0]), torch.tensor([-3.0, 0.3, 9.0])
    assert torch.equal(compiled(first), eager_one(first))
    assert torch.equal(compiled(later), eager_one(later))
    assert compiled_one.settings == eager_one.settings == (4, True, True)


def test_an_activation_quantizer_loaded_from_a_state_dict_compiles_to_the_loaded_range():
    torch._dynamo.reset()
    calibrated, fresh = ActivationFakeQuant(4), ActivationFakeQuant(4)
    calibrated(torch.tensor([-1.0, 2.0]))
    fresh.load_state_dict(calibrated.state_dict())
    assert fresh.static_settings == (4, True, True)
    compiled = torch.compile(fresh, backend="aot_eager", fullgraph=True)
    x = torch.linspace(-3.0, 3.0, 61)
    assert torch.equal(compiled(x), calibrated(x))


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("low", [0.0, -1.0], ids=["unsigned", "signed"])
def test_activation_quant_outputs_at_most_2_pow_bits_levels(bits, low):
    quantizer = ActivationFakeQuant(bits)
    x = torch.linspace(low, 1.0, 5001)
    levels = torch.unique(quantizer(x))
    assert len(levels) <= 2**bits
    assert len(levels) >= 2 ** (bits - 1)  # the grid is actually used, not collapsed


@pytest.mark.parametrize("bits", [2, 4, 8, 12])
@pytest.mark.parametrize("low", [0.0, -1.0], ids=["unsigned", "signed"])
def test_lowered_activation_equals_the_trained_activation_quantizer_bitwise(bits, low):
    quantizer = ActivationFakeQuant(bits)
    quantizer(torch.linspace(low, 1.0, 7))  # calibrate
    with torch.no_grad():
        quantizer.clip.mul_(0.83)  # a trained clip, not the calibrated one
    lowered = LoweredActivation.from_fake_quant(quantizer)
    x = torch.linspace(-2.0, 2.0, 4001)
    assert torch.equal(lowered(x), quantizer(x).detach())
    assert (lowered.bits, lowered.signed) == (bits, low < 0)


def test_lowered_activation_survives_a_state_dict_round_trip():
    quantizer = ActivationFakeQuant(4)
    quantizer(torch.tensor([-0.5, 1.5]))
    lowered = LoweredActivation.from_fake_quant(quantizer)
    fresh = LoweredActivation(torch.zeros(()), torch.ones(()), torch.ones(()), 4, True)
    fresh.load_state_dict(lowered.state_dict())
    x = torch.linspace(-2.0, 2.0, 101)
    assert torch.equal(fresh(x), lowered(x))


def test_activation_quant_passes_the_gradient_to_the_input_inside_the_clip():
    quantizer = ActivationFakeQuant(4)
    quantizer(torch.tensor([-1.0, 1.0]))  # calibrate: signed, clip 1
    x = torch.tensor([-3.0, -0.4, 0.1, 0.6, 2.0], requires_grad=True)
    quantizer(x).sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))


def test_activation_quant_passes_a_gradient_to_the_clip():
    quantizer = ActivationFakeQuant(4)
    quantizer(torch.tensor([0.0, 1.0]))  # calibrate: unsigned, clip 1
    quantizer(torch.tensor([0.3, 0.9, 2.5])).sum().backward()
    assert quantizer.clip.grad is not None
    assert float(quantizer.clip.grad) != 0.0


def test_activation_quant_state_survives_a_state_dict_round_trip():
    source = ActivationFakeQuant(4)
    source(torch.tensor([-2.0, 1.0]))
    target = ActivationFakeQuant(4)
    target.load_state_dict(source.state_dict())
    x = inputs(10)
    assert torch.equal(target(x), source(x))
    assert float(target.clip.detach()) == 2.0


@pytest.mark.parametrize("bits", [0, 1, 17])
def test_activation_quant_rejects_bits_outside_2_to_16(bits):
    with pytest.raises(ValueError):
        ActivationFakeQuant(bits)


# ---------------------------------------------------------------- cached_quantized_weights


def count_quantizations(monkeypatch) -> list[int]:
    return count_calls(monkeypatch, "fake_quantize")


def test_cached_weights_give_the_uncached_outputs_bitwise():
    layer, x = quantized_linear(), inputs(4, 5)
    with torch.no_grad():
        expected = layer(x)
        with cached_quantized_weights(layer):
            first, second = layer(x), layer(x)
    assert torch.equal(first, expected) and torch.equal(second, expected)


def test_cached_weights_quantize_each_weight_once_across_forwards(monkeypatch):
    layer, x = quantized_linear(), inputs(4, 5)
    calls = count_quantizations(monkeypatch)
    with torch.no_grad(), cached_quantized_weights(layer):
        for _ in range(3):
            layer(x)
    assert calls[0] == 1


def test_cached_weights_are_requantized_after_an_in_place_update_of_the_latent():
    layer, x = quantized_linear(), inputs(4, 5)
    with torch.no_grad(), cached_quantized_weights(layer):
        before = layer(x)
        layer._parameters["weight"].mul_(-1.0)
        after = layer(x)
        expected = F.linear(x, quant.fake_quantize(layer._parameters["weight"], 4), layer.bias)
    assert not torch.equal(after, before)
    assert torch.equal(after, expected)


def test_an_in_place_change_of_a_returned_weight_does_not_reach_later_forwards():
    layer, x = quantized_linear(), inputs(4, 5)
    with torch.no_grad():
        expected = layer(x)
        with cached_quantized_weights(layer):
            layer.weight.zero_()
            after = layer(x)
    assert torch.equal(after, expected)


def test_cached_weights_are_requantized_after_the_latent_is_rebound():
    layer, x = quantized_linear(), inputs(4, 5)
    with torch.no_grad(), cached_quantized_weights(layer):
        layer(x)
        layer._parameters["weight"].data = latent_weight(3, 5, seed=7)
        after = layer(x)
        expected = F.linear(x, quant.fake_quantize(latent_weight(3, 5, seed=7), 4), layer.bias)
    assert torch.equal(after, expected)


def test_cached_weights_follow_a_prune_of_the_bits():
    layer, x = quantized_linear(bits=6), inputs(4, 5)
    with torch.no_grad(), cached_quantized_weights(layer):
        layer(x)
        layer.weight_quantizer.bits.fill_(3)
        after = layer(x)
        expected = F.linear(x, quant.fake_quantize(layer._parameters["weight"], 3), layer.bias)
    assert torch.equal(after, expected)


def test_a_training_step_inside_the_cache_block_still_reaches_the_latent():
    layer, x = quantized_linear(), inputs(4, 5)
    reference = copy.deepcopy(layer)
    with cached_quantized_weights(layer):
        with torch.no_grad():
            layer(x)
        layer(x).square().sum().backward()
    reference(x).square().sum().backward()
    assert torch.equal(layer._parameters["weight"].grad, reference._parameters["weight"].grad)


def test_a_frozen_latent_is_served_from_the_cache_under_grad_mode(monkeypatch):
    layer, x = quantized_linear(), inputs(4, 5).requires_grad_()
    layer.weight_quantizer.requires_grad_(False)
    layer._parameters["weight"].requires_grad_(False)
    calls = count_quantizations(monkeypatch)
    with cached_quantized_weights(layer):
        layer(x).sum().backward()
        layer(x).sum().backward()
    assert calls[0] == 1
    # d(sum(x W^T + b))/dx: the column sums of the quantized W in every row; twice, accumulated.
    expected = 2 * layer.weight.detach().sum(0).expand_as(x)
    assert torch.allclose(x.grad, expected, rtol=1e-6, atol=1e-6)


def test_the_cache_is_released_when_the_block_ends():
    layer, x = quantized_linear(), inputs(4, 5)
    with torch.no_grad(), cached_quantized_weights(layer):
        layer(x)
        assert layer.weight_quantizer.cache.value is not None
    assert layer.weight_quantizer.cache is None


def test_the_cache_is_released_when_the_block_raises():
    layer, x = quantized_linear(), inputs(4, 5)
    with pytest.raises(RuntimeError, match="inside"):
        with torch.no_grad(), cached_quantized_weights(layer):
            layer(x)
            raise RuntimeError("inside")
    assert layer.weight_quantizer.cache is None


def test_a_nested_cache_block_keeps_the_outer_block_cache(monkeypatch):
    layer, x = quantized_linear(), inputs(4, 5)
    calls = count_quantizations(monkeypatch)
    with torch.no_grad(), cached_quantized_weights(layer):
        layer(x)
        with cached_quantized_weights(layer):
            layer(x)
        layer(x)
    assert calls[0] == 1


def test_a_weight_cached_under_inference_mode_is_requantized_for_autograd():
    layer, x = quantized_linear(), inputs(4, 5).requires_grad_()
    layer._parameters["weight"].requires_grad_(False)
    with cached_quantized_weights(layer):
        with torch.inference_mode():
            layer(x.detach())
        layer(x).sum().backward()   # an inference tensor here would raise
    # The gradient of the sum through the quantized weight: its column sums in every row.
    expected = layer.weight.detach().sum(0).expand_as(x)
    assert torch.allclose(x.grad, expected, rtol=1e-6, atol=1e-6)


def lowered_linear(bits: int = 4) -> nn.Linear:
    layer = quantized_linear(bits)
    layer.weight_quantizer = LoweredWeight.from_fake_quant(layer.weight_quantizer,
                                                           layer._parameters.pop("weight"))
    return layer


def test_a_lowered_weight_is_dequantized_once_across_forwards(monkeypatch):
    layer, x = lowered_linear(), inputs(4, 5)
    expected = layer(x)
    calls = count_calls(monkeypatch, "dequantize")
    with cached_quantized_weights(layer):
        outputs = [layer(x) for _ in range(3)]
    assert calls[0] == 1
    assert all(torch.equal(output, expected) for output in outputs)


def test_a_lowered_weight_is_dequantized_again_after_its_codes_change():
    layer, x = lowered_linear(), inputs(4, 5)
    with cached_quantized_weights(layer):
        layer(x)
        layer.weight_quantizer.codes.neg_()
        after = layer(x)
    assert torch.equal(after, layer(x))


@pytest.mark.parametrize("make", [quantized_linear, lowered_linear], ids=["fake_quant", "lowered"])
@pytest.mark.parametrize("duplicate", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))],
                         ids=["deepcopy", "pickle"])
def test_a_copy_made_inside_a_cache_block_does_not_cache(make, duplicate):
    layer, x = make(), inputs(4, 5)
    with torch.no_grad(), cached_quantized_weights(layer):
        expected = layer(x)
        copied = duplicate(layer)
    assert copied.weight_quantizer.cache is None
    with torch.no_grad():
        assert torch.equal(copied(x), expected)
