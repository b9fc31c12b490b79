"""The inference weight cache: each quantized weight computed once while a block is open.

A fake-quant model quantizes every weight on every forward and a converted model dequantizes
its codes on every forward. Inside :func:`cached_quantized_weights` a quantizer that subclasses
:class:`CachesItsWeight` (``WeightFakeQuant``, ``LoweredWeight``) keeps the last weight it
computed with what it was computed from, and returns it again while that has not changed and
no gradient is needed.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, NamedTuple

import torch
from torch import Tensor, nn

from .owners import iter_quantized_weights

__all__ = ["cached_quantized_weights", "CachesItsWeight", "WeightCache", "serves_from_cache",
           "from_cache"]


class CachesItsWeight(nn.Module):
    """A module whose ``forward`` may serve its weight from ``cache`` (see
    ``cached_quantized_weights``). Copies and pickles leave the cache behind: it belongs to the
    block that set it, which clears only the modules it started on."""

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "cache": None}


class WeightCache(NamedTuple):
    """A weight computed once inside ``cached_quantized_weights``, and what it was computed from."""

    key: tuple | None
    value: Tensor | None
    # A caller that changed the returned tensor in place gets a fresh one next time.
    value_version: int | None = None
    # Held so that a source's memory cannot be freed and reused by another tensor at the same
    # address while the key still names that address.
    storages: tuple[torch.UntypedStorage, ...] = ()


def serves_from_cache(module: nn.Module, *sources: Tensor) -> bool:
    # ``cache`` is absent from modules pickled by older versions. A cached tensor has no graph:
    # under autograd only a fresh one carries gradients. A compiled graph must contain the
    # computation, not a tensor captured at trace time.
    return (module.__dict__.get("cache") is not None
            and not (torch.is_grad_enabled() and any(s.requires_grad for s in sources))
            and not torch.compiler.is_compiling())


def from_cache(module: nn.Module, sources: tuple[Tensor, ...], settings: tuple,
                compute: Callable[[], Tensor]) -> Tensor:
    """``module.cache``'s value if it was computed from ``sources`` as they are now and from
    ``settings``, else ``compute()``, stored as the new cache."""
    # The version counter moves with every in-place update (optimizer steps, load_state_dict),
    # and the address with a rebinding (``.data = ...``, ``.to()``). An in-place change through
    # ``.data`` (``w.data.add_(...)``) moves neither: ``.data`` has a counter of its own, so
    # such a change inside a block is not seen (the docstring says so). A tensor made under
    # inference mode cannot enter autograd outside it.
    key = tuple((s.data_ptr(), _version(s), tuple(s.shape), s.stride(), s.dtype, s.device)
                for s in sources) + settings + (torch.is_inference_mode_enabled(),)
    cache = module.cache
    if cache.key != key or _version(cache.value) != cache.value_version:
        with torch.no_grad():
            value = compute()
        cache = module.cache = WeightCache(key, value, _version(value),
                                            tuple(s.untyped_storage() for s in sources))
    return cache.value


def _version(tensor: Tensor) -> int | None:
    # Inference tensors keep no version counter; outside inference mode they cannot be changed
    # in place, and the inference-mode flag in the key separates the two worlds.
    return None if tensor.is_inference() else tensor._version


@contextlib.contextmanager
def cached_quantized_weights(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, each quantized weight of ``model`` is computed once and reused by every forward.

    A fake-quant model otherwise quantizes every weight on every forward (several weight-sized
    passes each), and a converted model dequantizes its codes on every forward; at small batches
    on a large model that dominates evaluation. The cache holds one float copy per weight until
    the block ends, and is used only where no gradient is needed (``torch.no_grad()``,
    ``torch.inference_mode()``, frozen latents): a training step inside the block quantizes
    afresh and trains as usual. A value is recomputed when what it came from changes (an
    in-place update of the latent, its scale or the codes, a new tensor, a prune of the width);
    the one change it cannot see is one made through ``.data`` (``w.data.add_(...)``, which
    torch does not count as a change of ``w``): change weights that way outside the block, or
    with ``torch.no_grad(): w.add_(...)``. Nested blocks share the outer block's cache. Yields
    ``model``.
    """
    started = []
    try:
        for entry in iter_quantized_weights(model):
            quantizer = entry.quantizer
            if isinstance(quantizer, CachesItsWeight) and quantizer.__dict__.get("cache") is None:
                quantizer.cache = WeightCache(None, None)
                started.append(quantizer)
        yield model
    finally:
        for quantizer in started:
            quantizer.cache = None
