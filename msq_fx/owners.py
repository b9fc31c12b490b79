"""The owner-class swap: a module whose weight is quantized keeps it, and reads it quantized.

A quantized weight stays where the user's model keeps it: the latent float Parameter remains in
its owner's ``_parameters`` under its own name (so ``state_dict`` keys, ``named_parameters`` and
optimizers are unchanged), and the owner's class is swapped for a subclass whose attribute of that
name is a property returning the quantized tensor (:func:`quantized_class`). Every read of
``owner.weight`` (the owner's own forward, a parent's ``F.linear(x, self.qkv.weight)``,
``nn.MultiheadAttention``'s fused kernels, a tied use elsewhere) therefore sees the quantized
weight.

The quantizer lives beside the Parameter as the child module ``<name>_quantizer``; tied weights
share one quantizer instance, so they share one precision decision. An owner of quantized inputs
has an ``input_quantizer`` child its forward applies first. :func:`iter_quantized_weights` lists
each quantized tensor of a model once.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Iterator

from torch import Tensor, nn

from .recompute import recomputed_quantized_weights, recomputes_weights

__all__ = ["QUANTIZER_SUFFIX", "INPUT_QUANTIZER", "quantized_class", "is_quantized_owner",
           "QuantizedWeight", "iter_quantized_weights"]

#: An owner's quantizer of its attribute ``<name>`` is its child ``<name>_quantizer``.
QUANTIZER_SUFFIX = "_quantizer"
#: The child of an owner that quantizes its inputs (with ``quantization.act_bits``).
INPUT_QUANTIZER = "input_quantizer"


def _quantized_attribute(name: str) -> property:
    quantizer_name = name + QUANTIZER_SUFFIX

    def quantized(self: nn.Module) -> Tensor:
        return self._modules[quantizer_name](self._parameters.get(name))

    return property(quantized,
                    doc=f"`{name}` as the model sees it: quantized by `{quantizer_name}`.")


def _forward_with_input_quantizer(self: nn.Module, *args, **kwargs):
    input_quantizer = self._modules.get(INPUT_QUANTIZER)
    if input_quantizer is not None:
        # Bind by name so keyword inputs (``value=``, ``input=``) are quantized like positional
        # ones; attention's query/key/value are often one tensor: quantize each distinct one once.
        bound = self._msq_forward_signature.bind(self, *args, **kwargs)
        names = list(bound.arguments)[1:]
        inputs = names[:3] if isinstance(self, nn.MultiheadAttention) else names[:1]
        seen: dict[int, Tensor] = {}
        for name in inputs:
            value = bound.arguments[name]
            if isinstance(value, Tensor) and value.is_floating_point():  # not ids or masks
                bound.arguments[name] = seen.setdefault(id(value), input_quantizer(value))
        args, kwargs = bound.args[1:], bound.kwargs
    if recomputes_weights(self._modules[name + QUANTIZER_SUFFIX] for name in self._msq_names):
        with recomputed_quantized_weights():
            return self._msq_base.forward(self, *args, **kwargs)
    return self._msq_base.forward(self, *args, **kwargs)


def _reduce_quantized(self: nn.Module, protocol):
    return (_new_quantized_instance, (self._msq_base, self._msq_names), self.__getstate__())


def _new_quantized_instance(base: type, names: tuple[str, ...]) -> nn.Module:
    cls = quantized_class(base, names)
    return cls.__new__(cls)


@functools.lru_cache(maxsize=None)
def quantized_class(base: type, names: tuple[str, ...]) -> type:
    """The subclass of ``base`` whose attributes ``names`` read through their quantizers.

    Built once per (class, names) and pickled by reference to ``base``, so prepared and converted
    models pickle, deepcopy and ``torch.save`` like the original.
    """
    attrs = {name: _quantized_attribute(name) for name in names}
    attrs.update(
        _msq_base=base,
        _msq_names=names,
        # Bound once here: a cached lookup inside the forward is one torch.compile warns about.
        _msq_forward_signature=inspect.signature(base.forward),
        forward=_forward_with_input_quantizer,
        __reduce_ex__=_reduce_quantized,
        __module__=__name__,
        __qualname__=f"MSQ{base.__qualname__}",
    )
    return type(f"MSQ{base.__name__}", (base,), attrs)


def is_quantized_owner(module: nn.Module) -> bool:
    return hasattr(type(module), "_msq_names")


@dataclass(frozen=True)
class QuantizedWeight:
    """One quantized tensor as found in a model: its quantizer and, before lowering, its latent."""

    name: str
    owner: nn.Module
    attr: str
    quantizer: nn.Module
    latent: nn.Parameter | None


def iter_quantized_weights(model: nn.Module) -> Iterator[QuantizedWeight]:
    """Each quantized tensor once (tied uses share a quantizer and appear once), in module order."""
    seen: set[int] = set()
    for owner_name, owner in model.named_modules():
        if not is_quantized_owner(owner):
            continue
        for attr in owner._msq_names:
            quantizer = owner._modules[attr + QUANTIZER_SUFFIX]
            if id(quantizer) in seen:
                continue
            seen.add(id(quantizer))
            name = f"{owner_name}.{attr}" if owner_name else attr
            yield QuantizedWeight(name, owner, attr, quantizer, owner._parameters.get(attr))
