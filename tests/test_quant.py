"""Specification of msq_fx.quant: RoundClamp codes, the nested grid, LSB values (paper §3.1)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from msq_fx import quant

PROPERTY = settings(max_examples=100, deadline=None)

# Scales S = max|w|: powers of two (every grid point and half-step tie is exact in float32)
# and arbitrary float32 values (grid points carry the rounding of a real model's weights).
POW2_SCALES = st.integers(-8, 8).map(lambda e: 2.0**e)
SCALES = st.one_of(POW2_SCALES, st.floats(2.0**-10, 2.0**10, width=32))


# ---------------------------------------------------------------- strategies and helpers


@st.composite
def bits_and_k(draw) -> tuple[int, int]:
    n = draw(st.integers(2, 8))
    return n, draw(st.integers(1, n - 1))


def weight_elements(n: int, k: int, scale: float) -> st.SearchStrategy[float]:
    """One weight in [-scale, scale]: anywhere, an edge value, or a point the grids single out."""
    half = 2 ** (n - 1)
    return st.one_of(
        st.floats(-1.0, 1.0, width=32).map(lambda u: u * scale),
        st.sampled_from([0.0, scale, -scale]),
        st.integers(0, 2**n - 1).map(lambda c: (c - half) * scale / half),  # n-bit grid point
        st.integers(0, 2**n - 2).map(lambda c: (c - half + 0.5) * scale / half),  # tie
        # an (n-k)-bit grid point
        st.integers(0, 2 ** (n - k) - 1).map(lambda m: (m * 2**k - half) * scale / half),
    )


@st.composite
def weight_cases(draw, scales=SCALES):
    """(n, k, w): a float32 weight tensor whose max|w| is exactly the drawn scale."""
    n, k = draw(bits_and_k())
    scale = float(torch.tensor(draw(scales), dtype=torch.float32))
    values = draw(st.lists(weight_elements(n, k, scale), min_size=1, max_size=64))
    values.append(draw(st.sampled_from([scale, -scale])))  # pins S = max|w|
    return n, k, torch.tensor(values, dtype=torch.float32)


@st.composite
def zero_lsb_cases(draw):
    """(n, k, w): a weight_cases tensor plus at least one weight on the (n-k)-bit grid, whose
    n-bit code therefore has k zero LSBs (the property tests below need a non-empty mask)."""
    n, k, w = draw(weight_cases())
    half, scale = 2 ** (n - 1), float(w.abs().max())
    coarse = draw(st.lists(st.integers(0, 2 ** (n - k) - 1), min_size=1, max_size=16))
    on_grid = torch.tensor([(m * 2**k - half) * scale / half for m in coarse], dtype=torch.float32)
    return n, k, torch.cat([w, on_grid])


@st.composite
def grid_cases(draw, scales=SCALES, coarse: bool = False):
    """(n, k, codes, w): weights exactly on the n-bit (or, coarse, the (n-k)-bit) nested grid.

    Code 0 is always present; it dequantizes to exactly -S, so max|w| is the drawn scale.
    """
    n, k = draw(bits_and_k())
    stride = 2**k if coarse else 1
    drawn = draw(st.lists(st.integers(0, 2**n // stride - 1), min_size=1, max_size=64))
    codes = torch.tensor([0] + [stride * c for c in drawn], dtype=torch.float32)
    scale = torch.tensor(draw(scales), dtype=torch.float32)
    return n, k, codes, nested_dequantize(codes, n, scale)


def nested_dequantize(unsigned: torch.Tensor, n: int, scale: torch.Tensor, grid: str = "nested"):
    """The value of unsigned n-bit codes with the scale held fixed."""
    return quant.dequantize(quant.signed_codes(unsigned, n), quant.grid_step(scale, n, grid),
                            quant.grid_offset(grid))


def scale_and_codes(w: torch.Tensor, n: int,
                    grid: str = "nested") -> tuple[torch.Tensor, torch.Tensor]:
    """The tensor's scale S = max|w| and its n-bit codes at that scale on ``grid``."""
    scale = quant.weight_scale(w)
    return scale, quant.roundclamp_codes(w, n, scale, grid)


def lsbs_zero(unsigned: torch.Tensor, k: int) -> torch.Tensor:
    return quant.lsb_integer(unsigned, k) == 0


# ---------------------------------------------------------------- (i) nested codes


@PROPERTY
@given(zero_lsb_cases())
def test_code_with_zero_lsbs_is_2_to_the_k_times_the_coarse_code(case):
    n, k, w = case
    fine, coarse = quant.roundclamp_codes(w, n), quant.roundclamp_codes(w, n - k)
    zero = lsbs_zero(fine, k)
    assert bool(zero.any())
    assert torch.equal(fine[zero], 2**k * coarse[zero])


@PROPERTY
@given(zero_lsb_cases())
def test_weight_with_zero_lsbs_has_the_same_value_at_n_and_n_minus_k_bits(case):
    n, k, w = case
    zero = lsbs_zero(quant.roundclamp_codes(w, n), k)
    assert bool(zero.any())
    assert torch.equal(quant.quantize_value(w, n)[zero], quant.quantize_value(w, n - k)[zero])


@PROPERTY
@given(grid_cases(coarse=True))
def test_every_coarse_grid_point_is_a_fine_grid_point_with_zero_lsbs(case):
    n, k, codes, w = case
    fine = quant.roundclamp_codes(w, n)
    assert torch.equal(fine, codes)
    assert bool(lsbs_zero(fine, k).all())
    assert torch.equal(quant.quantize_value(w, n), quant.quantize_value(w, n - k))


# ---------------------------------------------------------------- (ii) LSB value


@PROPERTY
@given(weight_cases())
def test_lsb_value_is_bounded_by_half_of_2_to_the_k(case):
    n, k, w = case
    assert float(quant.lsb_value(w, n, k).abs().max()) <= 2 ** (k - 1)


@PROPERTY
@given(grid_cases(scales=POW2_SCALES))
def test_lsb_value_on_the_grid_is_zero_exactly_when_the_code_lsbs_are_zero(case):
    n, k, codes, w = case
    lsb = quant.lsb_value(w, n, k)
    assert torch.equal(lsb == 0, quant.lsb_integer(codes, k) == 0)


@PROPERTY
@given(grid_cases())
def test_lsb_value_on_the_grid_with_any_scale_is_the_signed_lsb_integer_up_to_rounding(case):
    n, k, codes, w = case
    lsb = quant.lsb_value(w, n, k)
    integer = torch.round(lsb)
    assert torch.allclose(lsb, integer, rtol=0, atol=1e-3)
    assert torch.equal(integer == 0, quant.lsb_integer(codes, k) == 0)
    # Below the clamped top bin, B_k is the code minus its nearest multiple of 2^k.
    below_top = codes < 2**n - 2 ** (k - 1)
    assert torch.equal(torch.remainder(integer, 2**k)[below_top],
                       quant.lsb_integer(codes, k)[below_top])


# ---------------------------------------------------------------- (iii) idempotent, monotone


@PROPERTY
@given(weight_cases())
def test_requantizing_with_the_scale_held_returns_the_same_codes_and_values(case):
    n, k, w = case
    scale, codes = scale_and_codes(w, n)
    quantized = quant.quantize_value(w, n)
    requantized = quant.roundclamp_codes(quantized, n, scale)
    assert torch.equal(requantized, codes)
    assert torch.equal(nested_dequantize(requantized, n, scale), quantized)


@PROPERTY
@given(weight_cases())
def test_quantize_value_is_idempotent_when_the_largest_weight_is_negative(case):
    n, k, w = case
    w = torch.cat([w, -quant.weight_scale(w).reshape(1)])  # -S quantizes to -S: S is kept
    once = quant.quantize_value(w, n)
    assert torch.equal(quant.quantize_value(once, n), once)


@PROPERTY
@given(weight_cases(), st.sampled_from(quant.GRIDS))
def test_codes_and_values_are_non_decreasing_in_the_weight(case, grid):
    n, k, w = case
    w = torch.sort(w).values
    codes, values = quant.roundclamp_codes(w, n), quant.quantize_value(w, n, grid)
    assert bool((codes[1:] >= codes[:-1]).all())
    assert bool((values[1:] >= values[:-1]).all())


# ---------------------------------------------------------------- (iv) dropping zero LSBs


@PROPERTY
@given(weight_cases())
def test_dropping_zero_lsbs_leaves_every_dequantized_value_unchanged(case):
    n, k, w = case
    scale, codes = scale_and_codes(w, n)
    zero = lsbs_zero(codes, k)
    dropped = quant.drop_lsbs(codes[zero], k)
    assert torch.equal(nested_dequantize(dropped, n - k, scale),
                       nested_dequantize(codes[zero], n, scale))


# ---------------------------------------------------------------- (v) lowering


@PROPERTY
@given(weight_cases(), st.sampled_from(quant.GRIDS))
def test_integer_code_and_step_reproduce_the_fake_quant_value_bitwise(case, grid):
    n, k, w = case
    scale, codes = scale_and_codes(w, n, grid)
    integer = quant.signed_codes(codes, n).to(torch.int8)
    rebuilt = quant.dequantize(integer.to(w.dtype), quant.grid_step(scale, n, grid),
                               quant.grid_offset(grid))
    assert torch.equal(rebuilt, quant.quantize_value(w, n, grid))


@PROPERTY
@given(weight_cases())
def test_signed_codes_fit_in_n_bit_twos_complement(case):
    n, k, w = case
    signed = quant.signed_codes(quant.roundclamp_codes(w, n), n)
    assert float(signed.min()) >= -(2 ** (n - 1))
    assert float(signed.max()) <= 2 ** (n - 1) - 1
    assert torch.equal(signed, torch.round(signed))


# ---------------------------------------------------------------- (vi) literal grid


def test_literal_grid_moves_a_weight_with_zero_lsbs_when_requantized_at_fewer_bits():
    """Eq. 4 as printed divides by 2^n - 1, so grids of different widths do not nest: a weight
    whose k LSBs are zero changes value when re-expressed at n - k bits (the nested grid
    keeps it)."""
    scale = torch.tensor(1.0)
    found = None
    for n in range(2, 9):
        half = 2 ** (n - 1)
        for k in range(1, n):
            for code in range(0, 2**n, 2**k):
                w = torch.tensor([-1.0, (code - half) / half]) * scale  # -S pins the scale
                fine = quant.roundclamp_codes(w, n)
                if not bool(lsbs_zero(fine, k).all()):
                    continue
                change = (quant.quantize_value(w, n - k, "literal")
                          - quant.quantize_value(w, n, "literal"))
                if float(change.abs().max()) > 0:
                    found = (n, k, code, w, change)
                    break
            if found:
                break
        if found:
            break
    assert found is not None, "the literal grid nests at every width: no counterexample"
    n, k, code, w, change = found
    assert float(change.abs().max()) > 0
    assert torch.equal(quant.quantize_value(w, n, "nested"),
                       quant.quantize_value(w, n - k, "nested"))


def test_literal_grid_moves_the_papers_110_example_by_two_sevenths_of_the_scale():
    # 3-bit code 110 has a zero LSB; on the literal grid its value 6/7 becomes 3/3 at 2 bits
    # (in W units; 2/7 of S in weight units).
    w = torch.tensor([-1.0, 5 / 7])
    assert quant.roundclamp_codes(w, 3, grid="literal")[1] == 6
    change = quant.quantize_value(w, 2, "literal")[1] - quant.quantize_value(w, 3, "literal")[1]
    assert float(change) == pytest.approx(2 / 7)


# ---------------------------------------------------------------- straight-through gradient


@PROPERTY
@given(weight_cases(), st.sampled_from(quant.GRIDS))
def test_fake_quantize_forward_equals_quantize_value_bitwise(case, grid):
    n, k, w = case
    assert torch.equal(quant.fake_quantize(w.requires_grad_(), n, grid).detach(),
                       quant.quantize_value(w, n, grid))


@PROPERTY
@given(weight_cases(), st.sampled_from(quant.GRIDS))
def test_fake_quantize_gradient_is_the_identity(case, grid):
    n, k, w = case
    w.requires_grad_()
    upstream = torch.linspace(-3.0, 5.0, w.numel())
    quant.fake_quantize(w, n, grid).backward(upstream)
    assert torch.equal(w.grad, upstream)


@PROPERTY
@given(weight_cases())
def test_lsb_value_gradient_is_sign_of_lsb_times_code_axis_slope(case):
    """Paper Eq. 7 on the code axis: d|B_k|/dw = sign(B_k) * 2^(n-1) / S where |B_k| < 2^(k-1)."""
    n, k, w = case
    w.requires_grad_()
    lsb = quant.lsb_value(w, n, k)
    lsb.abs().sum().backward()
    slope = float(2 ** (n - 1)) / quant.weight_scale(w)
    inside = lsb.detach().abs() < 2 ** (k - 1)
    assert torch.allclose(w.grad[inside], (torch.sign(lsb.detach()) * slope)[inside],
                          rtol=1e-6, atol=0)


@pytest.mark.parametrize("n,k", [(n, k) for n in range(2, 9) for k in range(1, n)])
def test_lsb_value_gradient_is_zero_for_the_largest_positive_weight(n, k):
    # The top code's LSBs can never be zero; the clamp keeps the regularizer from shrinking S.
    w = torch.tensor([-0.25, 0.5, 1.0], requires_grad=True)
    quant.lsb_value(w, n, k).abs().sum().backward()
    assert float(w.grad[2]) == 0.0


# ---------------------------------------------------------------- beta


@PROPERTY
@given(grid_cases())
def test_lsb_nonzero_rate_is_the_fraction_of_codes_with_a_nonzero_low_bit(case):
    n, k, codes, w = case
    with_low_bits = sum(int(code) % 2**k != 0 for code in codes.tolist())
    assert quant.lsb_nonzero_rate(w, n, k) == pytest.approx(with_low_bits / len(codes))


@PROPERTY
@given(grid_cases(coarse=True))
def test_lsb_nonzero_rate_is_zero_on_the_coarse_grid(case):
    n, k, codes, w = case
    assert quant.lsb_nonzero_rate(w, n, k) == 0.0


@pytest.mark.parametrize("k", range(1, 8))
def test_lsb_nonzero_rate_of_uniform_weights_is_near_chance(k):
    generator = torch.Generator().manual_seed(1234 + k)
    w = torch.rand(200_000, generator=generator) * 2 - 1
    assert quant.lsb_nonzero_rate(w, 8, k) == pytest.approx(1 - 2.0**-k, abs=0.01)


# ---------------------------------------------------------------- degenerate inputs


@pytest.mark.parametrize("n", range(1, 17))
def test_all_zero_tensor_quantizes_to_zeros_on_the_nested_grid(n):
    zeros = torch.zeros(4, 3)
    assert torch.equal(quant.quantize_value(zeros, n), zeros)
    assert torch.equal(quant.fake_quantize(zeros, n), zeros)


@pytest.mark.parametrize("n", range(2, 9))
def test_all_zero_tensor_has_zero_lsb_values_and_rate(n):
    zeros = torch.zeros(7, requires_grad=True)
    lsb = quant.lsb_value(zeros, n, 1)
    lsb.abs().sum().backward()
    assert torch.equal(lsb.detach(), torch.zeros(7))
    assert bool(torch.isfinite(zeros.grad).all())
    assert quant.lsb_nonzero_rate(zeros, n, 1) == 0.0
    assert quant.quantization_error(zeros, n) == 0.0


@pytest.mark.parametrize("n", range(1, 17))
def test_all_zero_tensor_on_the_literal_grid_is_finite_and_within_the_scale_floor(n):
    # The literal grid has no zero level; zeros land half a step of the 1e-12 scale floor away.
    values = quant.quantize_value(torch.zeros(5), n, "literal")
    assert bool(torch.isfinite(values).all())
    assert float(values.abs().max()) <= 1e-12


def test_float16_weights_smaller_than_the_code_range_quantize_to_finite_values():
    # 2^(n-1) / S overflows float16 when S < 2^(n-1) / 65504 (about 2e-3 at 8 bits).
    w = torch.tensor([1e-3, -5e-4, 0.0], dtype=torch.float16)
    values = quant.quantize_value(w, 8)
    assert values.dtype == torch.float16
    assert bool(torch.isfinite(values).all())
    assert float(values[2]) == 0.0
    assert float(values[1]) == pytest.approx(-5e-4, abs=1e-3 / 128)


def test_all_zero_float16_tensor_quantizes_to_zeros():
    zeros = torch.zeros(3, dtype=torch.float16)
    assert torch.equal(quant.quantize_value(zeros, 8), zeros)


def test_quantization_keeps_the_dtype_of_the_weight():
    w = torch.tensor([0.3, -1.0, 0.7], dtype=torch.float64)
    assert quant.quantize_value(w, 4).dtype == torch.float64
    assert quant.fake_quantize(w, 4, "literal").dtype == torch.float64


@pytest.mark.parametrize("call", [
    lambda w: quant.roundclamp_codes(w, 0),
    lambda w: quant.roundclamp_codes(w, 17),
    lambda w: quant.roundclamp_codes(w, 4.0),
    lambda w: quant.quantize_value(w, 0),
    lambda w: quant.quantize_value(w, 4, "dorefa"),
    lambda w: quant.fake_quantize(w, 17),
    lambda w: quant.lsb_value(w, 4, 0),
    lambda w: quant.lsb_value(w, 4, 4),
    lambda w: quant.lsb_value(w, 1, 1),
    lambda w: quant.lsb_value(w, 17, 1),
    lambda w: quant.lsb_nonzero_rate(w, 4, 0),
    lambda w: quant.lsb_nonzero_rate(w, 4, 5),
    lambda w: quant.grid_step(torch.tensor(1.0), 4, "dorefa"),
], ids=["codes-0-bits", "codes-17-bits", "codes-float-bits", "value-0-bits", "value-bad-grid",
        "fake-17-bits", "lsb-k-0", "lsb-k-eq-n", "lsb-1-bit", "lsb-17-bits", "rate-k-0",
        "rate-k-gt-n", "step-bad-grid"])
def test_invalid_bits_k_or_grid_raise_value_error(call):
    with pytest.raises(ValueError):
        call(torch.tensor([0.5, -1.0]))


# ---------------------------------------------------------------- fused LSB penalty

@PROPERTY
@given(weight_cases())
def test_fused_lsb_l1_equals_the_l1_of_lsb_value(case):
    n, k, w = case
    assert torch.equal(quant.lsb_l1(w, n, k), quant.lsb_value(w, n, k).abs().sum())


@PROPERTY
@given(weight_cases())
def test_fused_lsb_l1_gradient_equals_autograd_through_lsb_value(case):
    n, k, w = case
    fused, reference = w.clone().requires_grad_(), w.clone().requires_grad_()
    (3.0 * quant.lsb_l1(fused, n, k)).backward()
    (3.0 * quant.lsb_value(reference, n, k).abs().sum()).backward()
    # Same zeros; elsewhere the two chains multiply the same factors in another order.
    assert torch.equal(fused.grad == 0, reference.grad == 0)
    assert torch.allclose(fused.grad, reference.grad, rtol=1e-6, atol=0)


@PROPERTY
@given(weight_cases())
def test_weight_unit_lsb_l1_is_the_code_unit_one_times_the_step(case):
    n, k, w = case
    step = quant.weight_scale(w) * 2.0 ** (1 - n)
    reference = (quant.lsb_value(w, n, k).abs() * step).sum()
    assert torch.allclose(quant.lsb_l1(w, n, k, units="weight"), reference, rtol=1e-5, atol=0)


@PROPERTY
@given(weight_cases())
def test_weight_unit_lsb_l1_pulls_every_weight_with_the_same_strength(case):
    # Gradient sign(B) (0 on the clamp bounds), whatever the width and the scale.
    n, k, w = case
    fused, reference = w.clone().requires_grad_(), w.clone().requires_grad_()
    quant.lsb_l1(fused, n, k, units="weight").backward()
    quant.lsb_value(reference, n, k).abs().sum().backward()
    assert torch.equal(fused.grad, torch.sign(reference.grad))


def test_weight_unit_lsb_l1_scales_per_channel_with_a_per_channel_scale():
    w = torch.tensor([[0.3, -0.2], [0.03, -0.02]])
    scale = torch.tensor([[0.5], [0.05]])
    per_row = [quant.lsb_l1(w[i], 4, 1, scale[i], units="weight") for i in range(2)]
    assert torch.allclose(quant.lsb_l1(w, 4, 1, scale, units="weight"), sum(per_row))
    # Code units count both rows alike: the same codes, so the same |B| in steps.
    assert torch.allclose(quant.lsb_l1(w[0], 4, 1, scale[0]), quant.lsb_l1(w[1], 4, 1, scale[1]))


def test_lsb_l1_rejects_unknown_units():
    with pytest.raises(ValueError, match="units must be one of"):
        quant.lsb_l1(torch.randn(4), 4, 1, units="bits")


def test_fused_lsb_l1_rejects_k_outside_1_to_bits_minus_1():
    with pytest.raises(ValueError, match="k must be in 1..bits-1"):
        quant.lsb_l1(torch.randn(4), 4, 4)
