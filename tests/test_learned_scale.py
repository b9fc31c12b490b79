"""Specification of learned scales (``MSQConfig(quantization={"scale": "tensor" | "channel"})``).

A learned scale S is an ``nn.Parameter`` of each ``WeightFakeQuant``: one per tensor (shape ())
or one per slice along dim 0 (shape (C, 1, ..., 1)). It starts at ``quant.best_clip`` (the
clip among 64 candidates in (0, max|w|] with the least quantization error) and is trained with
an LSQ gradient. With any positive S the nested grids still nest exactly, the values stay on
the grid, weights past the clip clamp to the end levels, and the integer codes + step of the
converted model reproduce the trained values bit for bit (also through save/load and ONNX).
The literal grid codes with 2^n - 1: its 2^n levels run evenly from -S to S.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import msq_fx
import msq_fx.owners
from msq_fx import quant
from msq_fx.modules import LoweredWeight, WeightFakeQuant

PROPERTY = settings(max_examples=30, deadline=None)
LEARNED_MODES = ("tensor", "channel")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# ---------------------------------------------------------------- an independent grid


def reference_step(scale: torch.Tensor, n: int, grid: str) -> torch.Tensor:
    """The n-bit step in float64: S / 2^(n-1) (nested) or 2 S / (2^n - 1) (literal)."""
    return scale.double() / 2 ** (n - 1) if grid == "nested" else scale.double() * 2 / (2**n - 1)


def offset_of(grid: str) -> float:
    """Levels are (j + offset) * step, j in [-2^(n-1), 2^(n-1) - 1]."""
    return 0.0 if grid == "nested" else 0.5


def end_indices(n: int, grid: str) -> tuple[float, float]:
    """The lowest and highest level, in steps."""
    return -(2 ** (n - 1)) + offset_of(grid), 2 ** (n - 1) - 1 + offset_of(grid)


# ---------------------------------------------------------------- strategies

# Learned scales are arbitrary positive numbers: powers of two and any float32.
SCALES = st.one_of(st.integers(-8, 8).map(lambda e: 2.0**e),
                   st.floats(2.0**-10, 2.0**10, width=32, exclude_min=True))


class Case(NamedTuple):
    n: int
    k: int
    grid: str
    scale: torch.Tensor  # () per tensor, (rows, 1) per channel
    w: torch.Tensor  # (rows, cols) float32
    inside: torch.Tensor  # bool: between the end levels (else a step or more beyond one)


def positions(n: int, k: int, grid: str) -> st.SearchStrategy[tuple[float, bool]]:
    """A weight's position in n-bit steps and whether it lies between the end levels."""
    low, high = end_indices(n, grid)
    offset = offset_of(grid)
    half = 2 ** (n - 1)
    between = st.one_of(
        st.floats(low, high),
        st.sampled_from([low, high]),
        st.integers(-half, half - 1).map(lambda j: j + offset),  # a level
        st.integers(-half, half - 2).map(lambda j: j + offset + 0.5),  # a midpoint
        st.integers(0, 2 ** (n - k) - 1).map(lambda m: m * 2**k - half + offset),  # coarse level
    ).map(lambda p: (p, True))
    beyond = st.tuples(st.floats(1.0, 2.0**n), st.booleans()).map(
        lambda t: (high + t[0] if t[1] else low - t[0], False))
    return st.one_of(between, beyond)


@st.composite
def cases(draw, grids=st.sampled_from(quant.GRIDS), per_channel=st.booleans(),
          with_coarse_level: bool = False, min_cols: int = 1) -> Case:
    """Weights placed relative to a learned scale, per tensor or per channel.

    ``with_coarse_level`` adds to every row a weight on the (n-k)-bit grid (nested), whose
    n-bit code therefore has k zero LSBs. ``min_cols=2`` leaves out one weight per channel
    (its gradient is specified on its own, below).
    """
    n = draw(st.integers(2, 8))
    k = draw(st.integers(1, n - 1))
    grid = draw(grids)
    rows, cols = draw(st.integers(1, 4)), draw(st.integers(min_cols, 12))
    channel = draw(per_channel)
    drawn = [draw(SCALES) for _ in range(rows if channel else 1)]
    scale = torch.tensor(drawn, dtype=torch.float32)
    scale = scale.reshape(rows, 1) if channel else scale.reshape(())
    step = reference_step(scale.expand(rows, 1), n, grid)
    placed = [[draw(positions(n, k, grid)) for _ in range(cols)] for _ in range(rows)]
    if with_coarse_level:
        half = 2 ** (n - 1)
        for row in placed:
            row.append((draw(st.integers(0, 2 ** (n - k) - 1)) * 2**k - half, True))
    where = torch.tensor([[p for p, _ in row] for row in placed], dtype=torch.float64)
    w = (where * step).float()
    inside = torch.tensor([[flag for _, flag in row] for row in placed])
    return Case(n, k, grid, scale, w, inside)


def lsbs_zero(w: torch.Tensor, n: int, k: int, scale: torch.Tensor) -> torch.Tensor:
    return quant.lsb_integer(quant.roundclamp_codes(w, n, scale), k) == 0


# ---------------------------------------------------------------- nesting and the grid


@PROPERTY
@given(cases(grids=st.just("nested"), with_coarse_level=True))
def test_weights_whose_k_lsbs_are_zero_keep_their_value_bitwise_at_n_minus_k_bits(case):
    n, k, _, scale, w, _ = case
    zero = lsbs_zero(w, n, k, scale)
    assert bool(zero.any())
    fine = quant.quantize_value(w, n, "nested", scale)
    coarse = quant.quantize_value(w, n - k, "nested", scale)
    assert torch.equal(coarse[zero], fine[zero])


@PROPERTY
@given(cases(grids=st.just("nested")))
def test_the_n_minus_k_bit_step_is_exactly_2_to_the_k_times_the_n_bit_step(case):
    n, k, _, scale, _, _ = case
    assert torch.equal(quant.grid_step(scale, n - k), 2**k * quant.grid_step(scale, n))


@PROPERTY
@given(cases())
def test_values_are_signed_n_bit_levels_of_the_learned_step(case):
    n, _, grid, scale, w, _ = case
    value = quant.quantize_value(w, n, grid, scale)
    step = quant.grid_step(scale, n, grid)
    index = value / step - offset_of(grid)
    integer = torch.round(index)
    assert torch.allclose(index, integer, rtol=0, atol=1e-4)
    assert bool((integer >= -(2 ** (n - 1))).all()) and bool((integer <= 2 ** (n - 1) - 1).all())
    assert torch.equal((integer + offset_of(grid)) * step.expand_as(w), value)


@PROPERTY
@given(cases())
def test_weights_beyond_the_clip_clamp_to_the_end_levels(case):
    n, _, grid, scale, w, inside = case
    value = quant.quantize_value(w, n, grid, scale)
    step = quant.grid_step(scale, n, grid).expand_as(w)
    low, high = end_indices(n, grid)
    above, below = ~inside & (w > 0), ~inside & (w < 0)
    assert torch.equal(value[above], (high * step)[above])
    assert torch.equal(value[below], (low * step)[below])


@PROPERTY
@given(cases())
def test_integer_codes_and_step_of_the_lowered_weight_reproduce_the_fake_quant_bitwise(case):
    n, _, grid, scale, w, _ = case
    quantizer = WeightFakeQuant(n, "linear", ("fc.weight",), grid,
                                scale_mode="tensor" if scale.dim() == 0 else "channel", latent=w)
    with torch.no_grad():
        quantizer.scale.copy_(scale)
        lowered = LoweredWeight.from_fake_quant(quantizer, w)
        assert torch.equal(lowered(), quantizer(w))


# ---------------------------------------------------------------- gradients (LSQ)


def upstream(case: Case, seed: int) -> torch.Tensor:
    """A gradient arriving at the quantized weight: random magnitudes and signs."""
    generator = torch.Generator().manual_seed(seed)
    magnitude = torch.rand(case.w.shape, generator=generator) + 0.5
    sign = torch.randint(0, 2, case.w.shape, generator=generator) * 2 - 1
    return magnitude * sign


def differentiated(case: Case, grad: torch.Tensor):
    """(w, S, fake_quantize(w, n, grid, S)) with w and S leaves, after ``grad`` was propagated
    back from the value."""
    w = case.w.clone().requires_grad_()
    scale = case.scale.clone().requires_grad_()
    value = quant.fake_quantize(w, case.n, case.grid, scale)
    value.backward(grad)
    return w, scale, value


@PROPERTY
@given(cases(min_cols=2), st.integers(0, 2**16))
def test_weight_gradient_is_one_between_the_end_levels_and_zero_beyond_them(case, seed):
    grad = upstream(case, seed)
    w, _, _ = differentiated(case, grad)
    assert torch.equal(w.grad, torch.where(case.inside, grad, torch.zeros_like(grad)))


@PROPERTY
@given(cases(min_cols=2), st.integers(0, 2**16))
def test_scale_gradient_is_the_lsq_step_size_gradient(case, seed):
    grad = upstream(case, seed)
    _, scale, value = differentiated(case, grad)
    # dv/dS = (v - w) / S inside the clip, v / S beyond it, times 1/sqrt(N * 2^(n-1)) with N
    # the number of weights sharing the scale; summed over those weights.
    v, w64 = value.detach().double(), case.w.double()
    s = case.scale.double().expand_as(w64)
    per_weight = grad.double() * torch.where(case.inside, (v - w64) / s, v / s)
    per_scale = case.w.numel() / case.scale.numel()
    gradient_scale = 1.0 / math.sqrt(per_scale * 2 ** (case.n - 1))
    if case.scale.dim() == 0:
        expected, magnitude = per_weight.sum(), per_weight.abs().sum()
    else:
        expected, magnitude = per_weight.sum(1, keepdim=True), per_weight.abs().sum(1, keepdim=True)
    expected, magnitude = expected * gradient_scale, magnitude * gradient_scale
    assert scale.grad.shape == case.scale.shape
    assert bool(((scale.grad.double() - expected).abs() <= 1e-5 * magnitude + 1e-12).all())


@PROPERTY
@given(cases(per_channel=st.just(True), min_cols=2), st.data())
def test_a_per_channel_scale_gradient_comes_from_its_own_channel_only(case, data):
    row = data.draw(st.integers(0, case.w.shape[0] - 1))
    grad = torch.zeros_like(case.w)
    grad[row] = upstream(case, data.draw(st.integers(0, 2**16)))[row]
    _, scale, _ = differentiated(case, grad)
    alone = case._replace(w=case.w[row:row + 1], scale=case.scale[row:row + 1])
    _, alone_scale, _ = differentiated(alone, grad[row:row + 1])
    others = torch.ones(case.w.shape[0], dtype=torch.bool)
    others[row] = False
    assert bool((scale.grad[others] == 0).all())
    torch.testing.assert_close(scale.grad[row], alone_scale.grad[0], rtol=1e-6, atol=0)


def test_a_per_channel_scale_with_one_weight_per_channel_gets_a_gradient_per_channel():
    qmodel = msq_fx.prepare(nn.Linear(1, 3), torch.randn(2, 1),
                            msq_fx.MSQConfig(quantization={"scale": "channel"}))
    qmodel(torch.randn(2, 1)).sum().backward()
    assert qmodel.weight_quantizer.scale.grad.shape == (3, 1)


# ---------------------------------------------------------------- binary weights


class BinaryCase(NamedTuple):
    w: torch.Tensor  # (rows, cols) float32, anywhere within eight scales of zero
    scale: torch.Tensor  # () per tensor, (rows, 1) per channel
    grad: torch.Tensor  # a gradient arriving at the quantized weight


@st.composite
def binary_cases(draw, per_channel=st.booleans()) -> BinaryCase:
    """Weights anywhere within eight scales of zero (far past the clip included), a scale per
    tensor or per channel, and an upstream gradient."""
    rows, cols = draw(st.integers(1, 4)), draw(st.integers(1, 12))
    channel = draw(per_channel)
    scale = torch.tensor([draw(SCALES) for _ in range(rows if channel else 1)])
    scale = scale.reshape(rows, 1) if channel else scale.reshape(())
    # Zero or at least 1e-3 scales out: w / S of a subnormal w underflows to (signed) zero.
    multiple = st.floats(-8.0, 8.0).filter(lambda m: m == 0 or abs(m) >= 1e-3)
    multiples = torch.tensor([[draw(multiple) for _ in range(cols)] for _ in range(rows)])
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    return BinaryCase((multiples * scale).float(), scale,
                      torch.randn((rows, cols), generator=generator))


def binary_differentiated(case: BinaryCase, binary_gradient: str, grid: str = "literal"):
    """(w, S, fake_quantize(w, 1, grid, S)) with w and S leaves, after the case's gradient was
    propagated back from the value."""
    w, scale = case.w.clone().requires_grad_(), case.scale.clone().requires_grad_()
    value = quant.fake_quantize(w, 1, grid, scale, binary_gradient)
    value.backward(case.grad)
    return w, scale, value


@PROPERTY
@given(binary_cases())
def test_a_binary_weight_is_the_scale_times_its_sign(case):
    w, scale, _ = case
    value = quant.fake_quantize(w, 1, "literal", scale)
    assert torch.equal(value, torch.where(w < 0, -scale, scale).expand_as(w))


@PROPERTY
@given(binary_cases())
def test_every_binary_latent_gets_the_gradient_however_far_past_the_scale(case):
    w, _, _ = binary_differentiated(case, "every_weight")
    assert torch.equal(w.grad, case.grad)


@PROPERTY
@given(binary_cases())
def test_a_binary_scale_gets_the_exact_derivative_of_its_sign_times_scale(case):
    w, scale, _ = case
    _, learned, _ = binary_differentiated(case, "every_weight")
    # d(S sign w)/dS = sign(w), times LSQ's 1/sqrt(N) (N weights per scale, 2^(1-1) = 1).
    per_weight = case.grad.double() * torch.where(w < 0, -1.0, 1.0).double()
    per_scale = w.numel() / scale.numel()
    dims = {} if scale.dim() == 0 else {"dim": 1, "keepdim": True}
    expected = per_weight.sum(**dims) / math.sqrt(per_scale)
    magnitude = per_weight.abs().sum(**dims) / math.sqrt(per_scale)
    assert learned.grad.shape == scale.shape
    assert bool(((learned.grad.double() - expected).abs() <= 1e-5 * magnitude + 1e-12).all())


@PROPERTY
@given(binary_cases())
def test_inside_clip_keeps_lsq_rule_for_binary_weights_none_past_twice_the_scale(case):
    w, scale, grad = case
    latent, _, _ = binary_differentiated(case, "inside_clip")
    # The binary code position is w / (2 S) + 1/2; it rounds inside [0, 1] up to |w| = 2 S.
    far = (w.double() / scale.double()).abs() > 2.0 + 1e-6
    near = (w.double() / scale.double()).abs() < 2.0 - 1e-6
    assert bool((latent.grad[far] == 0).all())
    assert torch.equal(latent.grad[near], grad[near])


@PROPERTY
@given(binary_cases())
def test_one_nested_bit_is_not_binary_and_keeps_lsq_rule(case):
    every, _, _ = binary_differentiated(case, "every_weight", grid="nested")
    clipped, _, _ = binary_differentiated(case, "inside_clip", grid="nested")
    assert torch.equal(every.grad, clipped.grad)


GAINS = st.sampled_from([0.5, 2.0, 3.0])


@PROPERTY
@given(binary_cases(), GAINS, st.sampled_from(quant.BINARY_GRADIENTS))
def test_a_binary_gradient_gain_multiplies_the_latent_gradient_and_leaves_the_value_and_scale(
        case, gain, binary_gradient):
    plain_w, plain_scale, plain_value = binary_differentiated(case, binary_gradient)
    w, scale = case.w.clone().requires_grad_(), case.scale.clone().requires_grad_()
    value = quant.fake_quantize(w, 1, "literal", scale, binary_gradient, binary_gradient_gain=gain)
    value.backward(case.grad)
    assert torch.equal(value, plain_value)
    assert torch.equal(w.grad, plain_w.grad * gain)
    assert torch.equal(scale.grad, plain_scale.grad)


@PROPERTY
@given(binary_cases(), GAINS)
def test_a_binary_gradient_gain_reaches_a_binary_latent_under_the_max_scale_too(case, gain):
    w = case.w.clone().requires_grad_()
    quant.fake_quantize(w, 1, "literal", binary_gradient_gain=gain).backward(case.grad)
    assert torch.equal(w.grad, case.grad * gain)


@PROPERTY
@given(binary_cases(), GAINS, st.sampled_from([(1, "nested"), (2, "literal"), (2, "nested")]))
def test_a_binary_gradient_gain_leaves_every_other_width_alone(case, gain, width):
    bits, grid = width
    gradients = []
    for each_gain in (1.0, gain):
        for scale in (None, case.scale):
            w = case.w.clone().requires_grad_()
            learned = None if scale is None else scale.clone().requires_grad_()
            value = quant.fake_quantize(w, bits, grid, learned, binary_gradient_gain=each_gain)
            value.backward(case.grad)
            gradients.append(w.grad)
    assert torch.equal(gradients[0], gradients[2]) and torch.equal(gradients[1], gradients[3])


def test_prepare_gives_every_quantizer_the_configured_binary_gradient_gain():
    config = msq_fx.MSQConfig(quantization={"grid": "literal", "min_bits": 1,
                                            "binary_gradient_gain": 3.0})
    qmodel = msq_fx.prepare(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)),
                            torch.randn(3, 4), config)
    gains = {m.binary_gradient_gain for m in qmodel.modules() if isinstance(m, WeightFakeQuant)}
    assert gains == {3.0}


@pytest.mark.parametrize("gain", [0, -1.0, float("inf"), float("nan"), True, "2"])
def test_a_binary_gradient_gain_that_is_not_a_positive_number_is_refused(gain):
    with pytest.raises(ValueError, match="binary_gradient_gain"):
        msq_fx.MSQConfig(quantization={"binary_gradient_gain": gain})


def test_an_unknown_binary_gradient_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="binary_gradient must be one of"):
        quant.fake_quantize(torch.ones(2), 1, "literal", torch.tensor(1.0), "sign")


@pytest.mark.parametrize("binary_gradient", quant.BINARY_GRADIENTS)
def test_prepare_gives_every_quantizer_the_configured_binary_gradient(binary_gradient):
    config = msq_fx.MSQConfig(quantization={"scale": "channel", "grid": "literal", "min_bits": 1,
                                            "binary_gradient": binary_gradient})
    qmodel = msq_fx.prepare(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)),
                            torch.randn(3, 4), config)
    quantizers = [m for m in qmodel.modules() if isinstance(m, WeightFakeQuant)]
    assert len(quantizers) == 2
    assert {q.binary_gradient for q in quantizers} == {binary_gradient}


@pytest.mark.parametrize("binary_gradient, moves", [(None, False), ("inside_clip", False),
                                                     ("every_weight", True)])
def test_a_binary_latent_ten_scales_out_gets_a_gradient_only_with_every_weight(binary_gradient,
                                                                               moves):
    """Through prepare, a layer set to 1 bit (None: the default, LSQ's rule): under LSQ's rule a
    latent that far past its channel's scale gets no gradient, so its sign can never change."""
    torch.manual_seed(0)
    quantization = {"scale": "channel", "grid": "literal", "min_bits": 1}
    if binary_gradient is not None:
        quantization["binary_gradient"] = binary_gradient
    qmodel = msq_fx.prepare(nn.Linear(8, 3), torch.randn(5, 8),
                            msq_fx.MSQConfig(quantization=quantization))
    qmodel.weight_quantizer.bits.fill_(1)
    latent = qmodel._parameters["weight"]
    with torch.no_grad():
        latent[0, 0] = 10 * float(qmodel.weight_quantizer.scale[0])
    qmodel(torch.randn(5, 8)).square().sum().backward()
    assert (float(latent.grad[0, 0]) != 0.0) == moves
    assert int((latent.grad != 0).sum()) > 12  # the latents inside the clip get theirs


# ---------------------------------------------------------------- best_clip


def squared_error(w: torch.Tensor, bits: int, grid: str, scale: torch.Tensor) -> float:
    return float((quant.quantize_value(w, bits, grid, scale).double() - w.double()).pow(2).sum())


def candidate_errors(row: torch.Tensor, bits: int, grid: str) -> list[tuple[float, float]]:
    """(clip, error) for each of the 64 clips max|row| * i/64, i = 1..64: the brute force."""
    top = row.abs().max()
    return [(float(top * (i / 64)), squared_error(row, bits, grid, top * (i / 64)))
            for i in range(1, 65)]


@st.composite
def clip_cases(draw, rows: int = 1):
    """A small weight matrix: Gaussian rows of different magnitudes with drawn outliers."""
    bits, grid = draw(st.integers(2, 8)), draw(st.sampled_from(quant.GRIDS))
    cols = draw(st.integers(4, 24))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    w = torch.randn(rows, cols, generator=generator)
    w = w * torch.tensor([draw(SCALES) for _ in range(rows)]).reshape(rows, 1)
    outliers = draw(st.lists(st.tuples(st.integers(0, rows * cols - 1), st.floats(2.0, 20.0)),
                             max_size=3))
    for index, factor in outliers:
        w.view(-1)[index] *= factor
    return bits, grid, w


@PROPERTY
@given(clip_cases())
def test_best_clip_error_is_at_most_the_error_of_the_max_abs_clip(case):
    bits, grid, w = case
    best = quant.best_clip(w, bits, grid)
    maximum = squared_error(w, bits, grid, w.abs().max())
    assert squared_error(w, bits, grid, best) <= maximum * (1 + 1e-5)


@PROPERTY
@given(clip_cases())
def test_best_clip_is_the_candidate_with_the_least_error(case):
    bits, grid, w = case
    best = quant.best_clip(w, bits, grid)
    candidates = candidate_errors(w, bits, grid)
    assert best.shape == ()
    assert float(best) in [clip for clip, _ in candidates]
    least = min(error for _, error in candidates)
    assert squared_error(w, bits, grid, best) <= least * (1 + 1e-5)


@PROPERTY
@given(clip_cases(rows=3))
def test_per_channel_best_clip_gives_each_row_its_own_optimum(case):
    bits, grid, w = case
    shape = quant.scale_shape(w, "channel")
    best = quant.best_clip(w, bits, grid, shape)
    assert best.shape == (3, 1)
    for row, clip in zip(w, best):
        candidates = candidate_errors(row, bits, grid)
        assert float(clip) in [c for c, _ in candidates]
        least = min(error for _, error in candidates)
        assert squared_error(row, bits, grid, clip) <= least * (1 + 1e-5)


# ---------------------------------------------------------------- through prepare and convert


class ConvLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.bn(self.conv(x))).flatten(1))


X = torch.randn(16, 2, 6, 6, generator=torch.Generator().manual_seed(1))
Y = torch.randint(0, 5, (16,), generator=torch.Generator().manual_seed(2))


def config(scale: str, init_bits: int = 8) -> msq_fx.MSQConfig:
    return msq_fx.MSQConfig(target_compression=15.0,
                            quantization={"scale": scale, "init_bits": init_bits},
                            pruning={"interval": 1, "threshold": 1.0})


def prepared(scale: str, init_bits: int = 8, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return msq_fx.prepare(ConvLinear(), X, config(scale, init_bits))


def train_steps(qmodel: nn.Module, controller: msq_fx.MSQController | None,
                steps: int) -> None:
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=0.05)
    qmodel.train()
    for _ in range(steps):
        loss = F.cross_entropy(qmodel(X), Y)
        if controller is not None:
            loss = loss + controller.regularization()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def scales(qmodel: nn.Module) -> dict[str, torch.Tensor]:
    return {w.name: w.quantizer.learned_scale for w in msq_fx.owners.iter_quantized_weights(qmodel)}


@pytest.fixture(scope="module", params=LEARNED_MODES)
def trained_and_pruned(request):
    """(prepared model in eval mode, the prune's records) for each learned scale mode:
    trained a few steps, pruned once, trained again."""
    qmodel = prepared(request.param)
    controller = msq_fx.MSQController(qmodel)
    train_steps(qmodel, controller, 3)
    records = controller.epoch_end(1, [(X, Y)], F.cross_entropy)
    train_steps(qmodel, controller, 2)
    return qmodel.eval(), records


def output(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(X)


@pytest.mark.parametrize("mode,shapes", [
    ("tensor", {"conv.weight": (), "fc.weight": ()}),
    ("channel", {"conv.weight": (4, 1, 1, 1), "fc.weight": (5, 1)}),
])
def test_learned_scales_are_model_parameters_of_the_scale_shape(mode, shapes):
    qmodel = prepared(mode)
    found = scales(qmodel)
    assert {name: tuple(s.shape) for name, s in found.items()} == shapes
    parameters = {id(p) for p in qmodel.parameters()}
    assert all(isinstance(s, nn.Parameter) and id(s) in parameters for s in found.values())


def test_the_max_scale_mode_has_no_scale_parameter():
    assert set(scales(prepared("max")).values()) == {None}


@pytest.mark.parametrize("mode", LEARNED_MODES)
def test_learned_scales_start_at_the_best_clip_of_their_weight(mode):
    qmodel = prepared(mode)
    for weight in msq_fx.owners.iter_quantized_weights(qmodel):
        shape = quant.scale_shape(weight.latent, mode)
        assert torch.equal(weight.quantizer.scale,
                           quant.best_clip(weight.latent, 8, "nested", shape))


@pytest.mark.parametrize("mode", LEARNED_MODES)
def test_a_training_step_moves_every_learned_scale(mode):
    qmodel = prepared(mode)
    before = {name: s.detach().clone() for name, s in scales(qmodel).items()}
    train_steps(qmodel, None, 1)
    for name, scale in scales(qmodel).items():
        assert bool((scale.detach() != before[name]).all()), name


def test_converted_output_equals_fake_quant_output_after_training_and_a_prune(
        trained_and_pruned):
    qmodel, records = trained_and_pruned
    assert any(r.lsbs_dropped > 0 for r in records)
    int_model = msq_fx.convert(qmodel).eval()
    assert float((output(int_model) - output(qmodel)).abs().max()) == 0.0


def test_save_and_load_into_a_skeleton_round_trips_exactly(trained_and_pruned, tmp_path):
    qmodel, _ = trained_and_pruned
    int_model = msq_fx.convert(qmodel).eval()
    path = tmp_path / "model.msq"
    msq_fx.save(int_model, path)
    skeleton = msq_fx.convert(msq_fx.prepare(ConvLinear(), X, msq_fx.saved_config(path))).eval()
    assert not torch.equal(output(skeleton), output(int_model))
    loaded = msq_fx.load(path, model=skeleton).eval()
    assert float((output(loaded) - output(int_model)).abs().max()) == 0.0


@pytest.mark.parametrize("bits", [4, 8])
def test_onnx_runtime_matches_the_converted_model_with_per_channel_scales(bits, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from msq_fx.onnx_export import onnx_runtime_outputs

    qmodel = prepared("channel", init_bits=bits)
    train_steps(qmodel, None, 1)
    int_model = msq_fx.convert(qmodel.eval()).eval()
    steps = [m.step for m in int_model.modules() if isinstance(m, LoweredWeight)]
    assert sorted(s.numel() for s in steps) == [4, 5]  # one step per output channel
    result = msq_fx.export_onnx(int_model, X, tmp_path / "model.onnx")
    onnx_output = onnx_runtime_outputs(result.path, X)[0]
    assert float((onnx_output - output(int_model)).abs().max()) <= 1e-5


# ---------------------------------------------------------------- the literal grid


def test_literal_grid_at_1_bit_is_binary_plus_or_minus_the_scale():
    scale = torch.tensor(0.37)
    w = torch.linspace(-1.0, 1.0, 101) * 0.37
    assert torch.equal(torch.unique(quant.quantize_value(w, 1, "literal", scale)),
                       torch.stack([-scale, scale]))


def test_literal_grid_at_2_bits_has_levels_minus_s_minus_s_over_3_s_over_3_and_s():
    scale = torch.tensor(0.37)
    w = torch.linspace(-1.0, 1.0, 101) * 0.37
    levels = torch.unique(quant.quantize_value(w, 2, "literal", scale))
    torch.testing.assert_close(levels, torch.stack([-scale, -scale / 3, scale / 3, scale]),
                               rtol=1e-6, atol=0)


def away_from_midpoints(case: Case) -> torch.Tensor:
    """Weights more than 1e-3 steps from every midpoint between two levels (where float
    rounding of the position, and the tie rule, decide the level)."""
    step = reference_step(case.scale.expand(case.w.shape[0], 1), case.n, "literal")
    index = case.w.double() / step - 0.5  # levels sit at integers
    return (index - torch.floor(index) - 0.5).abs() > 1e-3


@PROPERTY
@given(cases(grids=st.just("literal")))
def test_literal_grid_is_symmetric_away_from_midpoints(case):
    n, _, _, scale, w, _ = case
    kept = away_from_midpoints(case)
    assert torch.equal(quant.quantize_value(-w, n, "literal", scale)[kept],
                       -quant.quantize_value(w, n, "literal", scale)[kept])


@pytest.mark.parametrize("n", [2, 3, 8])
def test_literal_grid_is_symmetric_at_midpoints_between_levels(n):
    scale = torch.tensor(1.0)
    step = 2.0 / (2**n - 1)
    # The nonzero midpoints between adjacent levels: j * step for j = 1 .. 2^(n-1) - 1.
    w = torch.arange(1, 2 ** (n - 1)) * step
    assert torch.equal(quant.quantize_value(-w, n, "literal", scale),
                       -quant.quantize_value(w, n, "literal", scale))
