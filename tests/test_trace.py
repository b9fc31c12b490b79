"""Specification of msq_fx.passes.trace.trace: a leaf-aware FX capture that never raises."""

from __future__ import annotations

import logging

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from timm.layers import resample_abs_pos_embed
from torch import fx, nn
from torchvision.ops import Conv2dNormActivation, StochasticDepth

from msq_fx.passes.trace import CapturedGraph, trace

# A small timm model that plain torch.fx.symbolic_trace cannot trace (Proxy used in control flow).
UNTRACEABLE_TIMM_MODEL = "mobilevit_xxs"


# ---------------------------------------------------------------- helpers


def call_module_targets(captured: CapturedGraph) -> list[str]:
    return [n.target for n in captured.graph_module.graph.nodes if n.op == "call_module"]


def get_attr_targets(captured: CapturedGraph) -> list[str]:
    return [n.target for n in captured.graph_module.graph.nodes if n.op == "get_attr"]


class DataDependent(nn.Module):
    """Branches on a tensor value: symbolic tracing cannot follow its forward."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return -x


class Wrapper(nn.Module):
    """Traceable itself; its child is not."""

    def __init__(self):
        super().__init__()
        self.before = nn.Linear(4, 4)
        self.inner = DataDependent()

    def forward(self, x):
        return self.inner(self.before(x))


class Reraising(nn.Module):
    """Turns its child's tracing error into its own (eagerly, the child never fails)."""

    def __init__(self):
        super().__init__()
        self.child = DataDependent()

    def forward(self, x):
        try:
            return self.child(x)
        except Exception as error:
            raise RuntimeError("child failed") from error


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class Net(nn.Module):
    def __init__(self, middle: nn.Module):
        super().__init__()
        self.stem = nn.Linear(4, 4)
        self.middle = middle
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.middle(self.stem(x)))


class FunctionalProjection(nn.Module):
    """Uses ``proj``'s weight without calling ``proj`` (as BEiT/EVA02 do with qkv)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        return F.linear(x, self.proj.weight)


class Flagged(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, flag=True):
        if flag:
            return self.fc(x)
        return torch.sigmoid(x)


class MessyForward(nn.Module):
    """Everything tracing could leave behind: a tensor constant fx stores on the root, a value
    cached on a submodule from a Proxy, a frozen training branch and a retried child."""

    def __init__(self):
        super().__init__()
        self.block = Block()
        self.gate = DataDependent()
        self.norm = nn.BatchNorm1d(4)

    def forward(self, x):
        self.block.last_input = x
        x = self.block(x) + torch.ones(4)
        if self.training:
            x = self.norm(x)
        return self.gate(x)


def model_snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "modules": [(name, type(m)) for name, m in model.named_modules()],
        "params": [(name, p.requires_grad) for name, p in model.named_parameters()],
        "training": [m.training for m in model.modules()],
        "attributes": [sorted(vars(m)) for m in model.modules()],
    }


def assert_same_snapshot(before: dict, after: dict) -> None:
    assert before["state"].keys() == after["state"].keys()
    for key, tensor in before["state"].items():
        assert torch.equal(tensor, after["state"][key]), key
    for field in ("modules", "params", "training", "attributes"):
        assert before[field] == after[field], field


# ---------------------------------------------------------------- plain models


def test_torchvision_resnet_traces_with_only_default_leaves():
    model = torchvision.models.resnet18()
    captured = trace(model)
    convs = {name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert captured.failure is None
    assert captured.leaves == {}
    assert convs <= set(call_module_targets(captured))


def test_num_nodes_counts_graph_nodes():
    captured = trace(Net(Block()))
    assert captured.num_nodes == len(captured.graph_module.graph.nodes) == 7
    assert CapturedGraph(None, {}, "x").num_nodes == 0


def test_functional_weight_use_is_a_get_attr_node():
    captured = trace(FunctionalProjection())
    assert "proj.weight" in get_attr_targets(captured)
    assert "proj" not in call_module_targets(captured)


def test_concrete_args_select_the_branch():
    captured = trace(Flagged(), concrete_args={"flag": False})
    targets = [n.target for n in captured.graph_module.graph.nodes]
    assert torch.sigmoid in targets
    assert "fc" not in targets


# ---------------------------------------------------------------- retry


def test_untraceable_child_becomes_a_retry_leaf():
    captured = trace(Net(DataDependent()))
    assert captured.failure is None
    assert list(captured.leaves) == ["middle"]
    assert captured.leaves["middle"].startswith("retry: TraceError: ")
    assert call_module_targets(captured) == ["stem", "middle", "head"]


def test_retry_blames_the_innermost_module():
    captured = trace(Net(Wrapper()))
    assert list(captured.leaves) == ["middle.inner"]
    assert call_module_targets(captured) == ["stem", "middle.before", "middle.inner", "head"]


def test_error_reraised_by_the_root_is_blamed_on_the_child():
    captured = trace(Reraising())
    assert list(captured.leaves) == ["child"]
    assert captured.leaves["child"].startswith("retry: TraceError: ")


def test_retry_is_logged_with_the_module_name(caplog):
    with caplog.at_level(logging.INFO, logger="msq_fx"):
        trace(Net(DataDependent()))
    retries = [r for r in caplog.records if r.name == "msq_fx" and r.levelno == logging.INFO]
    assert len(retries) == 1
    assert "'middle'" in retries[0].getMessage() and "DataDependent" in retries[0].getMessage()


def test_untraceable_root_forward_returns_no_graph():
    captured = trace(DataDependent())  # as the root, its forward has no parent to fall back on
    assert captured.graph_module is None
    assert captured.num_nodes == 0
    assert "DataDependent" in captured.failure and "TraceError" in captured.failure


def test_exhausted_retries_return_no_graph_naming_the_module():
    captured = trace(Net(DataDependent()), max_retries=0)
    assert captured.graph_module is None
    assert "'middle'" in captured.failure and "DataDependent" in captured.failure


# ---------------------------------------------------------------- user leaves


@pytest.mark.parametrize("leaf", ["middle", Block, "Block"], ids=["fqn", "class", "class-name"])
def test_user_leaf_is_one_call_module_node(leaf):
    captured = trace(Net(Block()), leaf_modules=[leaf])
    assert captured.leaves == {"middle": "user"}
    assert call_module_targets(captured) == ["stem", "middle", "head"]


def test_user_leaf_by_fqn_matches_an_alias_of_a_shared_module():
    model = Net(Block())
    model.alias = model.middle  # registered after "middle", so fx names it "middle"
    captured = trace(model, leaf_modules=["alias"])
    assert call_module_targets(captured) == ["stem", "middle", "head"]


def test_unknown_user_leaf_name_is_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="msq_fx"):
        captured = trace(Net(Block()), leaf_modules=["no_such_module"])
    assert captured.leaves == {}
    assert any("no_such_module" in r.getMessage() for r in caplog.records)


def test_leaf_entry_of_wrong_type_is_rejected():
    with pytest.raises(TypeError, match="leaf_modules"):
        trace(Net(Block()), leaf_modules=[3])


# ---------------------------------------------------------------- registries


def test_timm_model_plain_fx_cannot_trace_now_traces():
    model = timm.create_model(UNTRACEABLE_TIMM_MODEL, pretrained=False)
    with pytest.raises(Exception):
        fx.symbolic_trace(model)
    captured = trace(model)
    assert captured.graph_module is not None
    assert "registry:timm" in captured.leaves.values()
    assert set(captured.leaves) <= set(call_module_targets(captured))


def test_timm_notrace_function_is_one_call_function_node():
    class PosEmbed(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Parameter(torch.zeros(1, 16, 8))

        def forward(self, x):
            return x + resample_abs_pos_embed(self.pos, new_size=(x.shape[1], x.shape[2]))

    captured = trace(PosEmbed())
    targets = [n.target for n in captured.graph_module.graph.nodes if n.op == "call_function"]
    assert resample_abs_pos_embed in targets


def test_torchvision_kernel_op_is_a_leaf_but_composite_block_is_traced():
    model = nn.Sequential(Conv2dNormActivation(3, 8), StochasticDepth(0.1, "row"))
    captured = trace(model)
    assert captured.leaves == {"1": "registry:torchvision"}
    assert {"0.0", "0.1", "1"} <= set(call_module_targets(captured))


# ---------------------------------------------------------------- the model is left alone


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_tracing_leaves_the_model_unchanged(training):
    model = MessyForward().train(training)
    before = model_snapshot(model)
    captured = trace(model)
    assert captured.graph_module is not None and "gate" in captured.leaves
    assert_same_snapshot(before, model_snapshot(model))
    model(torch.randn(3, 4))  # still runs eagerly: nothing traced is left on it


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_training_branches_are_frozen_in_the_current_mode(training):
    captured = trace(MessyForward().train(training))
    assert ("norm" in call_module_targets(captured)) is training
    assert captured.graph_module.training is training
