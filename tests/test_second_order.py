"""Hessian traces through ops whose CPU backward has no derivative of its own."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import msq_fx
from msq_fx.second_order import hardsigmoid_by_clamp, twice_differentiable


def test_hardsigmoid_by_clamp_equals_hardsigmoid_in_value_and_gradient():
    x = torch.linspace(-5, 5, 101, requires_grad=True)
    expected, = torch.autograd.grad(F.hardsigmoid(x).sum(), x)
    actual, = torch.autograd.grad(hardsigmoid_by_clamp(x).sum(), x)
    assert torch.equal(hardsigmoid_by_clamp(x), F.hardsigmoid(x))
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("op", ["hardsigmoid", "attention"])
def test_double_backward_fails_without_the_context_and_works_inside_it(op):
    x = torch.randn(1, 2, 4, 8, requires_grad=True)

    def loss():
        y = F.hardsigmoid(x) if op == "hardsigmoid" else F.scaled_dot_product_attention(x, x, x)
        return (y ** 2).sum()

    def second_derivative():
        grad, = torch.autograd.grad(loss(), x, create_graph=True)
        grad.sum().backward()

    with pytest.raises(RuntimeError, match="derivative for"):
        second_derivative()
    with twice_differentiable():
        second_derivative()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def _prune_once(model: nn.Module, inputs: torch.Tensor) -> list:
    qmodel = msq_fx.prepare(model, inputs, msq_fx.MSQConfig(prune_interval=1))
    controller = msq_fx.MSQController(qmodel)
    targets = torch.zeros(inputs.shape[0], dtype=torch.long)
    return controller.epoch_end(1, [(inputs, targets)], F.cross_entropy)


def test_hessian_guided_prune_runs_on_mobilenet_v3_hardsigmoid_gates():
    torch.manual_seed(0)
    records = _prune_once(torchvision.models.mobilenet_v3_small(num_classes=10),
                          torch.randn(2, 3, 32, 32))
    assert records and all(r.hessian_trace is not None for r in records)


def test_hessian_guided_prune_runs_on_multihead_attention():
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=1,
                                               num_heads=2, hidden_dim=32, mlp_dim=64,
                                               num_classes=10)
    records = _prune_once(vit, torch.randn(2, 3, 32, 32))
    assert any(r.kind == "attention" for r in records)
    assert all(r.hessian_trace is not None for r in records)
