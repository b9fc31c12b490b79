"""Small helpers shared by the runtime."""
from __future__ import annotations

import contextlib
import copy
from typing import Any, ContextManager, Iterable, Iterator

import torch
from torch import Tensor, nn

__all__ = ["is_distributed", "is_out_of_memory", "take", "call_model", "eval_mode", "model_mode",
           "copy_module", "replace_marked_block", "OUT_OF_MEMORY_MESSAGES"]

#: Substrings of the errors an allocation failure raises on the CPU: torch's allocator, the C++
#: runtime, Python, and the OS refusing an address-space request.
OUT_OF_MEMORY_MESSAGES = ("can't allocate memory", "not enough memory", "Cannot allocate memory",
                          "std::bad_alloc", "MemoryError")


def is_distributed() -> bool:
    """Whether a torch.distributed process group is running (ranks must then agree)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def is_out_of_memory(error: BaseException) -> bool:
    """True for an allocation failure: MemoryError, torch.OutOfMemoryError or an allocator error."""
    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(error, RuntimeError)
        and any(text in str(error) for text in OUT_OF_MEMORY_MESSAGES))


def replace_marked_block(text: str, start: str, end: str, body: str) -> str | None:
    """``text`` with what stands between its first ``start`` marker and the ``end`` marker after
    it replaced by ``body`` on lines of its own (the markers and the rest kept), or None when
    ``text`` lacks that pair: a generated block inside a hand-written document."""
    before, found, rest = text.partition(start)
    if not found or end not in rest:
        return None
    return f"{before}{start}\n{body}\n{end}{rest.split(end, 1)[1]}"


def take(items: Iterable, count: int) -> list:
    """The first ``count`` items of ``items`` (fewer if it ends first), reading no further."""
    chosen = []
    for item in items:
        chosen.append(item)
        if len(chosen) == count:
            break
    return chosen


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(*inputs)`` for a tuple or list of positional inputs, else ``model(inputs)``."""
    return model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)


def eval_mode(model: nn.Module) -> ContextManager[nn.Module]:
    """Put ``model`` in eval mode, then restore every module's own flag (some may be frozen)."""
    return model_mode(model, training=False)


@contextlib.contextmanager
def model_mode(model: nn.Module, training: bool) -> Iterator[nn.Module]:
    """Put ``model`` in train (``training=True``) or eval mode, then restore every module's own
    flag."""
    modes = [(module, module.training) for module in model.modules()]
    model.train(training)
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def copy_module(model: nn.Module, replacements: dict[int, object] | None = None) -> nn.Module:
    """``copy.deepcopy(model)``, also when the model caches autograd-graph tensors.

    Some models cache tensors computed from their parameters in plain attributes during an eval
    forward (timm's EfficientViT attention-bias cache); after a forward with gradients enabled,
    such as a Hessian-vector product, those tensors are not graph leaves and ``deepcopy`` refuses
    them. The copy holds detached clones of them instead (same values, no graph).
    ``replacements`` maps ``id(obj)`` of objects in ``model`` to what the copy holds in their
    place (e.g. empty tensors for a structure-only copy), never copying those objects.
    """
    memo: dict[int, object] = dict(replacements or {})
    for module in model.modules():
        for value in vars(module).values():
            _memo_detached(value, memo, depth=3)
    return copy.deepcopy(model, memo)


def _memo_detached(value: object, memo: dict[int, object], depth: int) -> None:
    if isinstance(value, Tensor):
        if not value.is_leaf:
            memo[id(value)] = value.detach().clone()
    elif depth > 0 and isinstance(value, dict):
        for item in value.values():
            _memo_detached(item, memo, depth - 1)
    elif depth > 0 and isinstance(value, (list, tuple)):
        for item in value:
            _memo_detached(item, memo, depth - 1)
