"""Rewrite pass: put an MSQ weight quantizer on every discovered weight.

Reads: a ``Discovery`` and the config. Changes: the given model in place (``prepare`` hands it a
private copy, so the user's model is never touched and a failure leaves nothing half-rewritten).
Each owner module of a quantized tensor gets its class swapped for ``quantized_class(...)`` and a
``<name>_quantizer`` child; tied uses of one tensor share one ``WeightFakeQuant``. With
``act_bits`` set, each owner module also gets an ``input_quantizer``.
"""
from __future__ import annotations

from torch import nn

from msq_fx.config import MSQConfig
from msq_fx.modules import (INPUT_QUANTIZER, QUANTIZER_SUFFIX, ActivationFakeQuant,
                            WeightFakeQuant, quantized_class)

from .discover import Discovery, WeightTarget


class RewriteError(RuntimeError):
    """A module cannot carry a quantized weight; the message names it."""


def rewrite(model: nn.Module, discovery: Discovery, config: MSQConfig,
            groups: dict[str, str] | None = None) -> None:
    """Install quantizers for ``discovery.targets`` on ``model`` (in place).

    ``groups`` maps a weight's name to its precision group (default: every weight its own group).
    """
    owners = _group_by_owner(discovery.targets)
    fixed = _fixed_width_targets(discovery.targets, config)
    quantizers = {t.name: WeightFakeQuant(config.init_bits, t.kind, t.fqns, config.grid,
                                          prunable=t.name not in fixed)
                  for t in discovery.targets}
    for name, quantizer in quantizers.items():
        quantizer.group = (groups or {}).get(name, name)
    for owner_name, attrs in owners.items():
        owner = model.get_submodule(owner_name)
        _check_owner(owner_name, owner, [a for a, _ in attrs])
    for owner_name, attrs in owners.items():
        owner = model.get_submodule(owner_name)
        owner.__class__ = quantized_class(type(owner), tuple(a for a, _ in attrs))
        for attr, target in attrs:
            owner.add_module(attr + QUANTIZER_SUFFIX, quantizers[target.name])
        if config.act_bits is not None:
            owner.add_module(INPUT_QUANTIZER, ActivationFakeQuant(config.act_bits))


def _group_by_owner(targets: list[WeightTarget]) -> dict[str, list[tuple[str, WeightTarget]]]:
    owners: dict[str, list[tuple[str, WeightTarget]]] = {}
    for target in targets:
        for fqn in target.fqns:
            owner_name, _, attr = fqn.rpartition(".")
            owners.setdefault(owner_name, []).append((attr, target))
    return owners


def _fixed_width_targets(targets: list[WeightTarget], config: MSQConfig) -> set[str]:
    if config.first_last != "fixed" or not targets:
        return set()
    return {targets[0].name, targets[-1].name}


def _check_owner(owner_name: str, owner: nn.Module, attrs: list[str]) -> None:
    where = f"module '{owner_name or '<root>'}' ({type(owner).__name__})"
    if hasattr(type(owner), "_msq_names"):
        raise RewriteError(f"{where} already carries MSQ quantizers")
    for attr in attrs:
        if isinstance(getattr(type(owner), attr, None), property):
            raise RewriteError(
                f"{where}: '{attr}' is a property of its class, so MSQ cannot route reads of it "
                f"through a quantizer. Exclude it with MSQConfig(exclude=(r'^{owner_name}\\.{attr}$',)).")
        if attr + QUANTIZER_SUFFIX in owner._modules:
            raise RewriteError(f"{where} already has a child named '{attr + QUANTIZER_SUFFIX}'")
    if INPUT_QUANTIZER in owner._modules:
        raise RewriteError(f"{where} already has a child named '{INPUT_QUANTIZER}'")
    if isinstance(owner, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        # A container iterates over its children, so an added quantizer child would run as a layer.
        raise RewriteError(f"{where} is a container that owns a weight directly; exclude it with "
                           f"MSQConfig(exclude=(r'^{owner_name}\\.',)).")
