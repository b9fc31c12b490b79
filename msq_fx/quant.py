"""RoundClamp quantizer math as pure tensor functions.

Conventions (see docs/design.md §4, "Method decisions"):

* A weight tensor ``w`` is mapped to ``W = w / (2 S) + 1/2`` in ``[0, 1]`` with the per-tensor
  scale ``S = max|w|`` (detached: the grid follows the weights, gradients do not flow into S).
* RoundClamp code (paper Eq. 4): ``c_n = min(round(2^n W), 2^n - 1)``, an unsigned n-bit integer.
  Both grids below share these codes; they differ only in how a code is dequantized.
* ``nested`` grid (default): value ``c_n / 2^n``, i.e. ``w_q = (c_n - 2^(n-1)) * S / 2^(n-1)``.
  The signed code ``c_n - 2^(n-1)`` is an ordinary two's-complement n-bit integer, zero is exact,
  and every (n-k)-bit grid point is an n-bit grid point, so dropping k zero LSBs moves no value.
* ``literal`` grid (paper Eq. 4 as printed): ``W`` is coded as ``c_n = round((2^n - 1) W)`` and
  dequantized as ``c_n / (2^n - 1)``, i.e. ``2^n`` levels evenly spaced from ``-S`` to ``S``,
  symmetric, with no zero: at 1 bit a binary ``{-S, S}``, at 2 bits ``{-S, -S/3, S/3, S}``.
  Coding and dequantizing with the same ``2^n - 1`` keeps ``w_q`` an unbiased rounding of ``w``.
  Grids of different widths do not nest, so dropping LSBs moves values by up to half a step.
  Its LSB penalty and beta are measured on the nested code axis.
* Every quantity "in step units" is measured on the code axis ``x = 2^n W`` (one unit = one n-bit
  step), so the LSB value ``B_k`` and the regularization strength mean the same at every width.

All functions accept ``bits`` and ``k`` as Python ints; tensors keep the dtype of ``w``.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

__all__ = ["GRIDS", "SCALE_MODES", "BINARY_GRADIENTS", "is_binary", "CLIP_CANDIDATES",
           "weight_scale", "scale_shape", "max_scale",
           "best_clip", "code_half", "code_position", "roundclamp_codes", "signed_codes",
           "grid_step", "grid_offset", "dequantize", "quantize_value", "fake_quantize", "Recipe",
           "QUANTIZER_NODES", "lsb_value", "lsb_l1", "lsb_integer", "lsb_nonzero_rate",
           "drop_lsbs", "quantization_error", "PENALTY_UNITS"]

GRIDS = ("nested", "literal")

#: How a binary weight (1 bit on the literal grid: S * sign(w)) passes the gradient with a learned
#: scale: "inside_clip" as at every other width (LSQ: a latent past the clip gets none);
#: "every_weight" to every latent, the scale getting its exact derivative sign(w).
BINARY_GRADIENTS = ("inside_clip", "every_weight")

#: Smallest scale used for an all-zero tensor, so the math never divides by zero.
_MIN_SCALE = 1e-12


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"bits must be an int in 1..16, got {bits!r}")


def _check_grid(grid: str) -> None:
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}")


def _check_binary_gradient(binary_gradient: str) -> None:
    if binary_gradient not in BINARY_GRADIENTS:
        raise ValueError(f"binary_gradient must be one of {BINARY_GRADIENTS}, "
                         f"got {binary_gradient!r}")


def weight_scale(w: Tensor) -> Tensor:
    """Per-tensor scale ``S = max|w|`` (detached; a tiny floor keeps all-zero tensors finite)."""
    floor = max(_MIN_SCALE, torch.finfo(w.dtype).tiny) if w.is_floating_point() else _MIN_SCALE
    # max(-min, max) equals max|w| exactly, without a weight-sized |w| temporary.
    low, high = torch.aminmax(w.detach())
    return torch.maximum(-low, high).clamp_min(floor)


SCALE_MODES = ("max", "tensor", "channel")

#: Candidate clips searched by :func:`best_clip`, as fractions of max|w| (of the tensor or row).
CLIP_CANDIDATES = 64


def scale_shape(w: Tensor, mode: str) -> tuple[int, ...]:
    """The shape of a learned scale of ``w``: () for "tensor", (C, 1, ..., 1) for "channel".

    "channel" takes one scale per slice along dim 0 (a conv's or linear's output channel, an
    attention projection's output row); any axis keeps the nesting exact, and dim 0 is the
    axis ONNX's per-axis DequantizeLinear and the int8 kernels expect. A tensor with fewer
    than two dimensions has no channels and gets one scale.
    """
    if mode not in SCALE_MODES:
        raise ValueError(f"scale mode must be one of {SCALE_MODES}, got {mode!r}")
    if mode == "channel" and w.dim() >= 2:
        return (w.shape[0],) + (1,) * (w.dim() - 1)
    return ()


def max_scale(w: Tensor, shape: tuple[int, ...] = ()) -> Tensor:
    """max|w| over the whole tensor (``shape == ()``) or over each slice along dim 0, floored."""
    if shape == ():
        return weight_scale(w)
    floor = max(_MIN_SCALE, torch.finfo(w.dtype).tiny) if w.is_floating_point() else _MIN_SCALE
    per_row = w.detach().reshape(w.shape[0], -1).abs().amax(dim=1) if w.numel() else \
        w.new_zeros(w.shape[0])
    return per_row.clamp_min(floor).reshape(shape)


def best_clip(w: Tensor, bits: int, grid: str = "nested", shape: tuple[int, ...] = (),
              candidates: int = CLIP_CANDIDATES) -> Tensor:
    """The scale S (of ``shape``) that minimises ``sum((quantize_value(w, bits, S) - w)^2)``.

    A search over ``candidates`` clips evenly spaced in (0, max|w|], per tensor or per slice
    along dim 0 (``shape`` from :func:`scale_shape`); ties go to the larger clip. Used to
    initialise learned scales: at 2-4 bits S = max|w| costs two to three times this error.
    """
    w = w.detach()
    top = max_scale(w, shape)
    best, best_error = top.clone(), None
    reduce_dims = tuple(range(1, w.dim())) if shape != () else None
    for index in range(candidates, 0, -1):
        scale = top * (index / candidates)
        error = (quantize_value(w, bits, grid, scale) - w).pow_(2)
        error = error.sum() if reduce_dims is None else error.sum(dim=reduce_dims, keepdim=True)
        if best_error is None:
            best_error = error
            continue
        better = error < best_error
        best = torch.where(better, scale, best)
        best_error = torch.where(better, error, best_error)
    return best.reshape(shape)


def code_half(bits: int, grid: str = "nested") -> float:
    """Half the code range: ``2^(n-1)`` on the nested grid, ``(2^n - 1) / 2`` on the literal one."""
    return float(2 ** (bits - 1)) if grid == "nested" else (2.0**bits - 1.0) / 2.0


def code_position(w: Tensor, bits: int, scale: Tensor, grid: str = "nested") -> Tensor:
    """The continuous code-axis position ``x = w * h / S + h`` with ``h = code_half(bits, grid)``:
    ``2^n W`` on the nested grid, in [0, 2^n]."""
    half = code_half(bits, grid)
    # Divide first: half / scale overflows float16 for small scales, w / scale stays in [-1, 1].
    return (w / scale) * half + half


def roundclamp_codes(w: Tensor, bits: int, scale: Tensor | None = None,
                     grid: str = "nested") -> Tensor:
    """Unsigned RoundClamp codes ``c_n = min(round(2^n W), 2^n - 1)`` (nested grid; the literal
    grid rounds ``(2^n - 1) W``) as a float tensor (no grad)."""
    _check_bits(bits)
    scale = weight_scale(w) if scale is None else scale
    if grid == "literal":
        return _literal_codes(w, bits, scale)
    return _detached_code_position(w, bits, scale, grid).round_().clamp_(0.0, float(2**bits - 1))


def _literal_codes(w: Tensor, bits: int, scale: Tensor) -> Tensor:
    """The literal grid's codes, rounded in the centred position ``u = w h / S`` whose levels are
    the half-integers in [-h, h]: |u| goes to floor(|u|) + 1/2, so q(-w) = -q(w) exactly, ties
    included (a tie goes away from zero; 0 itself, with no level of its own, goes to +1/2)."""
    half = code_half(bits, "literal")
    centred = (w.detach() / scale).mul_(half)
    magnitude = centred.abs().floor_().add_(0.5).clamp_(max=half)
    return torch.where(centred < 0, -magnitude, magnitude).add_(half)


def _detached_code_position(w: Tensor, bits: int, scale: Tensor, grid: str = "nested") -> Tensor:
    """code_position's arithmetic without grad, in place after the first op: one weight-sized
    allocation instead of three, which on large models is most of the quantizer's memory
    traffic. The values are code_position's bit for bit.

    On the nested grid ``h = 2^(n-1)``, so ``(w / S) * h`` is exact and ``h + h * (w / S)`` in
    one pass (``torch.add`` with ``alpha``, a fused multiply-add or not) rounds once, where
    the multiplication and the addition would: the same bits, one weight-sized pass fewer.
    """
    half = code_half(bits, grid)
    x = w.detach() / scale
    if grid != "nested":
        return x.mul_(half).add_(half)
    return torch.add(torch.full((), half, dtype=x.dtype, device=x.device), x, alpha=half,
                     out=x)


def signed_codes(unsigned: Tensor, bits: int, inplace: bool = False) -> Tensor:
    """Shift unsigned codes to the signed range ``[-2^(n-1), 2^(n-1) - 1]`` (exact in float);
    ``inplace`` overwrites ``unsigned``."""
    half = float(2 ** (bits - 1))
    return unsigned.sub_(half) if inplace else unsigned - half


def grid_step(scale: Tensor, bits: int, grid: str = "nested") -> Tensor:
    """Value of one signed-code step: ``S / 2^(n-1)`` (nested) or ``2 S / (2^n - 1)`` (literal)."""
    _check_grid(grid)
    if grid == "nested":
        return scale / float(2 ** (bits - 1))
    return scale * (2.0 / float(2**bits - 1))


def grid_offset(grid: str = "nested") -> float:
    """Code offset of the grid: the literal grid's levels sit half a step off the integers."""
    _check_grid(grid)
    return 0.0 if grid == "nested" else 0.5


def dequantize(signed: Tensor, step: Tensor, offset: float | Tensor,
               inplace: bool = False) -> Tensor:
    """``(signed + offset) * step``: the one formula both the fake-quant and the lowered model use,
    so their weights agree bit for bit (in place or not, the same two roundings happen)."""
    if inplace:
        # The nested grid's offset is 0.0, and x + 0.0 is x for codes (never -0.0): skipping
        # that weight-sized pass keeps the bits the lowered model, which adds it, computes.
        shifted = signed if isinstance(offset, float) and offset == 0.0 else signed.add_(offset)
        return shifted.mul_(step)
    return (signed + offset) * step


def quantize_value(w: Tensor, bits: int, grid: str = "nested",
                   scale: Tensor | None = None) -> Tensor:
    """The fake-quantized value of ``w`` at ``bits`` (no gradient); ``scale`` defaults to
    ``weight_scale(w)``."""
    scale = weight_scale(w) if scale is None else scale
    signed = signed_codes(roundclamp_codes(w, bits, scale, grid), bits, inplace=True)
    return dequantize(signed, grid_step(scale, bits, grid), grid_offset(grid),
                      inplace=True).to(w.dtype)


class Recipe(NamedTuple):
    """What a fake-quantized weight was computed from, kept on its autograd node as ``recipe``.

    ``latent``, ``bits``, ``grid`` and ``scale`` give the value again (``quantize_value``);
    the versions are the tensors' ``_version`` at the forward, so a consumer can tell whether
    recomputing would still give the same bits (msq_fx.recompute). A displaced weight (the
    finite-difference Hessian's) adds ``offsets[offset_index]``.
    """

    latent: Tensor
    bits: int
    grid: str
    version: int
    scale: Tensor | None = None  # kept (a scalar) so a recompute skips the max|w| pass
    offsets: Sequence[Tensor] | None = None  # displaced: plus offsets[offset_index]
    offset_index: int = 0
    offset_version: int = 0
    scale_version: int | None = None  # a learned scale: its version at the forward


class _StraightThrough(torch.autograd.Function):
    """Returns ``quantize_value(w, bits, grid)`` in the forward pass; passes the gradient to ``w``
    unchanged.

    A custom Function (rather than ``w + (q - w).detach()``) keeps the forward value bit-exact,
    which is what makes the lowered integer model equal the trained model, and it saves nothing
    for backward. Its backward is itself differentiable (identity), so Hessian-vector products
    through it work.

    The node keeps the recipe of its output (``w``, ``bits``, ``grid``, ``w``'s version and the
    scale), so a consumer that saves the quantized weight for its backward can store the recipe
    instead of the tensor (see msq_fx.recompute).
    """

    @staticmethod
    def forward(ctx, w: Tensor, bits: int, grid: str,  # noqa: D102
                binary_gradient_gain: float = 1.0) -> Tensor:
        ctx.gain = binary_gradient_gain if is_binary(bits, grid) else 1.0
        # A compiled graph saves what its own partitioner decides; the recipe (and the tensor
        # version it reads, which the compiler cannot trace) is for eager autograd only.
        scale = weight_scale(w)
        ctx.recipe = (None if torch.compiler.is_compiling()
                      else Recipe(w, bits, grid, w._version, scale))
        # Computed here, not passed in: an output that is a new tensor (not an input returned
        # as is) keeps this node as its grad_fn, which is how a saved view of it is recognized.
        return quantize_value(w, bits, grid, scale)

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        return (grad if ctx.gain == 1.0 else grad * ctx.gain), None, None, None


class _LearnedScale(torch.autograd.Function):
    """``quantize_value(w, bits, grid, scale)`` with gradients for ``w`` and the scale.

    The rounding is passed straight through (LSQ, Esser et al. 2020): inside the clip
    dv/dw = 1 and dv/dS = (v - w) / S (on either grid v = S f(w / S) with f(u) ~ u); a weight
    past the clip is clamped, so dv/dw = 0 and dv/dS = v / S.
    A binary weight (:func:`is_binary`) is ``S sign(w)``: its value does not depend on |w|.
    With ``every_weight`` True no latent counts as past a clip: dv/dw = 1 for every weight and
    dv/dS = sign(w) = v / S. (Under LSQ's rule a binary latent past twice the scale gets no
    gradient, so its sign stays: 31-39% of two binary ResNet-20 convs after fine-tuning; yet
    passing the gradient to them measured 0.3-0.6 points worse there, docs/fidelity.md.)
    The scale's gradient is multiplied by ``1 / sqrt(n * 2^(bits-1))`` (n weights per scale),
    LSQ's step-size gradient scale, so a scale learns at the pace of the weights it serves.
    Nothing weight-sized is saved: the backward recomputes from ``w`` (a live parameter).
    Like ``_StraightThrough`` the node keeps the recipe of its output for recomputation.
    """

    @staticmethod
    def forward(ctx, w: Tensor, scale: Tensor, bits: int, grid: str,  # noqa: D102
                every_weight: bool = False, binary_gradient_gain: float = 1.0) -> Tensor:
        scale = scale.detach()
        ctx.save_for_backward(w, scale)
        ctx.bits, ctx.grid = bits, grid
        ctx.every_weight = every_weight and is_binary(bits, grid)
        ctx.gain = binary_gradient_gain if is_binary(bits, grid) else 1.0
        ctx.recipe = (None if torch.compiler.is_compiling()
                      else Recipe(w, bits, grid, w._version, scale, scale_version=scale._version))
        return quantize_value(w, bits, grid, scale)

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        w, scale = ctx.saved_tensors
        bits, grid = ctx.bits, ctx.grid
        value = quantize_value(w, bits, grid, scale)
        if ctx.every_weight:
            inside, per_weight = None, value.div_(scale)
        else:
            position = _detached_code_position(w, bits, scale, grid).round_()
            inside = (position >= 0) & (position <= float(2**bits - 1))
            per_weight = torch.where(inside, value - w.detach(), value).div_(scale)
        grad_scale = _reduce_to(grad * per_weight, scale.shape)
        grad_scale = grad_scale * ((w.numel() / max(scale.numel(), 1)) * 2 ** (bits - 1)) ** -0.5
        grad_w = grad if inside is None else grad * inside
        if ctx.gain != 1.0:
            grad_w = grad_w * ctx.gain
        return grad_w, grad_scale, None, None, None, None


#: The autograd nodes of :func:`fake_quantize`'s output; each holds the output's ``Recipe``.
QUANTIZER_NODES = (_StraightThrough._backward_cls, _LearnedScale._backward_cls)


def _reduce_to(values: Tensor, shape: torch.Size) -> Tensor:
    """``values`` summed over the dimensions a tensor of ``shape`` was broadcast along."""
    if tuple(shape) == ():
        return values.sum()
    dims = tuple(i for i, size in enumerate(shape) if size == 1 and values.shape[i] != 1)
    # sum(dim=()) would reduce every dimension: one weight per scale needs no reduction.
    return values.sum(dim=dims, keepdim=True) if dims else values


def fake_quantize(w: Tensor, bits: int, grid: str = "nested",
                  scale: Tensor | None = None, binary_gradient: str = "inside_clip",
                  binary_gradient_gain: float = 1.0) -> Tensor:
    """RoundClamp fake quantization with a straight-through gradient (paper Eq. 2 and 4).

    ``scale`` None: the scale is max|w| (detached). A tensor: a learned scale (of the shape
    :func:`scale_shape` gives) that receives an LSQ gradient; weights past it clamp, except
    binary weights under ``binary_gradient="every_weight"`` (see :data:`BINARY_GRADIENTS`).
    ``binary_gradient_gain`` multiplies the gradient a binary weight (:func:`is_binary`)
    passes to its latent; other widths ignore it.
    """
    if scale is None:
        return _StraightThrough.apply(w, bits, grid, binary_gradient_gain)
    _check_binary_gradient(binary_gradient)
    return _LearnedScale.apply(w, scale, bits, grid, binary_gradient == "every_weight",
                               binary_gradient_gain)


def is_binary(bits: int, grid: str) -> bool:
    """Whether ``bits`` on ``grid`` is the binary ``{-S, S}`` (1 bit on the literal grid; the
    nested grid's 1 bit is ``{-S, 0}``)."""
    return bits == 1 and grid == "literal"


def lsb_value(w: Tensor, bits: int, k: int, scale: Tensor | None = None) -> Tensor:
    """Continuous value of the k least significant bits, in n-bit step units (paper Eq. 5).

    ``B_k = 2^n W - 2^k c_(n-k)(W)`` with the (n-k)-bit code detached, so ``dB_k/dx = 1`` and the
    L1 gradient is ``sign(B_k)`` on the code axis (Eq. 7). Rounding to nearest bounds |B_k| by
    2^(k-1) except in the clamped top bin, where the top code's LSBs can never be zero; there B_k
    is clamped to 2^(k-1), which also stops the regularizer from dragging the largest weight (and
    with it the scale) down forever.
    """
    _check_bits(bits)
    if not 1 <= k < bits:
        raise ValueError(f"k must be in 1..bits-1 (bits={bits}), got {k}")
    scale = weight_scale(w) if scale is None else scale
    x = code_position(w, bits, scale)
    coarse = roundclamp_codes(w, bits - k, scale)
    bound = float(2 ** (k - 1))
    return torch.clamp(x - float(2**k) * coarse, -bound, bound)


PENALTY_UNITS = ("code", "weight")


def lsb_l1(w: Tensor, bits: int, k: int, scale: Tensor | None = None,
           units: str = "code") -> Tensor:
    """``sum |B_k|`` over ``w`` (the L1 of :func:`lsb_value`), with the same value and gradient.

    ``units="code"`` counts B_k in n-bit steps, as the paper's Eq. 5 does: its gradient on a
    weight is sign(B) / step, so the pull grows 2x per bit of width and with 1 / S.
    ``units="weight"`` counts B_k times the step, the LSB residual in the weight's own units:
    the gradient is sign(B), the same pull at every width and scale.

    A fused autograd Function: the forward keeps nothing but ``w`` (already alive as a parameter)
    and the backward recomputes ``B_k`` in place, so the penalty over a whole model costs one
    weight-sized temporary at a time instead of a graph of them per layer.
    """
    _check_bits(bits)
    if not 1 <= k < bits:
        raise ValueError(f"k must be in 1..bits-1 (bits={bits}), got {k}")
    if units not in PENALTY_UNITS:
        raise ValueError(f"units must be one of {PENALTY_UNITS}, got {units!r}")
    # The penalty moves weights onto the coarser grid; it does not move a learned scale.
    return _LsbL1.apply(w, bits, k, None if scale is None else scale.detach(), units)


def _unclamped_lsb(w: Tensor, bits: int, k: int, scale: Tensor) -> Tensor:
    """``x - 2^k c_(n-k)``: lsb_value before its clamp, in place after the first op (no grad).

    The (n-k)-bit code position is taken as ``x * 2^-k`` rather than from ``w`` again: scaling by
    a power of two is exact, so it has the same bits as ``code_position(w, n - k)`` and saves a
    division (the slowest pass) and a weight-sized allocation.
    """
    x = _detached_code_position(w, bits, scale)
    coarse = (x * float(2.0**-k)).round_().clamp_(0.0, float(2 ** (bits - k) - 1))
    # x - 2^k c in one pass: 2^k c is an integer below 2^n, so exact, and the difference too.
    return x.sub_(coarse, alpha=float(2**k))


class _LsbL1(torch.autograd.Function):
    """sum |clamp(x - 2^k c, -2^(k-1), 2^(k-1))|; d/dw = sign(B) * [|x - 2^k c| < 2^(k-1)] *
    dx/dw: no slope on the bounds, as torch.clamp's own backward has it."""

    @staticmethod
    def forward(ctx, w: Tensor, bits: int, k: int, scale: Tensor | None,  # noqa: D102
                units: str) -> Tensor:
        scale = weight_scale(w) if scale is None else scale
        bound = float(2 ** (k - 1))
        ctx.save_for_backward(w, scale)
        ctx.bits, ctx.k, ctx.units = bits, k, units
        magnitude = _unclamped_lsb(w, bits, k, scale).clamp_(-bound, bound).abs_()
        if units == "weight":
            magnitude.mul_(scale * float(2.0 ** (1 - bits)))
        return magnitude.sum()

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        w, scale = ctx.saved_tensors
        bits, k = ctx.bits, ctx.k
        bound = float(2 ** (k - 1))
        # dB/dw is 1 / step; in weight units the step the value was multiplied by cancels it.
        slope = grad if ctx.units == "weight" else grad * (float(2 ** (bits - 1)) / scale)
        # sign(B) where |B| < bound, else 0, without a mask: after the clamp B / bound is in
        # [-1, 1], its fractional part is itself inside and 0 on the bounds, and its sign is
        # the wanted factor. bound is a power of two, so the scaling is exact.
        factor = _unclamped_lsb(w, bits, k, scale).clamp_(-bound, bound).mul_(1.0 / bound)
        return factor.frac_().sign_().mul_(slope), None, None, None, None


def lsb_integer(unsigned: Tensor, k: int) -> Tensor:
    """The integer held by the k LSBs of unsigned codes (``c mod 2^k``)."""
    return torch.remainder(unsigned, float(2**k))


def lsb_nonzero_rate(w: Tensor, bits: int, k: int, scale: Tensor | None = None) -> float:
    """beta: the fraction of weights whose k LSBs are not all zero at ``bits``
    (chance ~ 1 - 2^-k)."""
    _check_bits(bits)
    if not 1 <= k < bits:
        raise ValueError(f"k must be in 1..bits-1 (bits={bits}), got {k}")
    codes = roundclamp_codes(w, bits, None if scale is None else scale.detach())
    return float((lsb_integer(codes, k) != 0).float().mean())


def drop_lsbs(unsigned: Tensor, k: int) -> Tensor:
    """Remove the k LSBs of unsigned codes by truncation (``c >> k``).

    Exact when those LSBs are zero (then the (n-k)-bit code dequantizes to the same value on the
    nested grid); training re-quantizes from the latent weight instead, rounding to nearest.
    """
    return torch.div(unsigned, float(2**k), rounding_mode="floor")


def quantization_error(w: Tensor, bits: int, grid: str = "nested",
                       scale: Tensor | None = None) -> float:
    """``||W_q - W||^2`` of one tensor (the perturbation term of Omega, paper Eq. 9)."""
    w = w.detach()
    scale = None if scale is None else scale.detach()
    return float((quantize_value(w, bits, grid, scale) - w).double().pow(2).sum())
