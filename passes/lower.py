"""Lower pass: replace each trained weight by its integer codes (the convert step).

Reads: a prepared model (owners carrying ``WeightFakeQuant`` quantizers and latent Parameters).
Changes: the given model in place (``convert`` hands it a private copy). Every quantizer becomes a
``LoweredWeight`` holding int8 codes, the step and the bit width, computed with the very formula
the fake quantizer used, and the latent float Parameter is removed from its owner. Tied uses of
one tensor keep sharing one lowered module. Each calibrated activation quantizer becomes a
``LoweredActivation`` (its trained clip frozen into bounds and a step, the same outputs); one that
never saw an input stays as it is. Biases and norms stay as they are.
"""
from __future__ import annotations

from torch import nn

from msq_fx.modules import (INPUT_QUANTIZER, QUANTIZER_SUFFIX, ActivationFakeQuant,
                            LoweredActivation, LoweredWeight, WeightFakeQuant, is_quantized_owner,
                            remove_model_recompute)


class LowerError(RuntimeError):
    """A quantized weight cannot be lowered; the message names it."""


def lower(model: nn.Module) -> None:
    """Lower every ``WeightFakeQuant`` in ``model`` to a ``LoweredWeight`` (in place)."""
    lowered: dict[int, LoweredWeight] = {}
    owners = [(name, m) for name, m in model.named_modules(remove_duplicate=False)
              if is_quantized_owner(m)]
    for owner_name, owner in owners:
        for attr in owner._msq_names:
            quantizer = owner._modules[attr + QUANTIZER_SUFFIX]
            if not isinstance(quantizer, WeightFakeQuant):
                continue
            if id(quantizer) not in lowered:
                lowered[id(quantizer)] = _lower_one(owner_name, owner, attr, quantizer)
    activations = _lowered_activations(owners)
    for owner_name, owner in owners:
        for attr in owner._msq_names:
            quantizer = owner._modules[attr + QUANTIZER_SUFFIX]
            if id(quantizer) in lowered:
                owner._modules[attr + QUANTIZER_SUFFIX] = lowered[id(quantizer)]
                owner._parameters.pop(attr, None)
        if id(owner._modules.get(INPUT_QUANTIZER)) in activations:
            owner._modules[INPUT_QUANTIZER] = activations[id(owner._modules[INPUT_QUANTIZER])]
    remove_model_recompute(model)


def _lowered_activations(owners: list[tuple[str, nn.Module]]) -> dict[int, LoweredActivation]:
    """A LoweredActivation for each calibrated input quantizer of ``owners``, by the id of the
    quantizer it replaces (built before anything is swapped)."""
    found = {}
    for _, owner in owners:
        quantizer = owner._modules.get(INPUT_QUANTIZER)
        if isinstance(quantizer, ActivationFakeQuant) and bool(quantizer.initialized):
            found.setdefault(id(quantizer), LoweredActivation.from_fake_quant(quantizer))
    return found


def _lower_one(owner_name: str, owner: nn.Module, attr: str,
               quantizer: WeightFakeQuant) -> LoweredWeight:
    latent = owner._parameters.get(attr)
    fqn = f"{owner_name}.{attr}" if owner_name else attr
    if latent is None:
        raise LowerError(f"{fqn}: the latent weight is missing from its module; was the model "
                         f"modified after prepare()?")
    try:
        return LoweredWeight.from_fake_quant(quantizer, latent)
    except ValueError as error:
        raise LowerError(f"{fqn}: {error}") from error
