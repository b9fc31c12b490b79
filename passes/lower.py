"""Lower pass: replace each trained weight by its integer codes (the convert step).

Reads: a prepared model (owners carrying ``WeightFakeQuant`` quantizers and latent Parameters).
Changes: the given model in place (``convert`` hands it a private copy). Every quantizer becomes a
``LoweredWeight`` holding int8 codes, the step and the bit width, computed with the very formula
the fake quantizer used, and the latent float Parameter is removed from its owner. Tied uses of
one tensor keep sharing one lowered module. Each calibrated activation quantizer becomes a
``LoweredActivation`` (its trained clip frozen into bounds and a step, the same outputs); one that
never saw an input stays as it is. Biases and norms stay as they are. With
``kernels="packed"`` each weight becomes a ``PackedWeight`` instead (msq_fx.packed_weights: the
same codes held at 1, 2, 4 or 8 bits each, the same weights), packed as soon as it is lowered.
"""
from __future__ import annotations

from typing import Iterable

from torch import nn

from msq_fx.modules import ActivationFakeQuant, LoweredActivation, LoweredWeight, WeightFakeQuant
from msq_fx.packed_weights import PackedWeight, check_kernels
from msq_fx.owners import INPUT_QUANTIZER, QUANTIZER_SUFFIX, is_quantized_owner
from msq_fx.recompute import remove_model_recompute

__all__ = ["LowerError", "lower"]


class LowerError(RuntimeError):
    """A quantized weight cannot be lowered; the message names it."""


def lower(model: nn.Module, one_at_a_time: bool = False, kernels: str = "dequantize",
          keep_float: bool | Iterable[str] = False) -> None:
    """Lower every ``WeightFakeQuant`` in ``model`` to a ``LoweredWeight`` (in place).

    Every weight is first checked to be lowerable (LowerError names the first that is not, with
    ``model`` unchanged). By default all are then lowered before any is swapped in, so nothing
    that fails midway leaves the model partly lowered; that holds every weight's codes beside
    every latent. ``one_at_a_time`` swaps each weight in, and drops its latent, as soon as its
    codes exist: the peak is then the model plus one weight's float temporaries, for a caller
    that owns the model and would discard it if something (running out of memory) failed
    midway. ``kernels`` and ``keep_float`` as for ``msq_fx.packed_weights.use_kernels``.
    """
    kept = check_kernels(kernels, keep_float)
    owners = [(name, m) for name, m in model.named_modules(remove_duplicate=False)
              if is_quantized_owner(m)]
    uses = _weight_uses(owners)
    for fqn, owner, attr, quantizer in (found[0] for found in uses.values()):
        _check_lowerable(fqn, owner, attr, quantizer)
    activations = _lowered_activations(owners)
    lowered = ((found, _lower_one(*found[0], kernels=kernels, kept=kept))
               for found in uses.values())
    # Lazily, each weight is lowered just before it is swapped in; as a list, all are first.
    for found, weight in (lowered if one_at_a_time else list(lowered)):
        _swap_in(found, weight)
    for _, owner in owners:
        if id(owner._modules.get(INPUT_QUANTIZER)) in activations:
            owner._modules[INPUT_QUANTIZER] = activations[id(owner._modules[INPUT_QUANTIZER])]
    remove_model_recompute(model)


_Use = tuple[str, nn.Module, str, WeightFakeQuant]  # weight FQN, owner, attribute, quantizer


def _weight_uses(owners: list[tuple[str, nn.Module]]) -> dict[int, list[_Use]]:
    """Each WeightFakeQuant's uses (tied weights: several), by the quantizer's id, in order."""
    uses: dict[int, list[_Use]] = {}
    for owner_name, owner in owners:
        for attr in owner._msq_names:
            quantizer = owner._modules[attr + QUANTIZER_SUFFIX]
            if isinstance(quantizer, WeightFakeQuant):
                fqn = f"{owner_name}.{attr}" if owner_name else attr
                uses.setdefault(id(quantizer), []).append((fqn, owner, attr, quantizer))
    return uses


def _swap_in(uses: list[_Use], lowered: LoweredWeight) -> None:
    for _, owner, attr, _ in uses:
        owner._modules[attr + QUANTIZER_SUFFIX] = lowered
        owner._parameters.pop(attr, None)


def _lowered_activations(owners: list[tuple[str, nn.Module]]) -> dict[int, LoweredActivation]:
    """A LoweredActivation for each calibrated input quantizer of ``owners``, by the id of the
    quantizer it replaces (built before anything is swapped)."""
    found = {}
    for _, owner in owners:
        quantizer = owner._modules.get(INPUT_QUANTIZER)
        if isinstance(quantizer, ActivationFakeQuant) and bool(quantizer.initialized):
            found.setdefault(id(quantizer), LoweredActivation.from_fake_quant(quantizer))
    return found


def _check_lowerable(fqn: str, owner: nn.Module, attr: str, quantizer: WeightFakeQuant) -> None:
    if owner._parameters.get(attr) is None:
        raise LowerError(f"{fqn}: the latent weight is missing from its module; was the model "
                         f"modified after prepare()?")
    if quantizer.num_bits > 8:
        raise LowerError(f"{fqn}: {quantizer.num_bits}-bit codes do not fit an int8 container "
                         f"(was its bit width changed after prepare()? MSQ starts at 8 or fewer)")


def _lower_one(fqn: str, owner: nn.Module, attr: str, quantizer: WeightFakeQuant, *,
               kernels: str, kept: frozenset[str]) -> LoweredWeight:
    try:
        lowered = LoweredWeight.from_fake_quant(quantizer, owner._parameters[attr])
    except ValueError as error:
        raise LowerError(f"{fqn}: {error}") from error
    if kernels == "packed":
        return PackedWeight.from_lowered(lowered, keep_float=lowered.kind in kept)
    return lowered
