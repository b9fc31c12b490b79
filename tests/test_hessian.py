"""Specification of msq_fx.hessian: hutchinson_traces and finite_difference_traces."""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from msq_fx.hessian import (HessianTraces, NoSecondDerivative, finite_difference_traces,
                            hutchinson_traces)
from msq_fx.probes import PackedSigns, ScaledProbes

# Tiny enough that the relative change of the running mean never drops under
# it for a non-diagonal Hessian, so the estimator runs to max_samples.
NEVER_CONVERGED = 1e-300


# ---------------------------------------------------------------- helpers


def exact_hessian(loss_fn, params) -> torch.Tensor:
    """The full Hessian over all tensors, flattened and concatenated: [N, N].

    Unlike hutchinson_traces, ``loss_fn`` here takes the tensors positionally
    (torch.autograd.functional.hessian differentiates a function's inputs).
    """
    blocks = torch.autograd.functional.hessian(loss_fn, tuple(p.detach() for p in params))
    rows = [
        torch.cat([blocks[n][m].reshape(p.numel(), q.numel()) for m, q in enumerate(params)], 1)
        for n, p in enumerate(params)
    ]
    return torch.cat(rows, 0)


def tensor_slices(params) -> list[slice]:
    """Where each tensor's entries sit in the flattened parameter vector."""
    ends = list(itertools.accumulate(p.numel() for p in params))
    return [slice(end - p.numel(), end) for end, p in zip(ends, params)]


def exact_traces(loss_fn, params) -> torch.Tensor:
    """Exact Tr(H_l) per tensor; ``loss_fn`` takes the tensors positionally."""
    hessian = exact_hessian(loss_fn, params)
    return torch.stack([hessian[s, s].trace() for s in tensor_slices(params)])


def joint_probe_variance(hessian: torch.Tensor, rows: slice) -> torch.Tensor:
    """Variance of one sample v_l . (H v)_l when v spans every tensor.

    The own block gives 2 (||H_ll||_F^2 - sum_i H_ll,ii^2), the variance of
    v^T H_ll v. Because one probe covers all tensors, (H v)_l also holds
    H_lm v_m for m != l: zero mean, independent of the own-block term, adding
    ||H_lm||_F^2 each. A per-tensor probe would not have these, but would cost
    one Hessian-vector product per tensor.
    """
    own_block = hessian[rows, rows]
    own = 2 * (own_block.pow(2).sum() - own_block.diagonal().pow(2).sum())
    cross = hessian[rows, :].pow(2).sum() - own_block.pow(2).sum()
    return own + cross


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def leaf(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


def quadratic(matrix: torch.Tensor):
    """0.5 x^T A x: its Hessian is A (for symmetric A)."""
    return lambda x: 0.5 * x @ matrix @ x


def random_symmetric(size: int, seed: int) -> torch.Tensor:
    m = torch.randn(size, size, dtype=torch.float64, generator=seeded(seed))
    return m + m.T


def mlp_cross_entropy():
    """A 2-layer tanh MLP on a fixed batch: its tensors and loss of them."""
    g = seeded(1234)
    inputs = torch.randn(16, 5, dtype=torch.float64, generator=g)
    labels = torch.randint(0, 4, (16,), generator=g)
    shapes = [(6, 5), (6,), (4, 6), (4,)]
    params = [
        (0.7 * torch.randn(s, dtype=torch.float64, generator=g)).requires_grad_()
        for s in shapes
    ]

    def loss_of(w1, b1, w2, b2):
        hidden = torch.tanh(inputs.to(w1.dtype) @ w1.T + b1)
        return F.cross_entropy(hidden @ w2.T + b2, labels)

    return params, loss_of


class RoundSTE(torch.autograd.Function):
    """Rounding with a straight-through (identity) backward."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


# ---------------------------------------------------------- 1. correctness


def test_estimate_is_within_statistical_error_of_exact_trace_on_mlp():
    params, loss_of = mlp_cross_entropy()
    samples = 400
    result = hutchinson_traces(
        lambda: loss_of(*params), params,
        max_samples=samples, min_samples=samples, tol=NEVER_CONVERGED,
        generator=seeded(0),
    )
    hessian = exact_hessian(loss_of, params)
    exact = exact_traces(loss_of, params)
    variance = torch.stack([joint_probe_variance(hessian, s) for s in tensor_slices(params)])
    standard_error = variance.div(samples).sqrt()

    assert result.samples == samples
    assert result.traces.dtype == torch.float64 and result.traces.shape == (4,)
    float_slack = 1e-9 * (1 + exact.abs())
    assert torch.all((result.traces - exact).abs() <= 4 * standard_error + float_slack)
    # The reported stderr estimates the same quantity from the samples (and
    # would be far above it if the cross-tensor terms were left out).
    spread = standard_error > 1e-12
    ratio = result.stderr[spread] / standard_error[spread]
    assert torch.all((ratio > 0.7) & (ratio < 1.4))


def test_exact_traces_helper_matches_hand_computed_quadratic():
    matrix = torch.tensor([[2.0, 1.0], [1.0, -5.0]], dtype=torch.float64)
    x = leaf([0.5, 0.5])
    assert exact_traces(quadratic(matrix), [x]).item() == pytest.approx(-3.0)


# ---------------------------------------------------------- 2. exactness


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=12), st.integers(0, 2**31))
def test_single_sample_on_diagonal_quadratic_is_exact(diagonal, seed):
    # v_i^2 = 1, so v^T A v = trace(A) for every Rademacher v when A is diagonal.
    matrix = torch.diag(torch.tensor(diagonal, dtype=torch.float64))
    x = torch.randn(len(diagonal), dtype=torch.float64).requires_grad_()
    result = hutchinson_traces(
        lambda: quadratic(matrix)(x), [x],
        max_samples=1, min_samples=1, generator=seeded(seed),
    )
    assert result.samples == 1
    assert result.traces.item() == pytest.approx(matrix.trace().item(), rel=1e-12, abs=1e-12)
    assert result.stderr.item() == 0.0


def test_block_diagonal_quadratic_gives_each_tensor_its_own_trace():
    x, y = leaf([1.0, 2.0, 3.0]), leaf([-1.0, 0.5])
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([-4.0, 10.0])

    def loss():
        return 0.5 * (a * x * x).sum() + 0.5 * (b * y * y).sum()

    result = hutchinson_traces(loss, [x, y], max_samples=1, min_samples=1, generator=seeded(3))
    assert result.traces.tolist() == [6.0, 6.0]


# ---------------------------------------------------- 3. reproducibility


def _non_diagonal_estimate(seed: int, samples: int = 3) -> HessianTraces:
    matrix = random_symmetric(8, seed=99)
    x = torch.ones(8, dtype=torch.float64, requires_grad=True)
    return hutchinson_traces(
        lambda: quadratic(matrix)(x), [x],
        max_samples=samples, min_samples=samples, generator=seeded(seed),
    )


def test_same_seed_gives_identical_traces():
    first, second = _non_diagonal_estimate(seed=7), _non_diagonal_estimate(seed=7)
    assert torch.equal(first.traces, second.traces)
    assert torch.equal(first.stderr, second.stderr)


def test_different_seed_gives_different_traces():
    assert not torch.equal(_non_diagonal_estimate(seed=7).traces,
                           _non_diagonal_estimate(seed=8).traces)


def test_successive_calls_continue_the_generator_stream():
    matrix = random_symmetric(8, seed=99)
    x = torch.ones(8, dtype=torch.float64, requires_grad=True)

    def run(generator, samples):
        return hutchinson_traces(
            lambda: quadratic(matrix)(x), [x],
            max_samples=samples, min_samples=samples, generator=generator,
        ).traces

    shared = seeded(5)
    first_half, second_half = run(shared, 4), run(shared, 4)
    assert torch.allclose((first_half + second_half) / 2, run(seeded(5), 8), rtol=1e-12)


# -------------------------------------------------------- 4. stopping rule


def test_diagonal_hessian_stops_at_min_samples():
    x = leaf([1.0, -2.0, 3.0])
    result = hutchinson_traces(
        lambda: (x**2).sum(), [x], max_samples=64, min_samples=5, tol=1e-2, generator=seeded(0)
    )
    assert result.samples == 5
    assert result.traces.item() == 6.0


def test_tiny_tolerance_runs_max_samples():
    x = torch.ones(8, dtype=torch.float64, requires_grad=True)
    matrix = random_symmetric(8, seed=99)
    result = hutchinson_traces(
        lambda: quadratic(matrix)(x), [x],
        max_samples=20, min_samples=2, tol=NEVER_CONVERGED, generator=seeded(0),
    )
    assert result.samples == 20


def _run_with_scripted_samples(totals, **settings_):
    """Feed the stopping rule a chosen sequence of per-sample traces."""
    script = iter(torch.tensor([[t]], dtype=torch.float64) for t in totals)
    x = leaf([1.0])
    return hutchinson_traces(
        lambda: (x**2).sum(), [x], all_reduce=lambda _: next(script)[0], **settings_
    )


def test_stops_once_relative_change_of_running_mean_is_below_tol():
    # Running means 10, 15, 14, 14.25: changes 0.5, 0.067, 0.018 -> stops at 4.
    result = _run_with_scripted_samples(
        [10.0, 20.0, 12.0, 15.0, 99.0], max_samples=5, min_samples=2, tol=0.02
    )
    assert result.samples == 4
    assert result.traces.item() == pytest.approx(14.25)


def test_negative_running_mean_does_not_stop_early():
    # Means -10 then +10: change 20/|-10| = 2. A signed denominator would give
    # -2 < tol and stop at 2; with abs() it continues, and stops at 3 (mean 10).
    result = _run_with_scripted_samples(
        [-10.0, 30.0, 10.0, 99.0], max_samples=4, min_samples=2, tol=0.1
    )
    assert result.samples == 3
    assert result.traces.item() == pytest.approx(10.0)


# ------------------------------------------------------------ 5. all_reduce


def test_all_reduce_output_is_what_is_averaged_and_it_runs_once_per_sample():
    params, loss_of = mlp_cross_entropy()
    agreed = torch.tensor([1.0, -2.0, 3.5, 0.0], dtype=torch.float64)
    calls = []

    def replace_with_agreed(sample):
        calls.append(sample.clone())
        return sample * 0 + agreed

    result = hutchinson_traces(
        lambda: loss_of(*params), params,
        max_samples=50, min_samples=3, tol=NEVER_CONVERGED,
        generator=seeded(0), all_reduce=replace_with_agreed,
    )
    # Identical reduced samples leave the mean unchanged, so even the tiny
    # tolerance is met at min_samples: the rule reads the reduced numbers.
    assert result.samples == 3 == len(calls)
    assert torch.equal(result.traces, agreed)
    assert torch.equal(result.stderr, torch.zeros(4, dtype=torch.float64))
    assert all(c.shape == (4,) and c.dtype == torch.float64 for c in calls)


def test_all_reduce_returning_wrong_shape_is_rejected():
    x = leaf([1.0])
    with pytest.raises(ValueError, match="all_reduce must return a tensor of shape"):
        hutchinson_traces(lambda: (x**2).sum(), [x], all_reduce=lambda t: None)


# --------------------------------------- 6. unused params and bad arguments


def test_unused_and_linear_params_get_zero_trace():
    used, unused, linear = leaf([1.0, 2.0]), leaf([3.0]), leaf([4.0, 5.0])

    def loss():
        return (used**2).sum() + (3.0 * linear).sum()

    result = hutchinson_traces(loss, [used, unused, linear], generator=seeded(0))
    assert result.traces.tolist() == [4.0, 0.0, 0.0]


def test_loss_without_curvature_in_any_param_gives_zeros():
    x = leaf([1.0, 2.0])
    result = hutchinson_traces(lambda: x.sum(), [x], generator=seeded(0))
    assert result.traces.tolist() == [0.0]


def _quadratic_loss_and_param():
    x = leaf([1.0, 2.0])
    return (lambda: (x**2).sum()), x


@pytest.mark.parametrize(
    "make_call, message",
    [
        (lambda loss, x: hutchinson_traces(loss, []), "params is empty"),
        (
            lambda loss, x: hutchinson_traces(loss, [x, torch.zeros(2, 3)]),
            r"params\[1\] \(shape \(2, 3\)\) does not require grad",
        ),
        (lambda loss, x: hutchinson_traces(lambda: x**2, [x]), r"scalar .* shape \(2,\)"),
        (
            lambda loss, x: hutchinson_traces(loss, [x], max_samples=3, min_samples=4),
            r"max_samples \(3\) must be >= min_samples \(4\)",
        ),
        (
            lambda loss, x: hutchinson_traces(loss, [x], min_samples=0),
            "min_samples must be at least 1",
        ),
        (lambda loss, x: hutchinson_traces(loss, [x], tol=0.0), "tol must be > 0"),
        (lambda loss, x: hutchinson_traces(loss, [x], tol=-1.0), "tol must be > 0"),
        (
            lambda loss, x: hutchinson_traces(loss, [x, x]),
            r"params\[1\] is the same tensor as params\[0\]",
        ),
        (
            lambda loss, x: hutchinson_traces(lambda: (x**2).sum().detach(), [x]),
            "does not require grad",
        ),
    ],
    ids=[
        "empty", "no-grad-param", "non-scalar-loss", "max<min", "min<1",
        "tol-zero", "tol-negative", "duplicate", "detached-loss",
    ],
)
def test_invalid_arguments_raise_value_error_naming_the_problem(make_call, message):
    loss, x = _quadratic_loss_and_param()
    with pytest.raises(ValueError, match=message):
        make_call(loss, x)


# ------------------------------------------------------------------ 7. STE


def test_trace_through_ste_equals_trace_at_the_rounded_point():
    # A cubic has a point-dependent (still diagonal) Hessian diag(a * x), so a
    # single sample is exact and the test can tell which point was used.
    a = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    latent = leaf([0.3, 1.7, -2.4, 2.6])
    rounded = latent.detach().round().requires_grad_()

    def cubic(x):
        return (a * x**3).sum() / 6

    def trace_of(loss, param):
        return hutchinson_traces(
            loss, [param], max_samples=1, min_samples=1, generator=seeded(0)
        ).traces.item()

    through_ste = trace_of(lambda: cubic(RoundSTE.apply(latent)), latent)
    assert through_ste == pytest.approx(trace_of(lambda: cubic(rounded), rounded))
    assert through_ste == pytest.approx((a * rounded.detach()).sum().item())
    assert through_ste != pytest.approx((a * latent.detach()).sum().item())


# --------------------------------------------------------- 8. side effects


def test_leaves_params_and_their_grad_untouched():
    params, loss_of = mlp_cross_entropy()
    before = [p.detach().clone() for p in params]
    hutchinson_traces(lambda: loss_of(*params), params, max_samples=4, generator=seeded(0))
    assert all(p.grad is None for p in params)
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_keeps_an_existing_grad_as_it_was():
    x = leaf([1.0, 2.0])
    x.grad = torch.tensor([7.0, 8.0], dtype=torch.float64)
    hutchinson_traces(lambda: (x**3).sum(), [x], generator=seeded(0))
    assert x.grad.tolist() == [7.0, 8.0]


# ------------------------------------------------------------ cost shape


def test_one_loss_one_gradient_and_one_hvp_per_sample(monkeypatch):
    params, loss_of = mlp_cross_entropy()
    loss_calls, passes = [], []  # passes: every autograd.grad or autograd.backward call

    def counting(real):
        def call(*args, **kwargs):
            passes.append(real.__name__)
            return real(*args, **kwargs)
        return call

    def loss():
        loss_calls.append(1)
        return loss_of(*params)

    monkeypatch.setattr(torch.autograd, "grad", counting(torch.autograd.grad))
    monkeypatch.setattr(torch.autograd, "backward", counting(torch.autograd.backward))
    result = hutchinson_traces(
        loss, params, max_samples=6, min_samples=6, tol=NEVER_CONVERGED, generator=seeded(0)
    )
    assert len(loss_calls) == 1
    assert len(passes) == 1 + result.samples


def test_the_callers_gradients_are_kept():
    params, loss_of = mlp_cross_entropy()
    held = [torch.full_like(p, 7.0) for p in params]
    for param, grad in zip(params, held):
        param.grad = grad
    hutchinson_traces(lambda: loss_of(*params), params, max_samples=3, min_samples=3,
                      generator=seeded(0))
    assert all(param.grad is grad for param, grad in zip(params, held))
    assert all(bool((grad == 7.0).all()) for grad in held)


def test_non_leaf_params_get_the_same_traces_as_leaves():
    params, loss_of = mlp_cross_entropy()
    views = [p * 1.0 for p in params]  # same values, not graph leaves
    leaf = hutchinson_traces(lambda: loss_of(*params), params, max_samples=4, min_samples=4,
                             generator=seeded(2))
    non_leaf = hutchinson_traces(lambda: loss_of(*views), views, max_samples=4, min_samples=4,
                                 generator=seeded(2))
    assert torch.allclose(leaf.traces, non_leaf.traces, rtol=1e-10, atol=0)


def test_works_under_no_grad_and_with_float32_params():
    params, loss_of = mlp_cross_entropy()
    params32 = [p.detach().float().requires_grad_() for p in params]
    with torch.no_grad():
        result = hutchinson_traces(
            lambda: loss_of(*params32), params32,
            max_samples=8, min_samples=8, generator=seeded(0),
        )
    reference = hutchinson_traces(
        lambda: loss_of(*params), params, max_samples=8, min_samples=8, generator=seeded(0)
    )
    assert result.traces.dtype == torch.float64
    assert torch.allclose(result.traces, reference.traces, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- finite differences


def smooth_problem(dtype=torch.float64, seed=0):
    """A two-layer tanh network with cross-entropy: curved, smooth, with cross-layer blocks."""
    generator = torch.Generator().manual_seed(seed)
    first = torch.randn(6, 4, generator=generator, dtype=dtype).requires_grad_()
    second = torch.randn(3, 6, generator=generator, dtype=dtype).requires_grad_()
    inputs = torch.randn(16, 4, generator=generator, dtype=dtype)
    targets = torch.randint(0, 3, (16,), generator=generator)

    def loss_fn():
        return F.cross_entropy(torch.tanh(inputs @ first.T) @ second.T, targets)

    return loss_fn, [first, second]


@pytest.mark.parametrize("dtype, relative_step, rel", [(torch.float64, 1e-5, 1e-6),
                                                       (torch.float32, 1e-3, 1e-2)])
def test_finite_differences_equal_the_double_backward_probe_for_probe(dtype, relative_step, rel):
    loss_fn, params = smooth_problem(dtype)
    exact = hutchinson_traces(loss_fn, params, max_samples=3, min_samples=3,
                              generator=torch.Generator().manual_seed(7))
    by_differences = finite_difference_traces(loss_fn, params, relative_step=relative_step,
                                              max_samples=3, min_samples=3,
                                              generator=torch.Generator().manual_seed(7))
    assert by_differences.samples == exact.samples == 3
    torch.testing.assert_close(by_differences.traces, exact.traces, rtol=rel, atol=0)
    torch.testing.assert_close(by_differences.stderr, exact.stderr, rtol=max(rel, 1e-4), atol=0)


@settings(max_examples=30, deadline=None)
@given(size=st.integers(1, 6), seed=st.integers(0, 2**16),
       relative_step=st.floats(1e-6, 0.5))
def test_finite_differences_are_exact_on_a_quadratic_for_any_step(size, seed, relative_step):
    # The third derivative of a quadratic is zero, so the central difference has no step error.
    generator = torch.Generator().manual_seed(seed)
    root = torch.randn(2 * size, 2 * size, generator=generator, dtype=torch.float64)
    curvature = root @ root.T - size * torch.eye(2 * size, dtype=torch.float64)  # indefinite too
    params = [torch.randn(size, generator=generator, dtype=torch.float64).requires_grad_()
              for _ in range(2)]

    def loss_fn():
        w = torch.cat(params)
        return 0.5 * w @ curvature @ w

    exact = hutchinson_traces(loss_fn, params, max_samples=2, min_samples=2,
                              generator=torch.Generator().manual_seed(seed))
    by_differences = finite_difference_traces(loss_fn, params, relative_step=relative_step,
                                              max_samples=2, min_samples=2,
                                              generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(by_differences.traces, exact.traces, rtol=1e-6, atol=1e-9)


def test_finite_differences_leave_params_and_their_grads_bit_for_bit():
    loss_fn, params = smooth_problem(torch.float32)
    before = [p.detach().clone() for p in params]
    params[0].grad = torch.full_like(params[0], 3.0)
    finite_difference_traces(loss_fn, params, max_samples=2, min_samples=2)
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    assert torch.equal(params[0].grad, torch.full_like(params[0], 3.0))
    assert params[1].grad is None


def test_finite_differences_evaluate_the_loss_where_displaced_says():
    # A loss that sees its tensor through rounding: displacing the tensor itself would be
    # swallowed, so the caller displaces what the loss actually uses.
    weight = torch.tensor([0.26, -0.74], requires_grad=True)
    offset_box: list[torch.Tensor] = []

    def loss_fn():
        used = weight + (weight.detach().round() - weight.detach())  # straight-through rounding
        if offset_box:
            used = used + offset_box[0]
        return (used**3).sum()

    @contextlib.contextmanager
    def displaced(offsets):
        offset_box.append(offsets[0])
        try:
            yield
        finally:
            offset_box.clear()

    traces = finite_difference_traces(loss_fn, [weight], displaced=displaced, max_samples=1,
                                      min_samples=1, relative_step=1e-3)
    # d^2/dw^2 of sum w^3 at the rounded point (0, -1): 6 * (0 + -1).
    assert traces.traces.item() == pytest.approx(-6.0, rel=1e-3)


@pytest.mark.parametrize("relative_step", [0.0, -1e-3, 1.0, 2.0])
def test_finite_differences_refuse_a_step_outside_0_1(relative_step):
    loss_fn, params = smooth_problem()
    with pytest.raises(ValueError, match="relative_step must be in \\(0, 1\\)"):
        finite_difference_traces(loss_fn, params, relative_step=relative_step)


def test_finite_differences_give_zero_for_a_tensor_the_loss_does_not_use():
    loss_fn, params = smooth_problem()
    unused = torch.randn(5, dtype=torch.float64, requires_grad=True)
    traces = finite_difference_traces(loss_fn, params + [unused], max_samples=1, min_samples=1)
    assert traces.traces[2].item() == 0.0


# ---------------------------------------------------------------- losses in pieces


def split_problem():
    """The smooth problem's loss as one callable and as three pieces that sum to it."""
    loss_fn, params = smooth_problem()
    generator = torch.Generator().manual_seed(11)
    inputs = torch.randn(9, 4, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 3, (9,), generator=generator)

    def piece(rows):
        def loss():
            logits = torch.tanh(inputs[rows] @ params[0].T) @ params[1].T
            return F.cross_entropy(logits, targets[rows], reduction="sum") / 9
        return loss

    return piece(slice(0, 9)), [piece(slice(0, 2)), piece(slice(2, 7)), piece(slice(7, 9))], params


@pytest.mark.parametrize("estimator", [hutchinson_traces, finite_difference_traces])
def test_a_loss_in_pieces_gives_the_traces_of_their_sum(estimator):
    whole, pieces, params = split_problem()
    expected = estimator(whole, params, max_samples=3, min_samples=3,
                         generator=torch.Generator().manual_seed(2))
    got = estimator(pieces, params, max_samples=3, min_samples=3,
                    generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(got.traces, expected.traces, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("estimator", [hutchinson_traces, finite_difference_traces])
def test_an_empty_or_non_callable_piece_list_is_refused(estimator):
    _, params = smooth_problem()
    with pytest.raises(ValueError, match="empty sequence"):
        estimator([], params)
    with pytest.raises(ValueError, match=r"loss_fn\[1\] is a int"):
        estimator([lambda: params[0].sum(), 3], params)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_finite_differences_refuse_half_precision_tensors(dtype):
    weight = torch.randn(4, dtype=dtype, requires_grad=True)
    with pytest.raises(ValueError, match=f"params\\[0\\] \\(shape \\(4,\\)\\) is {dtype}"):
        finite_difference_traces(lambda: (weight.float() ** 3).sum(), [weight])


def test_scaled_probes_make_scale_times_the_signs_in_each_tensors_dtype():
    signs = [torch.tensor([1, -1, 1], dtype=torch.int8), torch.tensor([[-1]], dtype=torch.int8)]
    offsets = ScaledProbes(signs, 0.25, [torch.float32, torch.float64])
    assert len(offsets) == 2
    assert torch.equal(offsets[0], torch.tensor([0.25, -0.25, 0.25]))
    assert offsets[1].dtype == torch.float64 and offsets[1].item() == -0.25
    assert offsets[0] is not offsets[0] and torch.equal(offsets[0], offsets[0])  # made anew
    assert signs[0].dtype == torch.int8  # indexing leaves the stored signs alone


def test_finite_differences_displace_by_plus_and_minus_the_step_times_the_signs():
    weight = torch.randn(6, requires_grad=True)
    seen: list[tuple[type, torch.Tensor]] = []

    @contextlib.contextmanager
    def displaced(offsets):
        seen.append((type(offsets), offsets[0]))
        with torch.no_grad():
            weight.add_(offsets[0])
        try:
            yield
        finally:
            with torch.no_grad():
                weight.sub_(offsets[0])

    finite_difference_traces(lambda: (weight**4).sum(), [weight], displaced=displaced,
                             max_samples=1, min_samples=1)
    (kind_ahead, ahead), (kind_behind, behind) = seen
    assert kind_ahead is kind_behind is ScaledProbes
    assert torch.equal(behind, -ahead)
    assert torch.equal(ahead.abs(), torch.full_like(ahead, ahead.abs()[0].item()))


@settings(max_examples=60, deadline=None)
@given(shape=st.lists(st.integers(1, 11), min_size=0, max_size=3), seed=st.integers(0, 2**16))
def test_packed_signs_give_back_two_bits_minus_one_from_an_eighth_of_a_byte_each(shape, seed):
    bits = torch.randint(0, 2, shape, generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)
    signs = PackedSigns(bits)
    assert signs.packed.numel() == -(-bits.numel() // 8)
    for dtype in (torch.float32, torch.float64):
        assert torch.equal(signs.to(dtype), bits.to(dtype) * 2 - 1)


def test_scaled_probes_of_packed_signs_scale_them_in_each_tensors_dtype():
    offsets = ScaledProbes([PackedSigns(torch.tensor([1, 0, 1], dtype=torch.uint8))], 0.25,
                           [torch.float64])
    assert offsets[0].dtype == torch.float64
    assert torch.equal(offsets[0], torch.tensor([0.25, -0.25, 0.25], dtype=torch.float64))


def test_scaled_probes_never_change_float_probes_they_were_given():
    probes = [torch.tensor([1.0, -1.0])]
    offsets = ScaledProbes(probes, 0.5, [torch.float32])
    assert torch.equal(offsets[0], torch.tensor([0.5, -0.5]))
    assert torch.equal(probes[0], torch.tensor([1.0, -1.0]))


# ---------------------------------------------------------------- once-differentiable Functions


class _Square(torch.autograd.Function):
    """x * x with a hand-written backward, which autograd can differentiate again."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        x, = ctx.saved_tensors
        return 2 * x * grad


class _SquareOnceDifferentiable(_Square):
    """The same, with the backward marked @once_differentiable (as many custom kernels are)."""

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, = ctx.saved_tensors
        return 2 * x * grad


def square_net_loss(square: type[torch.autograd.Function]):
    """A loss whose first layer reaches it only through ``square``, and its two weights."""
    torch.manual_seed(0)
    first, second = torch.randn(6, 4, requires_grad=True), torch.randn(3, 6, requires_grad=True)
    inputs, targets = torch.randn(8, 4), torch.randint(0, 3, (8,))

    def loss():
        return F.cross_entropy(F.linear(square.apply(F.linear(inputs, first)), second), targets)

    return loss, [first, second]


def test_the_double_backward_refuses_a_once_differentiable_function_and_names_it():
    loss, params = square_net_loss(_SquareOnceDifferentiable)
    with pytest.raises(NoSecondDerivative, match="for _SquareOnceDifferentiable is not available"):
        hutchinson_traces(loss, params, max_samples=2, min_samples=2)


def test_a_custom_function_whose_backward_is_differentiable_is_taken_twice():
    loss, params = square_net_loss(_Square)
    traces = hutchinson_traces(loss, params, max_samples=2, min_samples=2,
                               generator=torch.Generator().manual_seed(0)).traces
    loss, params = square_net_loss(_SquareOnceDifferentiable)
    by_differences = finite_difference_traces(loss, params, max_samples=2, min_samples=2,
                                              generator=torch.Generator().manual_seed(0)).traces
    # The first layer's curvature comes only through the square: what the marked backward
    # hid from the double backward, finite differences of first-order gradients see.
    torch.testing.assert_close(by_differences, traces, rtol=1e-2, atol=0)


def test_the_controller_on_auto_takes_a_once_differentiable_model_by_finite_differences(caplog):
    import msq_fx

    class SquareNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.second = torch.nn.Linear(4, 6), torch.nn.Linear(6, 3)

        def forward(self, x):
            return self.second(_SquareOnceDifferentiable.apply(self.first(x)))

    torch.manual_seed(0)
    config = msq_fx.MSQConfig(pruning=dict(interval=1, threshold=1.0),
                              hessian=dict(min_samples=2, max_samples=2))
    qmodel = msq_fx.prepare(SquareNet(), torch.randn(2, 4), config)
    batch = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
    with caplog.at_level("WARNING", logger="msq_fx"):
        records = msq_fx.MSQController(qmodel, config).epoch_end(1, [batch], F.cross_entropy)
    assert {r.hessian_method for r in records} == {"finite_difference"}
    assert "_SquareOnceDifferentiable" in caplog.text and "@once_differentiable" in caplog.text
