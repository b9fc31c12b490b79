"""Lower pass: replace each trained weight by its integer codes (the convert step).

Reads: a prepared model (owners carrying ``WeightFakeQuant`` quantizers and latent Parameters).
Changes: the given model in place (``convert`` hands it a private copy). Every quantizer becomes a
``LoweredWeight`` holding int8 codes, the step and the bit width, computed with the very formula
the fake quantizer used, and the latent float Parameter is removed from its owner. Tied uses of
one tensor keep sharing one lowered module. Activation quantizers, biases and norms stay as they are.
"""
from __future__ import annotations

from torch import nn

from msq_fx.modules import (QUANTIZER_SUFFIX, LoweredWeight, WeightFakeQuant,
                            is_quantized_owner, remove_model_recompute)


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
    for owner_name, owner in owners:
        for attr in owner._msq_names:
            quantizer = owner._modules[attr + QUANTIZER_SUFFIX]
            if id(quantizer) in lowered:
                owner._modules[attr + QUANTIZER_SUFFIX] = lowered[id(quantizer)]
                owner._parameters.pop(attr, None)
    remove_model_recompute(model)


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
