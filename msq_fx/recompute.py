"""Quantized weights recomputed in the backward pass instead of saved.

A linear or conv saves its (quantized) weight to compute the input gradient: one more
weight-sized tensor per layer, alive from the forward to the backward, which on large models is
a third of a training step's memory. The quantizer's autograd node keeps the recipe of its
output (``quant.Recipe``); inside :func:`recomputed_quantized_weights` an op that saves that
output (or a view or cast of it) saves the recipe instead, and the backward quantizes again,
which gives the same bits since the latent has not changed (checked).

An owner's forward enters these hooks around its own uses (msq_fx.owners);
:func:`install_model_recompute` enters them around the whole model's forward, for a parent that
reads a child's weight functionally. :func:`displaced` keeps the sum of a quantized weight and a
constant offset (the finite-difference Hessian's displaced weights) recomputable too.

Small weights are quantized together. Between two convolutions a quantizer's dozen small ops run
with cold caches, and on a CPU each call then costs about ten times what it costs in a row with
others (ResNet-20: about 0.3 ms instead of 0.03 ms per weight, 1-3 % of a training step at
batch 128). So the model's hooks quantize every weight of at most
:data:`BATCHED_MAX_ELEMENTS` elements (up to :data:`BATCHED_MAX_BYTES` together) when the
forward starts, and each quantizer's call in the forward returns its tensor
(``WeightFakeQuant.prefetch``); in the backward pass the first recompute of such a weight
recomputes all of them from the same forward (:class:`_BackwardBatch`), and each is dropped when
its last saved use has been unpacked. Same functions, same inputs: the same bits, as one at a
time.
"""
from __future__ import annotations

import functools
from typing import Iterable, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from . import quant
from .quant import QUANTIZER_NODES, Recipe

__all__ = ["recomputed_quantized_weights", "install_model_recompute", "remove_model_recompute",
           "recomputes_weights", "displaced", "BATCHED_MAX_ELEMENTS", "BATCHED_MAX_BYTES"]

#: Weights of at most this many elements are quantized together at the start of a forward and
#: recomputed together in the backward pass (see the module docstring); larger ones, whose own
#: arithmetic outweighs the cost of a call, one at a time where they are used.
BATCHED_MAX_ELEMENTS = 2**18
#: At most this many bytes of such weights are held together, in the forward and in the backward.
BATCHED_MAX_BYTES = 16 * 2**20


def _offset(recipe: Recipe) -> Tensor:
    return recipe.offsets[recipe.offset_index]


def _stale(recipe: Recipe) -> str | None:
    """Why recomputing ``recipe`` would not give the forward's tensor, or None."""
    if recipe.latent._version != recipe.version:
        return (f"its latent weight (shape {tuple(recipe.latent.shape)}) was modified in place "
                f"after the forward pass (version {recipe.version} -> {recipe.latent._version})")
    if recipe.scale_version is not None and recipe.scale._version != recipe.scale_version:
        return "its learned scale was modified in place after the forward pass"
    if recipe.offsets is not None and _offset(recipe)._version != recipe.offset_version:
        return "the offset added to it was modified in place after the forward pass"
    return None


class _Displaced(torch.autograd.Function):
    """``quantized + offset`` (offset constant), keeping the recipe of the sum on its node."""

    @staticmethod
    def forward(ctx, quantized: Tensor, offset: Tensor, recipe: Recipe) -> Tensor:  # noqa: D102
        ctx.recipe = recipe
        return quantized + offset

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        return grad, None, None


def displaced(quantized: Tensor, offsets: Sequence[Tensor], index: int) -> Tensor:
    """``quantized + offsets[index]``; the sum of a fake_quantize output stays recomputable.

    The recipe keeps ``offsets`` and ``index``, not the offset, so a sequence that makes its
    items on demand is indexed again in the backward pass instead of held until then.
    """
    offset = offsets[index]
    node = quantized.grad_fn
    recipe = getattr(node, "recipe", None) if isinstance(node, QUANTIZER_NODES) else None
    if recipe is None or recipe.offsets is not None:
        return quantized + offset
    recipe = recipe._replace(offsets=offsets, offset_index=index, offset_version=offset._version)
    return _Displaced.apply(quantized, offset, recipe)


class _Recomputed(NamedTuple):
    """What a consumer saves instead of a quantized weight: the recipe, and the view it saved."""

    node: object
    size: torch.Size
    stride: tuple[int, ...]
    storage_offset: int
    cast: tuple[torch.dtype, torch.device] | None = None  # the saved tensor is this copy of it
    batch: "_BackwardBatch | None" = None  # recomputed with the other small weights of the forward
    slot: int = -1  # its node's index in ``batch``


def _bytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class _BackwardBatch:
    """The small quantized weights one forward saved, recomputed together when the backward
    pass first needs one of them (see the module docstring).

    Holds the quantizers' nodes (which the saved entries hold anyway) and the recomputed values
    until their saved uses are unpacked; the entries hold the batch, never the other way round,
    so the batch goes with the graph.
    """

    def __init__(self) -> None:
        self.nodes: list = []
        self.slots: dict[int, int] = {}  # id(node) -> index in nodes
        self.uses: list[int] = []  # saved entries per node
        self.values: dict[int, Tensor] = {}
        self.unused: dict[int, int] = {}  # entries per node not unpacked since its recompute
        self.bytes = 0

    def enrol(self, packed: _Recomputed) -> _Recomputed:
        """``packed`` as a member of the batch, or as it is if it is not batched."""
        recipe = packed.node.recipe
        if packed.cast is not None or recipe.offsets is not None:
            return packed
        slot = self.slots.get(id(packed.node))
        if slot is None:
            size = _bytes(recipe.latent)
            if (recipe.latent.numel() > BATCHED_MAX_ELEMENTS
                    or self.bytes + size > BATCHED_MAX_BYTES):
                return packed
            slot = self.slots[id(packed.node)] = len(self.nodes)
            self.nodes.append(packed.node)
            self.uses.append(0)
            self.bytes += size
        self.uses[slot] += 1
        return packed._replace(batch=self, slot=slot)

    def take(self, slot: int) -> Tensor | None:
        """The recomputed weight of ``slot`` (recomputing every missing one first), or None."""
        if slot not in self.values:
            self._recompute_missing()
        value = self.values.get(slot)
        if value is not None:
            self.unused[slot] -= 1
            if self.unused[slot] <= 0:
                del self.values[slot]
        return value

    def _recompute_missing(self) -> None:
        for slot, node in enumerate(self.nodes):
            recipe = node.recipe
            if slot in self.values or _stale(recipe) is not None:
                continue  # a stale one raises where it is unpacked
            self.values[slot] = _quantized(recipe)
            self.unused[slot] = self.uses[slot]


_RECOMPUTABLE = QUANTIZER_NODES + (_Displaced._backward_cls,)


# Views that start where their input starts and keep every element: a cast of one (autocast
# casting ``weight.t()`` for a matmul) keeps its strides, so it lays the elements out in the
# quantized weight's own storage order.
_WHOLE_VIEWS = frozenset({"TBackward0", "TransposeBackward0", "PermuteBackward0",
                          "ViewBackward0", "UnsqueezeBackward0", "SqueezeBackward0",
                          "SqueezeBackward1", "SqueezeBackward2", "AliasBackward0"})


def _recipe_node(base: Tensor) -> tuple[object, tuple[torch.dtype, torch.device] | None] | None:
    """The node holding ``base``'s recipe and the cast applied after it, or None.

    Under ``torch.autocast`` a linear, conv or matmul casts its quantized weight (to bfloat16,
    say) and saves the cast: a ``_to_copy`` of the quantizer's output, or of a whole view of it,
    is recomputed as that output cast again, which rounds the same way.
    """
    node, cast = base.grad_fn, None
    if type(node).__name__ == "ToCopyBackward0":
        node, cast = node.next_functions[0][0], (base.dtype, base.device)
        while type(node).__name__ in _WHOLE_VIEWS:
            node = node.next_functions[0][0]
    if not isinstance(node, _RECOMPUTABLE) or getattr(node, "recipe", None) is None:
        return None
    return node, cast


def _recomputable(tensor: Tensor) -> _Recomputed | None:
    """How to recompute ``tensor`` if it is a quantizer's output (or a cast or view of one)."""
    base = tensor if tensor._base is None else tensor._base
    found = _recipe_node(base)
    if found is None or base.storage_offset() != 0:
        return None
    node, cast = found
    # The recompute is contiguous and is viewed with the saved tensor's geometry: that needs the
    # quantizer's output (as its latent) laid out contiguously, and a cast to hold all of it.
    laid_out = (base.is_contiguous() if cast is None else
                node.recipe.latent.is_contiguous() and base.numel() == node.recipe.latent.numel())
    if not laid_out:
        return None
    return _Recomputed(node, tensor.size(), tensor.stride(), tensor.storage_offset(), cast)


def _recomputed(packed: _Recomputed) -> Tensor:
    recipe = packed.node.recipe
    problem = _stale(recipe)
    if problem is not None:
        raise RuntimeError(
            f"a quantized weight needed for the backward pass cannot be recomputed: {problem}. "
            f"Run backward before changing it (e.g. before the optimizer step), or prepare with "
            f"MSQConfig(recompute_quantized_weights=False).")
    # No graph needed: autograd attaches the unpacked tensor to the saved one's grad_fn (this
    # node), so a double backward still reaches the latent.
    weight = None if packed.batch is None else packed.batch.take(packed.slot)
    if weight is None:
        weight = _quantized(recipe)
    if recipe.offsets is not None:
        weight = weight + _offset(recipe)  # the forward's own operation, so the same rounding
    if packed.cast is not None:
        weight = weight.to(dtype=packed.cast[0], device=packed.cast[1])
    if (packed.size, packed.stride, packed.storage_offset) == (weight.size(), weight.stride(), 0):
        return weight
    return weight.as_strided(packed.size, packed.stride, packed.storage_offset)


def _quantized(recipe: Recipe) -> Tensor:
    return quant.quantize_value(recipe.latent, recipe.bits, recipe.grid, recipe.scale)


class _PackedByEnclosingHooks(NamedTuple):
    value: object


class _RecomputeHooks:
    """The pack / unpack pair: quantized weights become recipes, every other saved tensor goes
    to the saved-tensor hooks that were in force around these (``enclosing``), or is stored
    detached when there were none.

    Only the innermost saved-tensor hooks see a tensor, so without the hand-over an owner's
    forward would take its activations away from ``torch.utils.checkpoint`` (which would then
    keep them after all) or from ``torch.autograd.graph.save_on_cpu``.
    """

    def __init__(self, enclosing: tuple | None, batch: _BackwardBatch | None = None) -> None:
        self.enclosing = enclosing
        self.batch = batch

    def pack(self, tensor: Tensor) -> object:
        recipe = _recomputable(tensor)
        if recipe is not None:
            return recipe if self.batch is None else self.batch.enrol(recipe)
        if self.enclosing is not None:
            return _PackedByEnclosingHooks(self.enclosing[0](tensor))
        return _saved_as_usual(tensor)

    def unpack(self, packed: object) -> Tensor:
        if isinstance(packed, _Recomputed):
            return _recomputed(packed)
        if isinstance(packed, _PackedByEnclosingHooks):
            return self.enclosing[1](packed.value)
        return packed


def _saved_as_usual(tensor: Tensor) -> Tensor:
    """What a tensor that is not recomputed is stored as: a detached alias.

    The pack hook receives the live tensor, ``grad_fn`` and all. Kept as it is, an op's saved
    *output* would hold the op's own node, a reference cycle that no garbage collection
    reclaims: every graph built without a backward (a forward under grad mode whose output is
    dropped) or kept by ``retain_graph`` / ``create_graph`` (the Hessian's first-order pass)
    would stay in memory for good. Detaching loses nothing; autograd keeps the saved tensor's
    graph position itself and reattaches it on unpack.
    """
    return tensor.detach()


def recomputed_quantized_weights(batched: bool = False) -> torch.autograd.graph.saved_tensors_hooks:
    """Inside, an op that saves a quantized weight for its backward saves how to recompute it.

    Recomputing costs one fake quantization per weight in the backward and gives the same bits
    (see the module docstring). Other saved tensors go to the saved-tensor hooks in force when
    this is called (activation checkpointing, CPU offload), so make one per use rather than
    keeping one. ``batched``: the small weights saved inside are recomputed together (the
    model's hooks, around a whole forward); hooks nested in batched ones batch with them.
    """
    top = torch._C._autograd._top_saved_tensors_default_hooks(False)
    enclosing, batch = None, _BackwardBatch() if batched else None
    if top is not None:
        ours = getattr(top[0], "__self__", None)
        # Nested in our own (a model's hooks around an owner's): hand over to what those did.
        enclosing = ours.enclosing if isinstance(ours, _RecomputeHooks) else top
        if isinstance(ours, _RecomputeHooks) and batch is None:
            batch = ours.batch
    hooks = _RecomputeHooks(enclosing, batch)
    return torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack)


def recomputes_weights(quantizers: Iterable[nn.Module]) -> bool:
    """Whether a forward using ``quantizers`` should run inside recomputed_quantized_weights."""
    # Only a forward that records a graph saves anything; compilers trace their own graph.
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    if _inside_our_hooks():
        return False  # hooks entered now would do what those do
    return any(getattr(quantizer, "recompute", False) for quantizer in quantizers)


def _inside_our_hooks() -> bool:
    """Whether the innermost saved-tensor hooks are recomputed_quantized_weights' own."""
    top = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return top is not None and isinstance(getattr(top[0], "__self__", None), _RecomputeHooks)


def install_model_recompute(model: nn.Module) -> None:
    """Make the whole forward of ``model`` save recipes for quantized weights, not copies.

    The owners' forwards already do so for their own uses; this covers a parent that reads a
    child's weight functionally (``F.linear(x, self.qkv.weight)``), whose op runs outside the
    owner's forward. A forward pre-hook enters the saved-tensor hooks and a forward hook that
    also runs on an exception leaves them; the two share the stack of the hooks entered (one
    per running forward of this model, made when it starts: see recomputed_quantized_weights).
    """
    entered: list = []
    model.register_forward_pre_hook(functools.partial(_enter_recompute, entered))
    model.register_forward_hook(functools.partial(_leave_recompute, entered), always_call=True)


def remove_model_recompute(model: nn.Module) -> None:
    """Undo ``install_model_recompute`` (a lowered model has nothing to recompute)."""
    for hooks, hook in ((model._forward_pre_hooks, _enter_recompute),
                        (model._forward_hooks, _leave_recompute)):
        for key in [key for key, value in hooks.items() if getattr(value, "func", None) is hook]:
            del hooks[key]
            model._forward_hooks_always_called.pop(key, None)


def _enter_recompute(entered: list, model: nn.Module, _args: tuple) -> None:
    if not torch.compiler.is_compiling():
        recording = torch.is_grad_enabled()
        hooks = recomputed_quantized_weights(batched=recording)
        hooks.__enter__()
        try:
            prefetched = _prefetch_small_weights(model) if recording else []
        except BaseException:
            hooks.__exit__(None, None, None)
            raise
        entered.append((hooks, prefetched))


def _leave_recompute(entered: list, _model: nn.Module, _args: tuple, _output: object) -> None:
    if not torch.compiler.is_compiling() and entered:
        top = entered.pop()
        hooks, prefetched = top if isinstance(top, tuple) else (top, [])
        hooks.__exit__(None, None, None)
        for quantizer in prefetched:  # those the forward did not read
            quantizer.drop_prefetched()


def _prefetch_small_weights(model: nn.Module) -> list[nn.Module]:
    """Quantize the small weights of ``model`` now, for the forward about to run (see the
    module docstring); returns the quantizers that hold one."""
    from .owners import iter_quantized_weights  # owners imports this module

    prefetched, budget = [], BATCHED_MAX_BYTES
    try:
        for entry in iter_quantized_weights(model):
            latent, prefetch = entry.latent, getattr(entry.quantizer, "prefetch", None)
            if prefetch is None or latent is None or latent.numel() > BATCHED_MAX_ELEMENTS:
                continue
            size = _bytes(latent)
            if size <= budget and prefetch(latent):
                budget -= size
                prefetched.append(entry.quantizer)
    except BaseException:
        for quantizer in prefetched:
            quantizer.drop_prefetched()
        raise
    return prefetched
