"""Hessian traces through ops whose CPU backward has no derivative of its own, and finite
differences that hold the activation pattern of piecewise-linear ops fixed."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import msq_fx
from msq_fx.hessian import finite_difference_traces, hutchinson_traces
from msq_fx.second_order import FrozenKinks, hardsigmoid_by_clamp, twice_differentiable


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
    qmodel = msq_fx.prepare(model, inputs, msq_fx.MSQConfig(pruning=dict(interval=1)))
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


# --------------------------------------------------------------------------- frozen kinks

KINKED_OPS = {
    "F.relu": F.relu, "torch.relu": torch.relu, "Tensor.relu": torch.Tensor.relu,
    "nn.ReLU(inplace)": lambda x: nn.ReLU(inplace=True)(x.clone()),
    "Tensor.relu_": lambda x: x.clone().relu_(),
    "nn.ReLU6": nn.ReLU6(), "F.relu6": F.relu6, "hardtanh": lambda x: F.hardtanh(x, -0.5, 0.7),
    "leaky_relu": lambda x: F.leaky_relu(x, 0.2), "hardswish": F.hardswish,
    "hardsigmoid": F.hardsigmoid,
    # In place on an intermediate, as timm's and torchvision's activation layers do.
    "nn.Hardswish(inplace)": lambda x: nn.Hardswish(inplace=True)(x * 1),
    "nn.Hardsigmoid(inplace)": lambda x: nn.Hardsigmoid(inplace=True)(x * 1),
    "nn.ReLU6(inplace)": lambda x: nn.ReLU6(inplace=True)(x * 1),
    "nn.LeakyReLU(inplace)": lambda x: nn.LeakyReLU(0.1, inplace=True)(x * 1),
    "relu_ then use": lambda x: (lambda y: (y.relu_(), y * 2)[1])(x * 1),
    "max_pool1d": lambda x: F.max_pool1d(x.flatten(2), 2),
    "max_pool2d": nn.MaxPool2d(2), "max_pool3d": lambda x: F.max_pool3d(x.unsqueeze(1), 2),
    "max_pool2d, indices": lambda x: F.max_pool2d(x, 3, 1, 1, return_indices=True)[0],
    "threshold": lambda x: F.threshold(x, 0.5, -2.0), "nn.Threshold(inplace)":
        lambda x: nn.Threshold(-0.3, 1.5, inplace=True)(x * 1),
    "adaptive_max_pool1d": lambda x: F.adaptive_max_pool1d(x.flatten(2), 5),
    "nn.AdaptiveMaxPool2d": nn.AdaptiveMaxPool2d((3, 2)),
    "adaptive_max_pool3d": lambda x: F.adaptive_max_pool3d(x.unsqueeze(1), (2, 3, 1)),
    "adaptive_max_pool2d, indices": lambda x: F.adaptive_max_pool2d(x, 1, return_indices=True)[0],
}


def replayed(op, x, recorded_at):
    kinks = FrozenKinks()
    with torch.no_grad(), kinks.recording("op"):
        op(recorded_at)
    with kinks.replaying("op"):
        return op(x)


@pytest.mark.parametrize("name", list(KINKED_OPS))
@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_replay_at_the_recorded_point_equals_the_op_in_value_and_gradient(name, seed):
    op = KINKED_OPS[name]
    x = (8 * torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
         ).requires_grad_()
    expected = op(x)
    actual = replayed(op, x, x.detach())
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)  # formulas may round apart
    weights = torch.randn(expected.shape, generator=torch.Generator().manual_seed(seed + 1))
    expected_grad, = torch.autograd.grad((expected * weights).sum(), x)
    actual_grad, = torch.autograd.grad((replayed(op, x, x.detach()) * weights).sum(), x)
    torch.testing.assert_close(actual_grad, expected_grad, rtol=0, atol=1e-6)


def test_replay_keeps_the_recorded_relu_pattern_where_the_sign_has_changed():
    recorded_at = torch.tensor([-1.0, 2.0, -3.0])
    x = torch.tensor([0.5, -0.5, -3.0])
    assert replayed(F.relu, x, recorded_at).tolist() == [0.0, -0.5, -0.0]


def test_replay_keeps_the_recorded_argmax_of_each_pooling_window():
    recorded_at = torch.tensor([[[1.0, 0.0, 0.0, 5.0]]])
    x = torch.tensor([[[1.0, 2.0, 7.0, 5.0]]])
    assert replayed(lambda t: F.max_pool1d(t, 2), x, recorded_at).tolist() == [[[1.0, 5.0]]]


def test_replay_keeps_the_recorded_threshold_pattern_and_fills_the_rest_with_the_value():
    recorded_at = torch.tensor([0.0, 2.0, 3.0])
    x = torch.tensor([5.0, 0.5, 3.0])
    assert replayed(lambda t: F.threshold(t, 1.0, -7.0), x, recorded_at).tolist() == [
        -7.0, 0.5, 3.0]


def test_replay_keeps_the_recorded_argmax_of_each_adaptive_pooling_window():
    recorded_at = torch.tensor([[[1.0, 0.0, 0.0, 5.0, 2.0, 0.0]]])
    x = torch.tensor([[[1.0, 2.0, 7.0, 5.0, 2.0, 9.0]]])
    assert replayed(lambda t: F.adaptive_max_pool1d(t, 2), x, recorded_at).tolist() == [
        [[1.0, 5.0]]]


def test_replay_refuses_an_input_of_another_shape_naming_the_op():
    with pytest.raises(RuntimeError, match="relu: input of shape \\(4,\\) where the recorded"):
        replayed(F.relu, torch.randn(4), torch.randn(3))


def test_replay_refuses_a_forward_that_makes_more_or_fewer_kinked_calls():
    kinks = FrozenKinks()
    with kinks.recording("op"):
        F.relu(torch.randn(3))
    with pytest.raises(RuntimeError, match="more piecewise-linear calls than the recorded pass"):
        with kinks.replaying("op"):
            F.relu(F.relu(torch.randn(3)))
    with pytest.raises(RuntimeError, match="made 0 piecewise-linear calls where the recorded"):
        with kinks.replaying("op"):
            torch.randn(3).exp()


class KinkedNet(nn.Module):
    """conv -> a piecewise-linear activation -> a max pooling to 4x4 or 3x3 -> linear."""

    def __init__(self, activation, pool, pooled_side: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.activation, self.pool = activation, pool
        self.fc = nn.Linear(6 * pooled_side ** 2, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.activation(self.conv(x))).flatten(1))


KINKED_NETS = {
    "relu, max_pool2d": lambda: KinkedNet(F.relu, lambda x: F.max_pool2d(x, 2), 4),
    # Overlapping adaptive windows; the threshold's fill value is not its threshold.
    "threshold, adaptive_max_pool2d": lambda: KinkedNet(
        lambda x: F.threshold(x, 0.1, -0.2), lambda x: F.adaptive_max_pool2d(x, 3), 3),
}


@pytest.mark.parametrize("net", list(KINKED_NETS))
@pytest.mark.parametrize("relative_step, rtol", [(1e-2, 1e-3), (1e-4, 1e-6)])
def test_finite_differences_with_frozen_kinks_equal_the_double_backward(net, relative_step, rtol):
    torch.manual_seed(0)
    model = KINKED_NETS[net]().double()
    inputs = torch.randn(16, 3, 8, 8, dtype=torch.float64)
    targets = torch.randint(0, 4, (16,))
    params = [model.conv.weight, model.fc.weight]

    def loss():
        return F.cross_entropy(model(inputs), targets)

    def traces(estimator, **options):
        return estimator(loss, params, max_samples=3, min_samples=3,
                         generator=torch.Generator().manual_seed(1), **options).traces

    exact = traces(hutchinson_traces)
    frozen = traces(finite_difference_traces, relative_step=relative_step)
    torch.testing.assert_close(frozen, exact, rtol=rtol, atol=0)  # the smooth part's O(h^2)
    # Without the frozen pattern, a step this large crosses kinks and the traces move.
    if relative_step == 1e-2:
        crossing = traces(finite_difference_traces, relative_step=relative_step,
                          frozen_kinks=False)
        assert not torch.allclose(crossing, exact, rtol=1e-2)
