"""Specification of the lower pass (passes/lower.py): every weight quantizer of a prepared model
becomes int8 codes + step + bit width giving the same weights, the latent is dropped, and each
calibrated activation quantizer is frozen."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import msq_fx
from msq_fx import quant
from msq_fx.modules import ActivationFakeQuant, LoweredActivation, LoweredWeight
from msq_fx.passes.lower import LowerError, lower

X = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))


def prepared(example=X, **config) -> nn.Module:
    """A prepared 4 -> 6 -> 3 stack; example=None leaves activation quantizers uncalibrated."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    return msq_fx.prepare(model, example,
                          msq_fx.MSQConfig(quantization=dict(init_bits=4, **config)))


def test_each_weight_quantizer_becomes_a_lowered_weight_of_int8_codes():
    qmodel = prepared()
    lower(qmodel)
    for layer in (qmodel[0], qmodel[2]):
        lowered = layer.weight_quantizer
        assert isinstance(lowered, LoweredWeight)
        assert lowered.codes.dtype == torch.int8 and lowered.num_bits == 4


def test_the_lowered_weight_equals_the_fake_quantized_weight_bit_for_bit():
    qmodel = prepared()
    expected = quant.fake_quantize(qmodel[0]._parameters["weight"].detach(), 4)
    lower(qmodel)
    assert torch.equal(qmodel[0].weight, expected)


def test_the_codes_hold_the_bit_width_the_quantizer_had():
    qmodel = prepared()
    qmodel[2].weight_quantizer.bits.fill_(2)
    lower(qmodel)
    assert qmodel[2].weight_quantizer.num_bits == 2
    assert set(qmodel[2].weight_quantizer.codes.unique().tolist()) <= {-2, -1, 0, 1}


def test_the_latent_weight_is_removed_and_the_bias_stays():
    qmodel = prepared()
    bias = qmodel[0].bias.detach().clone()
    lower(qmodel)
    assert "weight" not in qmodel[0]._parameters
    assert torch.equal(qmodel[0].bias, bias)


def test_tied_uses_keep_sharing_one_lowered_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight
    qmodel = msq_fx.prepare(model, X)
    lower(qmodel)
    assert isinstance(qmodel[0].weight_quantizer, LoweredWeight)
    assert qmodel[0].weight_quantizer is qmodel[1].weight_quantizer


def test_the_model_computes_what_the_prepared_model_computed():
    qmodel = prepared(act_bits=4)
    with torch.no_grad():
        expected = qmodel.eval()(X)
        lower(qmodel)
        assert torch.equal(qmodel(X), expected)


def test_a_calibrated_activation_quantizer_becomes_a_lowered_activation():
    qmodel = prepared(act_bits=4)
    lower(qmodel)
    assert isinstance(qmodel[0].input_quantizer, LoweredActivation)


def test_an_activation_quantizer_that_never_saw_an_input_stays_as_it_is():
    qmodel = prepared(example=None, act_bits=4)
    quantizer = qmodel[0].input_quantizer
    lower(qmodel)
    assert qmodel[0].input_quantizer is quantizer and isinstance(quantizer, ActivationFakeQuant)


def test_the_recompute_hooks_are_removed():
    qmodel = prepared(recompute_quantized_weights=True)
    assert qmodel._forward_pre_hooks
    lower(qmodel)
    assert not qmodel._forward_pre_hooks and not qmodel._forward_hooks


def test_one_at_a_time_lowers_to_the_same_codes():
    together, one_by_one = prepared(), prepared()
    lower(together)
    lower(one_by_one, one_at_a_time=True)
    for i in (0, 2):
        assert torch.equal(together[i].weight_quantizer.codes, one_by_one[i].weight_quantizer.codes)


def test_a_missing_latent_raises_naming_the_weight_and_changes_nothing():
    qmodel = prepared()
    del qmodel[2]._parameters["weight"]
    with pytest.raises(LowerError, match=r"^2\.weight: the latent weight is missing"):
        lower(qmodel)
    assert "weight" in qmodel[0]._parameters
    assert not isinstance(qmodel[0].weight_quantizer, LoweredWeight)


def test_a_width_above_eight_bits_raises_naming_the_weight():
    qmodel = prepared()
    qmodel[0].weight_quantizer.bits.fill_(9)
    with pytest.raises(LowerError, match=r"^0\.weight: 9-bit codes do not fit an int8 container"):
        lower(qmodel)
