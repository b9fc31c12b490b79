"""Specification of the discover pass (passes/discover.py): which weights it finds, with which
kind, in which order, which it leaves in float and why, and which layers ``first_last`` means."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import msq_fx
from msq_fx.passes.discover import Discovery, FloatWeight, discover


def discovered(model: nn.Module, config: msq_fx.MSQConfig | None = None, *, graph: bool = True,
               **kwargs) -> Discovery:
    graph_module = fx.symbolic_trace(model) if graph else None
    return discover(model, graph_module, config or msq_fx.MSQConfig(), **kwargs)


def names(discovery: Discovery) -> list[str]:
    return [t.name for t in discovery.targets]


def floats(discovery: Discovery) -> list[str]:
    return [f.name for f in discovery.float_weights]


def mlp() -> nn.Sequential:
    """Four Linear layers: 0.weight reads the input, 6.weight produces the output."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


class ReversedDefinition(nn.Module):
    """Defines its layers in the opposite order to the one its forward uses them in."""

    def __init__(self) -> None:
        super().__init__()
        self.late = nn.Linear(6, 3)
        self.early = nn.Linear(4, 6)

    def forward(self, x):
        return self.late(self.early(x))


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(self.a(x))


class FunctionalWeight(nn.Module):
    """A bare Parameter applied with F.linear, which no module walk recognises."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Parameter(torch.randn(5, 4))

    def forward(self, x):
        return F.linear(x, self.proj)


# ---------------------------------------------------------------- what is found


def test_conv_depthwise_and_linear_weights_are_found_with_their_kind():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=8), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 2))
    kinds = {t.name: t.kind for t in discovered(model).targets}
    assert kinds == {"0.weight": "conv", "1.weight": "depthwise", "3.weight": "linear"}


def test_multihead_attention_projections_are_attention_weights():
    kinds = {t.name: t.kind for t in discovered(nn.MultiheadAttention(8, 2), graph=False).targets}
    assert kinds == {"in_proj_weight": "attention", "out_proj.weight": "attention"}


def test_biases_and_norm_scales_are_not_targets():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    discovery = discovered(model)
    assert names(discovery) == ["0.weight"] and discovery.float_weights == []


def test_targets_are_in_execution_order_not_definition_order():
    assert names(discovered(ReversedDefinition())) == ["early.weight", "late.weight"]


def test_a_tied_tensor_is_one_target_carrying_every_fqn():
    (target,) = discovered(Tied()).targets
    assert target.fqns == ("a.weight", "b.weight") and target.shape == (4, 4)


def test_a_functional_weight_is_found_in_the_graph():
    discovery = discovered(FunctionalWeight())
    assert [(t.name, t.kind) for t in discovery.targets] == [("proj", "linear")]


def test_a_functional_weight_is_found_from_the_probe_record_without_a_graph():
    discovery = discovered(FunctionalWeight(), graph=False, probed={"proj": "linear"})
    assert names(discovery) == ["proj"] and discovery.notes == []


def test_without_graph_or_probe_an_unclassified_matrix_parameter_is_named_in_a_note():
    discovery = discovered(FunctionalWeight(), graph=False)
    assert names(discovery) == []
    assert len(discovery.notes) == 1 and "the model has no FX graph" in discovery.notes[0]
    assert ": proj." in discovery.notes[0]


def test_a_weight_read_through_other_ops_is_quantized_and_named_in_a_note():
    discovery = discovered(mlp(), transformed={"2.weight": ("batch_norm",)})
    assert "2.weight" in names(discovery)
    (note,) = discovery.notes
    assert "(batch_norm; e.g. weight standardization), 1: 2.weight." in note


def test_discover_changes_nothing():
    model = mlp()
    before = copy.deepcopy(model)
    discovered(model, msq_fx.MSQConfig(quantization=dict(first_last="float", exclude=(r"^2\.",))))
    assert [type(m) for m in model.modules()] == [type(m) for m in before.modules()]
    after, saved = model.state_dict(), before.state_dict()
    assert after.keys() == saved.keys()
    assert all(torch.equal(after[key], saved[key]) for key in saved)


# ---------------------------------------------------------------- what is left in float


def test_an_excluded_weight_is_left_in_float_with_the_pattern_as_reason():
    discovery = discovered(mlp(), msq_fx.MSQConfig(quantization=dict(exclude=(r"^4\.",))))
    assert "4.weight" not in names(discovery)
    assert discovery.float_weights == [
        FloatWeight("4.weight", "linear",
                    r"excluded by MSQConfig.quantization.exclude pattern '^4\\.'")]


def test_a_weight_refused_by_filter_fn_is_left_in_float():
    discovery = discovered(mlp(), filter_fn=lambda module, fqn: module.out_features != 4)
    assert floats(discovery) == ["6.weight"]
    assert discovery.float_weights[0].reason == "excluded by prepare's filter_fn"


def test_an_exclusion_matching_any_fqn_of_a_tied_tensor_leaves_all_of_it_in_float():
    discovery = discovered(Tied(), msq_fx.MSQConfig(quantization=dict(exclude=(r"^b\.",))))
    assert names(discovery) == [] and floats(discovery) == ["a.weight"]


def test_a_non_floating_point_weight_is_left_in_float():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    model[1].weight = nn.Parameter(torch.zeros(2, 4, dtype=torch.int8), requires_grad=False)
    discovery = discovered(model, graph=False)
    assert names(discovery) == ["0.weight"]
    assert discovery.float_weights[0].reason == "not a floating-point tensor (torch.int8)"


def test_leave_in_float_moves_targets_to_float_and_unfixes_them():
    discovery = discovered(mlp(), msq_fx.MSQConfig(quantization=dict(first_last="fixed")))
    moved = discovery.leave_in_float([FloatWeight("0.weight", "linear", "refused")])
    assert names(moved) == ["2.weight", "4.weight", "6.weight"]
    assert floats(moved) == ["0.weight"] and moved.fixed_width == {"6.weight"}
    assert names(discovery) == ["0.weight", "2.weight", "4.weight", "6.weight"]


# ---------------------------------------------------------------- first_last
# First and last are the first and last weights that will be quantized: exclusions and
# filter_fn are applied first, so the protected layers are the quantized model's edges.

EXCLUDE_FIRST = (r"^0\.",)


def test_first_last_fixed_fixes_the_first_and_last_weight_that_survive_exclusion():
    discovery = discovered(mlp(), msq_fx.MSQConfig(quantization=dict(first_last="fixed",
                                                                     exclude=EXCLUDE_FIRST)))
    assert discovery.fixed_width == {"2.weight", "6.weight"}
    assert names(discovery) == ["2.weight", "4.weight", "6.weight"]


def test_first_last_float_floats_the_first_and_last_weight_that_survive_exclusion():
    discovery = discovered(mlp(), msq_fx.MSQConfig(quantization=dict(first_last="float",
                                                                     exclude=EXCLUDE_FIRST)))
    assert names(discovery) == ["4.weight"] and discovery.fixed_width == frozenset()
    reasons = {f.name: f.reason for f in discovery.float_weights}
    assert reasons["2.weight"] == reasons["6.weight"] == (
        "first/last layer kept float (MSQConfig.quantization.first_last='float')")
    assert "exclude" in reasons["0.weight"]


def test_first_last_counts_from_the_weights_filter_fn_keeps():
    config = msq_fx.MSQConfig(quantization=dict(first_last="fixed"))
    assert discovered(mlp(), config, filter_fn=lambda module, fqn: module.out_features != 4
                      ).fixed_width == {"0.weight", "4.weight"}


def test_first_last_quantize_fixes_and_floats_nothing_beyond_the_exclusions():
    discovery = discovered(mlp(), msq_fx.MSQConfig(quantization=dict(first_last="quantize",
                                                                     exclude=EXCLUDE_FIRST)))
    assert discovery.fixed_width == frozenset() and floats(discovery) == ["0.weight"]


# Through prepare, as the controller sees it: "fixed" weights carry unprunable quantizers.
@pytest.mark.parametrize("policy, fixed, float_, prunable", [
    ("quantize", set(), {"0.weight"}, {"2.weight", "4.weight", "6.weight"}),
    ("fixed", {"2.weight", "6.weight"}, {"0.weight"}, {"4.weight"}),
    ("float", set(), {"0.weight", "2.weight", "6.weight"}, {"4.weight"}),
])
def test_first_last_policy_with_the_first_layer_excluded(policy, fixed, float_, prunable):
    config = msq_fx.MSQConfig(quantization=dict(first_last=policy, exclude=EXCLUDE_FIRST))
    report = msq_fx.report(msq_fx.prepare(mlp(), torch.randn(2, 8), config))
    assert {row.name for row in report.layers if not row.prunable} == fixed
    assert {row.name for row in report.layers if row.prunable} == prunable
    assert {row.name for row in report.float_weights} == float_
