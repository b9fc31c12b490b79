"""What ``prepare`` records on a prepared model besides its modules, under one attribute.

A prepared model carries a :class:`PreparedState` at ``model._msq_state``: the config it was
prepared with (which the controller checks and ``save`` writes), the weights left in float and
the notes (which ``report`` lists), and the grouping pass's sensitivity graph. ``convert`` copies
it with the model. Models prepared by older versions kept the four parts under attributes of
their own; :func:`prepared_state` reads those too.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

__all__ = ["PreparedState", "prepared_state", "attach_state", "detach_state", "STATE_ATTR"]

#: The attribute of a prepared (or converted) model that holds its PreparedState.
STATE_ATTR = "_msq_state"

# Where models prepared before the state had one attribute keep each of its fields.
_SEPARATE_ATTRS = {"config": "_msq_config", "float_weights": "_msq_float_weights",
                   "notes": "_msq_notes", "sensitivity_graph": "_msq_sensitivity_graph"}


@dataclass
class PreparedState:
    """What ``prepare`` found and decided, beyond the modules it put in the model.

    Attributes:
        config: ``MSQConfig.to_dict()`` of the config the model was prepared with (plain data,
            as a saved file holds it); None for a model that did not record one.
        float_weights: the conv / linear / attention weights left in float, each with ``name``,
            ``kind`` and ``reason``.
        notes: what prepare could not check, as sentences.
        sensitivity_graph: the networkx graph of the grouping pass (passes/group.py).
    """

    config: dict[str, Any] | None = None
    float_weights: list = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    sensitivity_graph: Any = None


def prepared_state(model: nn.Module) -> PreparedState | None:
    """The PreparedState of ``model``, or None for a model ``prepare`` did not return."""
    state = getattr(model, STATE_ATTR, None)
    if state is not None:
        return state
    found = {name: getattr(model, attr) for name, attr in _SEPARATE_ATTRS.items()
             if hasattr(model, attr)}
    return PreparedState(**found) if found else None


def attach_state(model: nn.Module, state: PreparedState) -> None:
    """Record ``state`` on ``model``."""
    setattr(model, STATE_ATTR, state)


def detach_state(model: nn.Module) -> None:
    """Remove what :func:`attach_state` recorded (nothing happens if there is none)."""
    model.__dict__.pop(STATE_ATTR, None)
