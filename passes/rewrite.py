"""Rewrite pass: put an MSQ weight quantizer on every discovered weight.

Reads: a ``Discovery`` (its ``fixed_width`` names the weights whose quantizers are not
prunable, and start at ``first_last_bits`` when it is set: the discover pass decides which
layers ``first_last`` means) and the config.
Changes: the given model in place (``prepare`` hands it a private copy, so the user's model is
never touched and a failure leaves nothing half-rewritten).
Each owner module of a quantized tensor gets its class swapped for ``quantized_class(...)`` and a
``<name>_quantizer`` child; tied uses of one tensor share one ``WeightFakeQuant``, and a module
registered under several names is rewritten once. With ``act_bits`` set, each owner module also
gets an ``input_quantizer``. With ``recompute_quantized_weights``, the model gets the forward
hooks of ``install_model_recompute``.

``unrewritable`` (changes nothing; ``prepare`` runs it first) lists the weights an owner of which
cannot carry a quantizer, with the reason: a container (``nn.Sequential``/``ModuleList``/
``ModuleDict``) owning a Parameter directly (a quantizer child would run as one of its layers),
an attribute its class defines as a property, a TorchScript module, a name clash with an existing
child. A tied tensor is one decision: if any of its owners is refused, the tensor stays float
under all its names (quantizing it for some readers only would train against a mix of float and
quantized reads). ``rewrite`` refuses to start (``RewriteError``, nothing changed) when given
such a weight.
"""
from __future__ import annotations

import torch
from torch import nn

from msq_fx.config import MSQConfig, QuantizationConfig
from msq_fx.modules import ActivationFakeQuant, WeightFakeQuant
from msq_fx.owners import INPUT_QUANTIZER, QUANTIZER_SUFFIX, is_quantized_owner, quantized_class
from msq_fx.recompute import install_model_recompute, remove_model_recompute

from .discover import Discovery, FloatWeight, WeightTarget

__all__ = ["RewriteError", "unrewritable", "rewrite", "unrewrite"]

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)

_Owner = tuple[str, nn.Module, list[tuple[str, WeightTarget]]]


class RewriteError(RuntimeError):
    """A module cannot carry a quantized weight; the message names it."""


def unrewritable(model: nn.Module, targets: list[WeightTarget],
                 config: MSQConfig) -> list[FloatWeight]:
    """The targets an owner of which cannot carry a quantizer, as float leftovers with the
    reason."""
    refused: dict[str, FloatWeight] = {}
    for owner_name, owner, attrs in _owners(model, targets):
        reasons = _refusals(owner_name, owner, [a for a, _ in attrs], config)
        for attr, target in attrs:
            reason = reasons.get(attr)
            if reason is None or target.name in refused:
                continue
            fqn = f"{owner_name}.{attr}" if owner_name else attr
            if fqn != target.name:
                reason = f"tied to {fqn}, and {reason}"
            refused[target.name] = FloatWeight(target.name, target.kind, reason)
    return [refused[t.name] for t in targets if t.name in refused]


def rewrite(model: nn.Module, discovery: Discovery, config: MSQConfig,
            groups: dict[str, str] | None = None) -> None:
    """Install quantizers for ``discovery.targets`` on ``model`` (in place).

    ``groups`` maps a weight's name to its precision group (default: every weight its own group).
    Raises ``RewriteError`` before changing anything if an owner cannot carry a quantizer
    (``prepare`` moves such weights to float first, with ``unrewritable``).
    """
    refused = unrewritable(model, discovery.targets, config)
    if refused:
        raise RewriteError("; ".join(f"{f.name}: {f.reason}" for f in refused))
    quantization = config.quantization
    quantizers = {t.name: WeightFakeQuant(_start_bits(t.name, discovery, quantization), t.kind,
                                          t.fqns, quantization.grid,
                                          prunable=t.name not in discovery.fixed_width,
                                          recompute=quantization.recompute_quantized_weights,
                                          scale_mode=quantization.scale,
                                          binary_gradient=quantization.binary_gradient,
                                          binary_gradient_gain=(
                                              quantization.binary_gradient_gain),
                                          latent=_latent(model, t.name))
                  for t in discovery.targets}
    for name, quantizer in quantizers.items():
        quantizer.group = (groups or {}).get(name, name)
    for _, owner, attrs in _owners(model, discovery.targets):
        owner.__class__ = quantized_class(type(owner), tuple(a for a, _ in attrs))
        for attr, target in attrs:
            owner.add_module(attr + QUANTIZER_SUFFIX, quantizers[target.name])
        # An embedding's input is token ids, not an activation (it owns a weight tied to a
        # head, whose own input quantizer covers the activation).
        if config.quantization.act_bits is not None \
                and not isinstance(owner, (nn.Embedding, nn.EmbeddingBag)):
            owner.add_module(INPUT_QUANTIZER, ActivationFakeQuant(config.quantization.act_bits))
    if config.quantization.recompute_quantized_weights and quantizers:
        install_model_recompute(model)


def _start_bits(name: str, discovery: Discovery, quantization: QuantizationConfig) -> int:
    """The width ``name`` starts at: ``first_last_bits`` for a layer the policy fixes, when set."""
    if name in discovery.fixed_width and quantization.first_last_bits is not None:
        return quantization.first_last_bits
    return quantization.init_bits


def unrewrite(model: nn.Module) -> None:
    """Undo ``rewrite`` on ``model`` in place: the owners get their classes back and lose their
    quantizer (and input quantizer) children, and the model its recompute hooks.

    For ``prepare(..., inplace=True)``, which must not leave the user's model half-rewritten when
    a later step fails. The latent Parameters were never moved, so nothing else needs restoring.
    """
    for owner in [m for m in model.modules() if is_quantized_owner(m)]:
        for attr in owner._msq_names:
            owner._modules.pop(attr + QUANTIZER_SUFFIX, None)
        if isinstance(owner._modules.get(INPUT_QUANTIZER), ActivationFakeQuant):
            del owner._modules[INPUT_QUANTIZER]
        owner.__class__ = owner._msq_base
    remove_model_recompute(model)


def _owners(model: nn.Module, targets: list[WeightTarget]) -> list[_Owner]:
    """Each owner module once (by identity, under its first name) with its (attr, target) pairs.

    A module registered under two names (``self.b = self.a``) is one owner: swapping its class
    twice would nest the quantized class in itself.
    """
    owners: dict[int, _Owner] = {}
    for target in targets:
        for fqn in target.fqns:
            owner_name, _, attr = fqn.rpartition(".")
            owner = model.get_submodule(owner_name)
            _, _, attrs = owners.setdefault(id(owner), (owner_name, owner, []))
            if all(a != attr for a, _ in attrs):
                attrs.append((attr, target))
    return list(owners.values())


def _refusals(owner_name: str, owner: nn.Module, attrs: list[str],
              config: MSQConfig) -> dict[str, str]:
    """attr -> why ``owner`` cannot route reads of it through a quantizer (empty: it can)."""
    where = f"its owner '{owner_name or '<root>'}' ({type(owner).__name__})"
    reason = None
    if hasattr(type(owner), "_msq_names"):
        reason = f"{where} already carries MSQ quantizers"
    elif isinstance(owner, _CONTAINERS):
        reason = (f"{where} is a container (nn.Sequential/ModuleList/ModuleDict) that owns the "
                  f"Parameter directly; a quantizer child would run as one of its layers")
    elif isinstance(owner, torch.jit.ScriptModule):
        reason = f"{where} is a TorchScript module, whose class cannot be swapped"
    elif config.quantization.act_bits is not None and INPUT_QUANTIZER in owner._modules:
        reason = f"{where} already has a child named '{INPUT_QUANTIZER}'"
    if reason is not None:
        return dict.fromkeys(attrs, reason)
    reasons = {}
    for attr in attrs:
        if isinstance(getattr(type(owner), attr, None), property):
            reasons[attr] = (f"'{attr}' is a property of the class of {where}, so reads of it "
                             f"cannot be routed through a quantizer")
        elif attr + QUANTIZER_SUFFIX in owner._modules:
            reasons[attr] = f"{where} already has a child named '{attr + QUANTIZER_SUFFIX}'"
    return reasons


def _latent(model: nn.Module, name: str) -> torch.Tensor | None:
    """The Parameter ``name`` of ``model`` (a learned scale is initialised from it)."""
    try:
        return model.get_parameter(name)
    except AttributeError:
        return None
