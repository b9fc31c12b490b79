"""Specification of the probe pass (passes/probe.py): one eager forward, recording which
Parameters its ops consume as weights, with the kind, the module that used each first and the
ops a transformed weight went through."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from msq_fx.passes.probe import ProbeError, probe

X = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))


class Functional(nn.Module):
    """Uses its own Parameters functionally, in ways a module walk cannot classify."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Parameter(torch.randn(5, 4))  # F.linear weight
        self.right = nn.Parameter(torch.randn(4, 5))  # read transposed by matmul: (5, 4).t()
        self.query = nn.Parameter(torch.randn(1, 3))  # left operand of a matmul: a learned token
        self.pos = nn.Parameter(torch.randn(3, 5))  # added: a position embedding
        self.gamma = nn.Parameter(torch.ones(5))  # 1-D: a layer-scale gamma

    def forward(self, x):
        h = F.linear(x, self.proj) + self.pos
        h = (h @ self.right.t()) * self.gamma[:4].sum()
        return self.query @ h


class HeadRegisteredFirst(nn.Module):
    """Registers its head before the projection its forward applies first."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(5, 2)
        self.proj = nn.Parameter(torch.randn(5, 4))

    def forward(self, x):
        return self.head(F.linear(x, self.proj))


class DataDependent(nn.Module):
    """Control flow on a tensor value, which torch.fx cannot trace."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) if float(x.sum()) > -1e9 else x


class Recorder(nn.Module):
    """Records the mode and grad mode its forward runs in."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bool, bool]] = []

    def forward(self, x):
        self.seen.append((self.training, torch.is_grad_enabled()))
        return x


class Standardized(nn.Linear):
    """Standardizes its whole weight before use (weight standardization, in plain ops)."""

    def forward(self, x):
        return F.linear(x, (self.weight - self.weight.mean()) / self.weight.std(), self.bias)


class Raising(nn.Module):
    def forward(self, x):
        raise KeyError("missing")


def test_module_weights_are_recorded_with_their_kind():
    model = nn.Sequential(nn.Conv2d(2, 4, 1), nn.Conv2d(4, 4, 1, groups=4), nn.Flatten(),
                          nn.Linear(4 * 3 * 4, 2))
    assert probe(model, (torch.randn(1, 2, 3, 4),)).kinds == {
        "0.weight": "conv", "1.weight": "depthwise", "3.weight": "linear"}


def test_weights_are_listed_in_order_of_first_use():
    assert list(probe(HeadRegisteredFirst(), (X,)).kinds) == ["proj", "head.weight"]


def test_a_tied_parameter_is_listed_under_every_fqn():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight
    assert probe(model, (X,)).kinds == {"0.weight": "linear", "1.weight": "linear"}


def test_functional_weight_operands_are_recorded_and_other_parameters_are_not():
    assert probe(Functional(), (X,)).kinds == {"proj": "linear", "right": "linear"}


def test_users_name_the_module_whose_forward_made_the_first_use():
    model = nn.Sequential(nn.Linear(4, 4), Functional())
    assert probe(model, (X,)).users == {"0.weight": "0", "1.proj": "1", "1.right": "1"}


def test_a_use_by_the_root_forward_is_attributed_to_the_root():
    assert probe(Functional(), (X,)).users["proj"] == ""


def test_code_torch_fx_cannot_trace_is_probed_like_any_other():
    assert probe(DataDependent(), (X,)).kinds == {"fc.weight": "linear"}


def test_the_forward_runs_once_in_eval_mode_without_gradients():
    model = Recorder().train()
    probe(model, (X,))
    assert model.seen == [(False, False)]


def test_a_failing_forward_still_restores_the_flags_and_removes_the_hooks():
    model = nn.Sequential(nn.Linear(4, 4), Raising()).train()
    with pytest.raises(ProbeError):
        probe(model, (X,))
    assert all(m.training for m in model.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_a_probe_error_keeps_the_original_exception_as_its_cause():
    with pytest.raises(ProbeError, match=r"module '1' \(Raising\) raised KeyError") as caught:
        probe(nn.Sequential(nn.Linear(4, 4), Raising()), (X,))
    assert isinstance(caught.value.__cause__, KeyError)


def test_a_weight_transformed_before_use_is_recorded_with_the_ops_not_as_a_use():
    result = probe(Standardized(4, 3), (X,))
    assert result.kinds == {}
    assert result.transformed == {"weight": ("div", "mean", "std", "sub")}  # sorted


def test_weights_used_as_they_are_are_not_transformed():
    assert probe(Functional(), (X,)).transformed == {}
