"""The quantizer modules: weight and activation quantizers, for training and lowered.

``WeightFakeQuant`` quantizes one weight tensor during training and ``LoweredWeight`` holds it as
integer codes after ``convert``; ``ActivationFakeQuant`` and ``LoweredActivation`` do the same for
a layer's inputs. A weight quantizer sits beside its latent Parameter as the owner's child
``<name>_quantizer`` (msq_fx.owners). All quantizer state that must survive a ``state_dict``
round trip (bits, prune step, integer codes, scale) is in buffers.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from . import quant
from .weight_cache import CachesItsWeight, WeightCache, from_cache, serves_from_cache
# Pickles of models prepared before the owner swap and the recompute hooks had modules of their
# own name these functions here.
from .owners import _new_quantized_instance  # noqa: F401
from .recompute import _enter_recompute, _leave_recompute  # noqa: F401

__all__ = ["WeightFakeQuant", "Prefetched", "LoweredWeight", "ActivationFakeQuant",
           "LoweredActivation", "rounded_to_grid", "KINDS"]

#: The kinds of weight a quantizer serves.
KINDS = ("conv", "depthwise", "linear", "attention")


def _int_of_buffer(module: nn.Module, buffer: str, copy: str) -> int:
    """The value of the one-element ``buffer`` as a Python int, kept in ``module``'s plain
    attribute ``copy``. Under ``torch.compile`` the copy is read instead: reading a tensor's
    value breaks the graph (once per layer), while a Python int is specialized on, and the
    graph traced again when it changes. The buffer is the truth (it is what state_dict saves),
    so every eager read refreshes the copy."""
    if torch.compiler.is_compiling() and copy in module.__dict__:
        return module.__dict__[copy]
    # Eager, or compiling a module unpickled from before the copy existed and not read since:
    # reading the buffer costs that graph a break, not a wrong value.
    value = int(module._buffers[buffer])
    module.__dict__[copy] = value
    return value


class WeightFakeQuant(CachesItsWeight):
    """RoundClamp fake quantization of one weight tensor during training.

    Buffers: ``bits`` (current width q), ``prune_step`` (p, LSBs removed at the next prune).
    ``static_bits`` and ``static_prune_step`` are the two as Python ints, for ``torch.compile``
    (:meth:`set_bits`, :meth:`set_prune_step` and ``load_state_dict`` keep each with its
    buffer; an eager read through :attr:`num_bits` or :attr:`prune_lsbs` refreshes it).
    Parameter ``scale`` (learned scale modes only): S, one per tensor ("tensor") or per output
    channel ("channel"), trained with the weights; the n-bit step is S / 2^(n-1), so dropping
    zero LSBs never moves a value. With ``scale_mode="max"`` there is no parameter and S is
    max|w| at every forward.
    Plain attributes (re-created by ``prepare``): ``kind``, ``names`` (every FQN of the tensor),
    ``grid``, ``binary_gradient`` (how a binary width passes the gradient with a learned
    scale, :data:`msq_fx.quant.BINARY_GRADIENTS`), ``binary_gradient_gain`` (what a binary
    width's latent gradient is multiplied by), ``prunable`` (False for layers whose width a
    policy fixes), ``recompute`` (the
    owner's forward lets ops save how to recompute the quantized weight instead of a copy),
    ``cache`` (inside ``cached_quantized_weights``: the last quantized tensor and what it was
    computed from, else None), ``prefetched`` (a ``Prefetched`` weight for the next call, set by
    ``prefetch`` during a forward, else None).
    """

    def __init__(self, bits: int, kind: str, names: tuple[str, ...], grid: str = "nested",
                 prunable: bool = True, recompute: bool = False, scale_mode: str = "max",
                 latent: Tensor | None = None, binary_gradient: str = "inside_clip",
                 binary_gradient_gain: float = 1.0) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        quant._check_grid(grid)
        quant._check_binary_gradient(binary_gradient)
        if scale_mode not in quant.SCALE_MODES:
            raise ValueError(f"scale_mode must be one of {quant.SCALE_MODES}, got {scale_mode!r}")
        if scale_mode != "max":
            if latent is None:
                raise ValueError(f"{names[0]}: a learned scale ({scale_mode!r}) is initialised "
                                 f"from the weight; pass latent=")
            shape = quant.scale_shape(latent, scale_mode)
            self.scale = nn.Parameter(quant.best_clip(latent, int(bits), grid, shape))
        self.scale_mode = scale_mode
        self.register_buffer("bits", torch.tensor(int(bits), dtype=torch.int64))
        self.static_bits = int(bits)
        self.register_buffer("prune_step", torch.tensor(1, dtype=torch.int64))
        self.static_prune_step = 1
        self.kind = kind
        self.names = tuple(names)
        self.grid = grid
        self.binary_gradient = binary_gradient
        self.binary_gradient_gain = float(binary_gradient_gain)
        self.prunable = prunable
        self.recompute = recompute
        self.group = self.names[0]
        self.cache: WeightCache | None = None
        self.prefetched: Prefetched | None = None

    def __getstate__(self) -> dict:
        # A prefetched weight belongs to the forward that made it (and holds its graph).
        return {**super().__getstate__(), "prefetched": None}

    @property
    def num_bits(self) -> int:
        """The width q as a Python int."""
        return _int_of_buffer(self, "bits", "static_bits")

    @property
    def prune_lsbs(self) -> int:
        """p, the LSBs the next prune removes, as a Python int."""
        return _int_of_buffer(self, "prune_step", "static_prune_step")

    def set_bits(self, bits: int) -> None:
        """Set the width (the ``bits`` buffer and its Python copy ``static_bits``)."""
        self.bits.fill_(int(bits))
        self.__dict__["static_bits"] = int(bits)

    def set_prune_step(self, p: int) -> None:
        """Set p (the ``prune_step`` buffer and its Python copy ``static_prune_step``)."""
        self.prune_step.fill_(int(p))
        self.__dict__["static_prune_step"] = int(p)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.__dict__["static_bits"] = int(self.bits)
        self.__dict__["static_prune_step"] = int(self.prune_step)

    @property
    def learned_scale(self) -> Tensor | None:
        """The learned scale parameter, or None when S is max|w| (``scale_mode="max"``)."""
        return self._parameters.get("scale")

    def forward(self, latent: Tensor) -> Tensor:
        bits, scale = self.num_bits, self.learned_scale
        sources = (latent,) if scale is None else (latent, scale)
        if serves_from_cache(self, *sources):
            return from_cache(self, sources, (bits, self.grid),
                               lambda: self._quantize(latent, bits, scale))
        prefetched = self.__dict__.get("prefetched")
        if prefetched is not None:
            self.__dict__["prefetched"] = None  # a plain attribute: skip Module.__setattr__
            if prefetched.serves(latent, bits, self.grid, scale):
                return prefetched.value
        return self._quantize(latent, bits, scale)

    def _quantize(self, latent: Tensor, bits: int, scale: Tensor | None) -> Tensor:
        # A quantizer pickled before the gain existed has none: it passed the plain gradient.
        gain = self.__dict__.get("binary_gradient_gain", 1.0)
        return quant.fake_quantize(latent, bits, self.grid, scale, self.binary_gradient, gain)

    def prefetch(self, latent: Tensor) -> bool:
        """Quantize ``latent`` now for this quantizer's next call, which returns that tensor if
        nothing it was computed from has changed and grad mode is on (as it is now).

        The model's recompute hooks call it for the small weights at the start of a forward
        (msq_fx.recompute). Returns False, and prepares nothing, where the inference cache
        would serve the weight.
        """
        bits, scale = self.num_bits, self.learned_scale
        if serves_from_cache(self, *((latent,) if scale is None else (latent, scale))):
            return False
        self.__dict__["prefetched"] = Prefetched.of(
            self._quantize(latent, bits, scale), latent, bits, self.grid, scale)
        return True

    def drop_prefetched(self) -> None:
        """Forget a prefetched weight its forward did not use."""
        self.__dict__["prefetched"] = None

    def lsb_l1(self, latent: Tensor, k: int | None = None, units: str = "code") -> Tensor:
        """``sum |B_k|`` over the tensor in step units, or times the step with
        ``units="weight"`` (:func:`msq_fx.quant.lsb_l1`); k defaults to the prune step p."""
        k = self.prune_lsbs if k is None else k
        k = min(k, self.num_bits - 1)
        if k < 1:
            return latent.new_zeros(())
        return quant.lsb_l1(latent, self.num_bits, k, self.learned_scale, units)

    def lsb_nonzero_rate(self, latent: Tensor, k: int) -> float:
        """beta of this weight: the fraction whose k LSBs are not all zero at the current width."""
        return quant.lsb_nonzero_rate(latent.detach(), self.num_bits, k, self.learned_scale)

    def quantization_error(self, latent: Tensor, bits: int | None = None) -> float:
        """``||W_q - W||^2`` at ``bits`` (default: the current width) with this
        quantizer's scale."""
        bits = self.num_bits if bits is None else bits
        return quant.quantization_error(latent, bits, self.grid, self.learned_scale)

    @torch.no_grad()
    def refit_scale(self, latent: Tensor) -> None:
        """Set a learned scale to the error-minimising clip at the current width (no-op for
        ``scale_mode="max"``)."""
        scale = self.learned_scale
        if scale is not None:
            scale.copy_(quant.best_clip(latent, self.num_bits, self.grid, tuple(scale.shape)))

    def scale_of(self, latent: Tensor) -> Tensor:
        """S as the forward uses it (detached): the learned scale, or max|latent|."""
        scale = self.learned_scale
        return quant.weight_scale(latent) if scale is None else scale.detach()

    def extra_repr(self) -> str:
        return (f"bits={self.num_bits}, p={self.prune_lsbs}, kind={self.kind}, "
                f"grid={self.grid}, scale={self.scale_mode}")


class Prefetched(NamedTuple):
    """A quantized weight computed ahead of its use (``WeightFakeQuant.prefetch``), with what it
    was computed from."""

    value: Tensor
    latent: Tensor
    version: int
    bits: int
    grid: str
    scale: Tensor | None
    scale_version: int | None

    @classmethod
    def of(cls, value: Tensor, latent: Tensor, bits: int, grid: str,
           scale: Tensor | None) -> "Prefetched":
        return cls(value, latent, latent._version, bits, grid, scale,
                   None if scale is None else scale._version)

    def serves(self, latent: Tensor, bits: int, grid: str, scale: Tensor | None) -> bool:
        """Whether a fresh quantization of ``latent`` would give this value and autograd node."""
        return (torch.is_grad_enabled() and latent is self.latent
                and latent._version == self.version and (bits, grid) == (self.bits, self.grid)
                and scale is self.scale
                and (scale is None or scale._version == self.scale_version))


class LoweredWeight(CachesItsWeight):
    """A trained weight as signed integer codes (int8 container), a step and the bit width.

    ``forward`` rebuilds the float weight with the same formula the fake quantizer used, so the
    lowered model's weights equal the trained model's bit for bit.
    """

    def __init__(self, codes: Tensor, step: Tensor, offset: float, bits: int, kind: str,
                 names: tuple[str, ...]) -> None:
        super().__init__()
        self.register_buffer("codes", codes.to(torch.int8))
        self.register_buffer("step", step.detach().clone())
        self.register_buffer("offset", torch.tensor(float(offset), dtype=step.dtype))
        self.register_buffer("bits", torch.tensor(int(bits), dtype=torch.int64))
        self.kind = kind
        self.names = tuple(names)
        self.group = self.names[0]
        self.cache: WeightCache | None = None  # as WeightFakeQuant's

    @classmethod
    def from_fake_quant(cls, quantizer: WeightFakeQuant, latent: Tensor) -> "LoweredWeight":
        bits, latent = quantizer.num_bits, latent.detach()
        if bits > 8:
            raise ValueError(f"{quantizer.names[0]}: {bits}-bit codes do not fit an int8 container")
        scale = quantizer.scale_of(latent)
        signed = quant.signed_codes(quant.roundclamp_codes(latent, bits, scale, quantizer.grid),
                                    bits)
        lowered = cls(signed, quant.grid_step(scale, bits, quantizer.grid),
                      quant.grid_offset(quantizer.grid), bits, quantizer.kind, quantizer.names)
        lowered.group = quantizer.group
        return lowered

    @property
    def num_bits(self) -> int:
        return int(self.bits)

    def forward(self, _latent: Tensor | None = None) -> Tensor:
        if serves_from_cache(self):
            return from_cache(self, (self.codes, self.step, self.offset), (), self._dequantized)
        return self._dequantized()

    def _dequantized(self) -> Tensor:
        # The offset stays a tensor (0 or 0.5, exact either way), so torch.export can trace the
        # forward; the int8 -> float copy is ours to overwrite.
        return quant.dequantize(self.codes.to(self.step.dtype), self.step, self.offset,
                                inplace=True)

    def extra_repr(self) -> str:
        return f"bits={self.num_bits}, shape={tuple(self.codes.shape)}, kind={self.kind}"


class ActivationFakeQuant(nn.Module):
    """Uniform n-bit fake quantization of a layer input with a learnable clip (PACT-style).

    The clip and the sign mode are set from the first tensor seen (one calibration batch); a
    signed range is used when that tensor has negative values. Gradients reach the clip through
    the clamp and the step (straight-through rounding), as in PACT/LSQ.
    """

    def __init__(self, bits: int) -> None:
        super().__init__()
        if not 2 <= bits <= 16:
            raise ValueError(f"activation bits must be in 2..16, got {bits}")
        self.register_buffer("bits", torch.tensor(int(bits), dtype=torch.int64))
        self.register_buffer("signed", torch.tensor(False))
        self.register_buffer("initialized", torch.tensor(False))
        self.clip = nn.Parameter(torch.tensor(1.0))
        # The buffers as Python values, for torch.compile (see ``settings``).
        self.static_settings = (int(bits), False, False)

    @property
    def settings(self) -> tuple[int, bool, bool]:
        """``(bits, signed, initialized)``. Reading a tensor's value breaks a compiled graph, so
        a compiled forward reads their Python copy, ``static_settings``, which every eager read,
        the calibration and ``load_state_dict`` keep with the buffers."""
        if torch.compiler.is_compiling():
            return self.__dict__["static_settings"]
        settings = (int(self.bits), bool(self.signed), bool(self.initialized))
        self.__dict__["static_settings"] = settings
        return settings

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.__dict__["static_settings"] = (int(self.bits), bool(self.signed),
                                            bool(self.initialized))

    # Once per quantizer, from the first input: a compiled forward runs it eagerly.
    @torch.compiler.disable
    @torch.no_grad()
    def _calibrate(self, x: Tensor) -> None:
        self.clip.fill_(float(x.detach().abs().amax().clamp_min(1e-6)))
        signed = bool((x.detach() < 0).any())
        self.signed.fill_(signed)
        self.initialized.fill_(True)
        self.__dict__["static_settings"] = (self.__dict__["static_settings"][0], signed, True)

    def forward(self, x: Tensor) -> Tensor:
        if not self.settings[2]:
            self._calibrate(x)
        low, high, step = self.grid()
        clipped = torch.minimum(torch.maximum(x, low), high)
        return _RoundSTE.apply(clipped / step) * step

    def grid(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(low, high, step)``: inputs are clamped to [low, high] and rounded to multiples of
        step (the clip is learned, so these follow it)."""
        (bits, signed, _), high = self.settings, self.clip.abs().clamp_min(1e-8)
        levels = float(2 ** (bits - 1) - 1) if signed else float(2**bits - 1)
        low = -high if signed else torch.zeros_like(high)
        return low, high, high / levels

    def extra_repr(self) -> str:
        return f"bits={int(self.bits)}, signed={bool(self.signed)}"


class LoweredActivation(nn.Module):
    """A trained activation quantizer, frozen for deployment: inputs are clamped to
    [``low``, ``high``] and rounded to multiples of ``step`` (buffers, from the trained clip).

    The output equals the ``ActivationFakeQuant`` it came from bit for bit. ``bits`` and
    ``signed`` are plain attributes, not buffers, so ``torch.export`` and the ONNX exporter trace
    the forward without reading tensor values.
    """

    def __init__(self, low: Tensor, high: Tensor, step: Tensor, bits: int, signed: bool) -> None:
        super().__init__()
        self.register_buffer("low", low.detach().clone())
        self.register_buffer("high", high.detach().clone())
        self.register_buffer("step", step.detach().clone())
        self.bits = int(bits)
        self.signed = bool(signed)

    @classmethod
    def from_fake_quant(cls, quantizer: ActivationFakeQuant) -> "LoweredActivation":
        with torch.no_grad():
            low, high, step = quantizer.grid()
        return cls(low, high, step, int(quantizer.bits), bool(quantizer.signed))

    def forward(self, x: Tensor) -> Tensor:
        return rounded_to_grid(x, self.low, self.high, self.step)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}"


def rounded_to_grid(x: Tensor, low: Tensor, high: Tensor, step: Tensor) -> Tensor:
    """``x`` clamped to [low, high] and rounded to the nearest multiple of ``step`` (ties to
    even), computed as ActivationFakeQuant computes it, so the values are the same bits."""
    return torch.round(torch.minimum(torch.maximum(x, low), high) / step) * step


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: D102
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: D102
        return grad
