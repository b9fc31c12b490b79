"""Specification of the rewrite pass (passes/rewrite.py): ``rewrite`` installs a quantizer on
every target of a ``Discovery`` it is handed, ``unrewritable`` names the targets whose owner
cannot carry one, ``unrewrite`` undoes ``rewrite``.

Discoveries are built by hand here, so these tests do not depend on the discover pass."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import msq_fx
from msq_fx import quant
from msq_fx.modules import ActivationFakeQuant, WeightFakeQuant
from msq_fx.owners import is_quantized_owner
from msq_fx.passes.discover import Discovery, WeightTarget
from msq_fx.passes.rewrite import RewriteError, rewrite, unrewritable, unrewrite


def plain() -> msq_fx.MSQConfig:
    """Weights quantized at the default width; no activation quantizers, no recompute hooks."""
    return msq_fx.MSQConfig(quantization=dict(recompute_quantized_weights=False))


def stack() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def target(model: nn.Module, *fqns: str, kind: str = "linear") -> WeightTarget:
    return WeightTarget(fqns, kind, tuple(model.get_parameter(fqns[0]).shape))


def every_linear(model: nn.Module, **kwargs) -> Discovery:
    return Discovery(targets=[target(model, f"{name}.weight") for name, module in
                              model.named_modules() if isinstance(module, nn.Linear)], **kwargs)


class OwnsParameterInContainer(nn.Module):
    """An nn.Sequential that owns a Parameter directly, read by its parent."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 4))
        self.body.register_parameter("extra", nn.Parameter(torch.randn(3, 4)))

    def forward(self, x):
        return nn.functional.linear(self.body(x), self.body.extra)


# ---------------------------------------------------------------- rewrite


def test_each_owner_keeps_its_class_as_base_and_gains_a_quantizer_child():
    model = stack()
    rewrite(model, every_linear(model), plain())
    for layer in (model[0], model[2]):
        assert is_quantized_owner(layer) and isinstance(layer, nn.Linear)
        assert isinstance(layer.weight_quantizer, WeightFakeQuant)


def test_the_quantizer_starts_at_init_bits_with_the_target_kind_and_names():
    model = stack()
    rewrite(model, Discovery(targets=[target(model, "2.weight")]),
            msq_fx.MSQConfig(quantization=dict(init_bits=6)))
    quantizer = model[2].weight_quantizer
    assert (quantizer.num_bits, quantizer.kind, quantizer.names) == (6, "linear", ("2.weight",))
    assert not is_quantized_owner(model[0])


def test_the_owner_reads_its_weight_through_the_quantizer():
    model = stack()
    latent = model[0].weight.detach().clone()
    rewrite(model, every_linear(model), msq_fx.MSQConfig(quantization=dict(init_bits=3)))
    assert torch.equal(model[0].weight, quant.fake_quantize(latent, 3))
    assert torch.equal(model[0]._parameters["weight"], latent)  # the latent is not moved


def test_tied_uses_share_one_quantizer():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight
    rewrite(model, Discovery(targets=[target(model, "0.weight", "1.weight")]), plain())
    assert model[0].weight_quantizer is model[1].weight_quantizer
    assert model[0].weight_quantizer.names == ("0.weight", "1.weight")


def test_a_module_registered_under_two_names_is_rewritten_once():
    model = stack()
    model.alias = model[0]
    rewrite(model, Discovery(targets=[target(model, "0.weight", "alias.weight")]), plain())
    assert type(model[0]).__bases__ == (nn.Linear,)


def test_every_weight_is_its_own_group_by_default():
    model = stack()
    rewrite(model, every_linear(model), plain())
    assert [model[i].weight_quantizer.group for i in (0, 2)] == ["0.weight", "2.weight"]


def test_groups_map_weights_to_their_group():
    model = stack()
    rewrite(model, every_linear(model), plain(), {"0.weight": "0.weight", "2.weight": "0.weight"})
    assert [model[i].weight_quantizer.group for i in (0, 2)] == ["0.weight", "0.weight"]


def test_fixed_width_targets_get_quantizers_that_are_not_prunable():
    model = stack()
    rewrite(model, every_linear(model, fixed_width=frozenset({"2.weight"})), plain())
    assert [model[i].weight_quantizer.prunable for i in (0, 2)] == [True, False]


def test_fixed_width_targets_start_at_first_last_bits_and_the_rest_at_init_bits():
    model = stack()
    config = msq_fx.MSQConfig(quantization=dict(init_bits=3, first_last="fixed", first_last_bits=8,
                                                recompute_quantized_weights=False))
    rewrite(model, every_linear(model, fixed_width=frozenset({"2.weight"})), config)
    assert [model[i].weight_quantizer.num_bits for i in (0, 2)] == [3, 8]


def test_rewrite_fixes_no_width_the_discovery_does_not_name():
    model = stack()
    rewrite(model, every_linear(model), msq_fx.MSQConfig(quantization=dict(first_last="fixed")))
    assert all(model[i].weight_quantizer.prunable for i in (0, 2))


def test_act_bits_gives_each_owner_an_input_quantizer():
    model = stack()
    rewrite(model, every_linear(model), msq_fx.MSQConfig(quantization=dict(act_bits=4)))
    assert all(isinstance(model[i].input_quantizer, ActivationFakeQuant) for i in (0, 2))


def test_without_act_bits_owners_get_no_input_quantizer():
    model = stack()
    rewrite(model, every_linear(model), plain())
    assert not any(hasattr(model[i], "input_quantizer") for i in (0, 2))


@pytest.mark.parametrize("recompute", [True, False])
def test_recompute_quantized_weights_installs_the_model_hooks(recompute):
    model = stack()
    config = msq_fx.MSQConfig(quantization=dict(recompute_quantized_weights=recompute))
    rewrite(model, every_linear(model), config)
    assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == (recompute, recompute)
    assert model[0].weight_quantizer.recompute is recompute


def test_rewrite_refuses_an_unrewritable_target_before_changing_anything():
    model = OwnsParameterInContainer()
    discovery = Discovery(targets=[target(model, "body.0.weight"), target(model, "body.extra")])
    with pytest.raises(RewriteError, match=r"body\.extra: its owner 'body' \(Sequential\)"):
        rewrite(model, discovery, plain())
    assert not any(is_quantized_owner(m) for m in model.modules())


# ---------------------------------------------------------------- unrewritable


def test_unrewritable_names_a_container_owning_a_parameter_with_the_reason():
    model = OwnsParameterInContainer()
    targets = [target(model, "body.0.weight"), target(model, "body.extra")]
    (refused,) = unrewritable(model, targets, plain())
    assert (refused.name, refused.kind) == ("body.extra", "linear")
    assert "is a container (nn.Sequential/ModuleList/ModuleDict)" in refused.reason


def test_a_tied_tensor_with_one_refused_owner_is_refused_under_its_first_name():
    model = OwnsParameterInContainer()
    model.head = nn.Linear(4, 3)
    model.head.weight = model.body.extra
    (refused,) = unrewritable(model, [target(model, "head.weight", "body.extra")], plain())
    assert refused.name == "head.weight"
    assert refused.reason.startswith("tied to body.extra, and its owner 'body'")


def test_unrewritable_refuses_a_weight_its_class_defines_as_a_property():
    class PropertyWeight(nn.Module):
        weight = property(lambda self: self._parameters["weight"])

    model = nn.Sequential(PropertyWeight())
    model[0]._parameters["weight"] = nn.Parameter(torch.randn(4, 4))
    (refused,) = unrewritable(model, [target(model, "0.weight")], plain())
    assert "'weight' is a property of the class" in refused.reason


def test_unrewritable_accepts_ordinary_layers():
    model = stack()
    assert unrewritable(model, every_linear(model).targets, plain()) == []


# ---------------------------------------------------------------- unrewrite


def test_unrewrite_restores_the_classes_children_and_hooks():
    model = stack()
    rewrite(model, every_linear(model), msq_fx.MSQConfig(quantization=dict(act_bits=4)))
    unrewrite(model)
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear]
    assert all(not m._modules for m in model) and not model._forward_hooks
    assert not model._forward_pre_hooks
