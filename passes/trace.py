"""Trace pass: capture an FX graph of any model that runs eagerly, for analysis only.

Reads: the model (its module tree and the code of its ``forward`` methods); it never runs the model
on data. Returns: a ``CapturedGraph`` -- a ``torch.fx.GraphModule`` (None when not even the root's
own ``forward`` can be traced or the retry budget runs out, with the reason in ``failure``) and
the submodules kept opaque, each with the reason. The GraphModule shares its submodules and
parameters with the model, so treat it as read-only. Changes nothing: every module's parameters,
buffers, submodules, attributes and training flag are put back as they were (a shallow restore:
the tracer stores constants on the root, and forwards run on Proxies may assign to ``self``).

Which submodules become leaves (one ``call_module`` node each):
* the standard ``torch.nn`` layers (``torch.fx.Tracer``'s default);
* ``leaf_modules`` given by the caller (reason ``"user"``);
* timm's no-trace modules, with timm's no-trace functions wrapped (``"registry:timm"``);
* torchvision's kernel-backed ops from ``torchvision.ops`` (``"registry:torchvision"``);
* any submodule whose ``forward`` cannot be traced: when tracing raises, the innermost submodule
  being traced at the time is made a leaf and the trace starts again (``"retry: <error>"``).

The graph is a map of the model for analysis (weights used through ``get_attr``, data-flow
adjacency, node counts), never a replacement for it: it is traced in the model's current
train/eval mode, so ``if self.training:`` branches (and any other Python control flow on
non-tensor values) are frozen as they were at trace time, and leaves hide their inner layers.
"""
from __future__ import annotations

import inspect
import itertools
import logging
import math
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from torch import fx, nn

__all__ = ["CapturedGraph", "trace", "LeafAwareTracer"]

logger = logging.getLogger("msq_fx")

USER_REASON = "user"
TIMM_REASON = "registry:timm"
TORCHVISION_REASON = "registry:torchvision"
RETRY_PREFIX = "retry: "

# The containers a module keeps its state in; restored in place because other objects (a
# GraphModule built from the model, the caller) hold references to these very dicts.
_STATE_CONTAINERS = ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set")


@dataclass
class CapturedGraph:
    """An FX graph of a model and the submodules it keeps opaque.

    Attributes:
        graph_module: the traced graph; None only when not even the root's own forward can be
            traced (or the retry budget ran out).
        leaves: FQN of each submodule kept opaque in the graph -> why: ``"user"``,
            ``"registry:timm"``, ``"registry:torchvision"`` or
            ``"retry: <ExceptionType: message>"``.
            Standard ``torch.nn`` layers are leaves too but are not listed.
        failure: why ``graph_module`` is None, else None.
    """

    graph_module: fx.GraphModule | None
    leaves: dict[str, str]
    failure: str | None = None

    @property
    def num_nodes(self) -> int:
        return 0 if self.graph_module is None else len(self.graph_module.graph.nodes)


def trace(model: nn.Module, *, leaf_modules: Sequence[str | type] = (),
          concrete_args: dict[str, Any] | None = None, max_retries: int = 64) -> CapturedGraph:
    """Capture an FX graph of ``model``; never raises for a model whose forward runs eagerly.

    Args:
        model: the module to trace, in the train/eval mode it should be traced in.
        leaf_modules: submodules to keep opaque. A str is an exact FQN (any alias of a shared
            module works) or a class name; a type is a class (subclasses match too). An entry
            that matches nothing is logged as a warning, since one config may serve many models.
        concrete_args: passed to ``torch.fx.Tracer.trace`` (e.g. ``{"flag": False}``).
        max_retries: how many failing submodules may be turned into leaves before giving up.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"trace() expects a torch.nn.Module, got {type(model).__name__}")
    if max_retries < 0:
        raise ValueError(f"max_retries must be >= 0, got {max_retries}")
    policy = _LeafPolicy(model, leaf_modules)
    for retries in itertools.count():
        tracer = LeafAwareTracer(policy)
        try:
            with _state_restored_afterwards(model):
                graph = tracer.trace(model, concrete_args=concrete_args)
                return _captured(model, graph, tracer)
        except Exception as error:  # anything the model's code raises under tracing is handled
            culprit, culprit_error = tracer.blame(error)
            reason = _describe(culprit_error)
            if culprit is None or culprit in policy.retry_leaves or retries == max_retries:
                failure = _failure(model, culprit, reason, retries, policy.retry_leaves)
                return CapturedGraph(None, {**policy.retry_leaves, **tracer.leaves}, failure)
            policy.retry_leaves[culprit] = RETRY_PREFIX + reason
            logger.info("trace: submodule %r (%s) cannot be traced (%s); "
                        "retrying with it as a leaf", culprit, _type_name(model, culprit), reason)


class LeafAwareTracer(fx.Tracer):
    """A ``torch.fx.Tracer`` that keeps the modules a ``_LeafPolicy`` names opaque and records,
    for an exception raised while tracing, the innermost submodule whose forward raised it."""

    def __init__(self, policy: _LeafPolicy):
        super().__init__(autowrap_modules=policy.autowrap_modules,
                         autowrap_functions=policy.autowrap_functions)
        self.policy = policy
        self.leaves: dict[str, str] = {}
        # id(error) -> (error, FQN); the error is kept so its id cannot be reused meanwhile.
        self._raised_in: dict[int, tuple[BaseException, str]] = {}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        reason = self.policy.reason(m, module_qualified_name)
        if reason is not None:
            self.leaves.setdefault(module_qualified_name, reason)
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        def forward_tagging_errors(*args: Any, **kwargs: Any) -> Any:
            try:
                return forward(*args, **kwargs)
            except Exception as error:
                # The innermost module sees the error first; outer modules keep its tag.
                self._raised_in.setdefault(id(error), (error, self.path_of_module(m)))
                raise

        return super().call_module(m, forward_tagging_errors, args, kwargs)

    def blame(self, error: BaseException) -> tuple[str | None, BaseException]:
        """The innermost submodule whose forward raised ``error`` (None: the root's forward),
        and the error that submodule raised.

        An error the root raised while handling a submodule's error (``raise ... from``, or
        inside ``except``) is blamed on that submodule: once it is a leaf, the root's
        handler no longer runs.
        """
        seen: set[int] = set()
        cause: BaseException | None = error
        while cause is not None and id(cause) not in seen:
            seen.add(id(cause))
            tagged = self._raised_in.get(id(cause))
            if tagged is not None and tagged[0] is cause:
                return tagged[1], cause
            cause = cause.__cause__ or cause.__context__
        return None, error


class _LeafPolicy:
    """Which modules to keep opaque, and why; the retry leaves grow from attempt to attempt."""

    def __init__(self, model: nn.Module, leaf_modules: Sequence[str | type]):
        self.user_modules, self.user_classes, self.user_class_names = _resolve_user_leaves(
            model, leaf_modules)
        self.retry_leaves: dict[str, str] = {}
        self.timm_classes, timm_functions = _timm_registry()
        self.torchvision_op_classes, self.autowrap_modules = _torchvision_registry()
        self.autowrap_functions = tuple(timm_functions)

    def reason(self, m: nn.Module, qualname: str) -> str | None:
        if self._is_user_leaf(m):
            return USER_REASON
        if qualname in self.retry_leaves:
            return self.retry_leaves[qualname]
        if isinstance(m, self.timm_classes):
            return TIMM_REASON
        # torchvision makes every torchvision.ops module a leaf only to keep feature-extraction
        # node names stable; composite blocks such as Conv2dNormActivation or SqueezeExcitation
        # trace fine, and keeping them opaque would hide their convs from the data-flow graph.
        # So only the kernel-backed ops (no child modules) follow that convention here.
        if isinstance(m, self.torchvision_op_classes) and next(m.children(), None) is None:
            return TORCHVISION_REASON
        return None

    def _is_user_leaf(self, m: nn.Module) -> bool:
        return (id(m) in self.user_modules or isinstance(m, self.user_classes)
                or any(cls.__name__ in self.user_class_names for cls in type(m).__mro__))


def _resolve_user_leaves(model: nn.Module, leaf_modules: Sequence[str | type]
                         ) -> tuple[set[int], tuple[type, ...], set[str]]:
    named = dict(model.named_modules(remove_duplicate=False))
    class_names = {cls.__name__ for m in named.values() for cls in type(m).__mro__}
    modules, classes, names = set(), [], set()
    for entry in leaf_modules:
        if isinstance(entry, type):
            classes.append(entry)
        elif isinstance(entry, str):
            if entry in named:
                modules.add(id(named[entry]))
            names.add(entry)
            if entry not in named and entry not in class_names:
                logger.warning("trace: leaf_modules entry %r is neither a submodule FQN "
                               "nor a class name of any submodule of %s; ignored",
                               entry, type(model).__name__)
        else:
            raise TypeError(f"leaf_modules entries must be an FQN / class name (str) or a class, "
                            f"got {entry!r} ({type(entry).__name__})")
    return modules, tuple(classes), names


def _timm_registry() -> tuple[tuple[type, ...], list[Callable[..., Any]]]:
    # A model holding timm modules has imported timm, so an unimported timm cannot matter
    # (and importing it just to ask would cost seconds); the same holds for torchvision.
    if "timm" not in sys.modules:
        return (), []
    from timm.layers import get_notrace_functions, get_notrace_modules
    return tuple(get_notrace_modules()), [f for f in get_notrace_functions() if callable(f)]


def _torchvision_registry() -> tuple[tuple[type, ...], tuple[Any, ...]]:
    """The module classes of ``torchvision.ops`` and the modules whose functions to wrap, as
    torchvision's feature extractor has them."""
    if "torchvision" not in sys.modules:
        return (), (math,)
    import torchvision.ops
    op_classes = tuple(cls for _, cls in inspect.getmembers(torchvision.ops, inspect.isclass)
                       if issubclass(cls, nn.Module))
    return op_classes, (math, torchvision.ops)


def _captured(model: nn.Module, graph: fx.Graph, tracer: LeafAwareTracer) -> CapturedGraph:
    try:
        graph_module = fx.GraphModule(model, graph, type(model).__name__)
    except Exception as error:  # the graph was traced but cannot be turned into code
        return CapturedGraph(None, dict(tracer.leaves), failure=(
            f"the traced graph of {type(model).__name__} cannot be built into a GraphModule: "
            f"{_describe(error)}"))
    return CapturedGraph(graph_module, dict(tracer.leaves))


def _failure(model: nn.Module, culprit: str | None, reason: str, retries: int,
             retry_leaves: dict[str, str]) -> str:
    if culprit is None:
        return f"the forward of the root module ({type(model).__name__}) cannot be traced: {reason}"
    where = f"submodule {culprit!r} ({_type_name(model, culprit)})"
    if culprit in retry_leaves:
        return f"{where} still fails when kept as a leaf: {reason}"
    return f"gave up after {retries} retries: {where} cannot be traced: {reason}"


def _type_name(model: nn.Module, fqn: str) -> str:
    return type(model.get_submodule(fqn)).__name__


def _describe(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


@contextmanager
def _state_restored_afterwards(model: nn.Module) -> Iterator[None]:
    """Undo whatever tracing assigns to the modules: fx stores constants on the root
    (``_tensor_constant0``), and forwards run on Proxies may cache values on ``self``."""
    saved = [(m, dict(m.__dict__), {name: _copy_container(m.__dict__.get(name))
                                    for name in _STATE_CONTAINERS})
             for m in model.modules()]
    try:
        yield
    finally:
        for module, attributes, containers in saved:
            for name, contents in containers.items():
                _refill_container(attributes.get(name), contents)
            module.__dict__.clear()
            module.__dict__.update(attributes)


def _copy_container(container: Any) -> Any:
    return None if container is None else type(container)(container)


def _refill_container(container: Any, contents: Any) -> None:
    if container is not None:
        container.clear()
        container.update(contents)
