"""Probe pass: run the model once and record which Parameters its ops consume as weights.

Reads: the model and example inputs. Runs ``model(*inputs)`` once, in eval mode and without
gradients, under a ``torch.overrides.TorchFunctionMode`` that sees every torch function and
Tensor method call, including those inside leaf modules and inside code torch.fx cannot trace
(``F.linear(x, self.qkv.weight)`` in a module kept opaque). A Parameter consumed as the weight
operand of a linear / conv / matmul / bmm / einsum / attention op, directly or through view-like
ops (``.t()``, ``.T``, ``transpose``, ``reshape``, basic indexing, ...), is recorded under every
FQN it has (tied names too). Which operand counts, and why position embeddings, cls tokens,
relative-position bias tables and layer-scale gammas never do, is ``weight_uses``' rule.
Returns: a ``ProbeResult``. Changes nothing it can undo: every module's training flag is put
back and the hooks it adds are removed (what the model's own eval forward writes to itself, such
as a cache, stays, as after any eval call; ``prepare`` probes its private copy).

It also records the weights that reach their weight operand through other ops computed from
Parameters alone (weight standardization: ``F.batch_norm`` on the weight itself), with those
ops' names, in ``ProbeResult.transformed``. Such a weight is not recorded as a use (its kind
comes from its module), so ``F.conv2d(x, self.weight - mean)`` on a bare Parameter still goes
unseen.

What it cannot see: code paths these inputs do not take in eval mode (``if self.training:``
branches; the FX graph, traced in the model's own mode, still covers those), and ops that
bypass ``__torch_function__`` (custom ``torch.ops`` kernels).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from msq_fx.utils import eval_mode

from .weight_uses import USE_OPS, op_name, view_sources, weight_uses

__all__ = ["ProbeError", "ProbeResult", "probe"]


class ProbeError(RuntimeError):
    """The model raised while being probed; the message names the innermost module it raised in."""


@dataclass
class ProbeResult:
    """What one eager forward consumed as weights.

    Attributes:
        kinds: FQN -> kind (``"linear"``, ``"conv"``, ``"depthwise"``, ``"attention"``) of every
            Parameter used as a weight operand, in order of first use; every FQN of a tied
            Parameter is listed.
        users: FQN -> the module whose forward made that first use (``""`` is the root).
        transformed: FQN -> the names of the ops between a Parameter and the weight operand it
            reached through them (sorted), for Parameters transformed before use.
    """

    kinds: dict[str, str] = field(default_factory=dict)
    users: dict[str, str] = field(default_factory=dict)
    transformed: dict[str, tuple[str, ...]] = field(default_factory=dict)


def probe(model: nn.Module, inputs: tuple) -> ProbeResult:
    """Run ``model(*inputs)`` once and record the Parameters its ops use as weights.

    Raises ``ProbeError`` (naming the innermost module whose forward raised) when the forward
    fails; the original exception is its ``__cause__``.
    """
    names_of: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    stack: list[str] = []
    recorder = _WeightUseRecorder({id(p): p for p in model.parameters()}, stack)
    handles = _track_module_stack(model, stack)
    try:
        with torch.no_grad(), eval_mode(model), recorder:
            model(*inputs)
    except Exception as error:  # any failure of user code is reported with the module it hit
        where = stack[-1] if stack else ""
        raise ProbeError(
            f"probe: module '{where or '<root>'}' ({type(model.get_submodule(where)).__name__}) "
            f"raised {type(error).__name__}: {error}") from error
    finally:
        for handle in handles:
            handle.remove()
    result = ProbeResult()
    for param_id, (kind, user) in recorder.uses.items():
        for name in names_of.get(param_id, []):
            result.kinds[name] = kind
            result.users[name] = user
    for param_id, ops in recorder.transformed_uses.items():
        for name in names_of.get(param_id, []):
            result.transformed[name] = tuple(sorted(ops))
    return result


class _WeightUseRecorder(TorchFunctionMode):
    """Records, per Parameter id, the kind of its first use as a weight and the module stack top
    at that moment; follows view-like ops from Parameters to the tensors derived from them."""

    def __init__(self, params: dict[int, nn.Parameter], module_stack: list[str]):
        super().__init__()
        self.params = params
        self.module_stack = module_stack
        # id(derived tensor) -> (the tensor, kept alive so its id is not reused; Parameter ids)
        self.derived: dict[int, tuple[Tensor, frozenset[int]]] = {}
        self.uses: dict[int, tuple[str, str]] = {}
        # The same for tensors computed from Parameters alone by other ops, with those ops.
        self.transformed: dict[int, tuple[Tensor, frozenset[int], frozenset[str]]] = {}
        self.transformed_uses: dict[int, frozenset[str]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = op_name(func)
        if name in USE_OPS:
            self._record(name, args, kwargs)
        out = func(*args, **kwargs)
        view_of = [] if name is None else view_sources(name, args, kwargs)
        if view_of:
            sources = frozenset().union(*(self._origins(s) for s in view_of))
            if sources:
                self._remember(self.derived, out, (sources,))
            transforms = [self.transformed[id(s)] for s in view_of if self._is_transformed(s)]
            if transforms:
                self._remember(self.transformed, out, self._merged(transforms))
        elif name not in USE_OPS:
            self._follow_transform(func, args, kwargs, out)
        return out

    @staticmethod
    def _remember(table: dict, out: Any, entry: tuple) -> None:
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, Tensor):
                table[id(tensor)] = (tensor, *entry)

    @staticmethod
    def _merged(entries: list[tuple]) -> tuple[frozenset[int], frozenset[str]]:
        return (frozenset().union(*(entry[1] for entry in entries)),
                frozenset().union(*(entry[2] for entry in entries)))

    def _is_transformed(self, value: Any) -> bool:
        entry = self.transformed.get(id(value)) if isinstance(value, Tensor) else None
        return entry is not None and entry[0] is value

    def _follow_transform(self, func, args: tuple, kwargs: dict, out: Any) -> None:
        """Mark ``out`` as transformed when every tensor ``func`` read comes from Parameters."""
        tensors = [value for value in _flat(args) + _flat(tuple(kwargs.values()))
                   if isinstance(value, Tensor)]
        if not tensors:
            return
        entries = []
        for tensor in tensors:
            if self._is_transformed(tensor):
                entries.append(self.transformed[id(tensor)])
            elif self._origins(tensor):
                entries.append((tensor, self._origins(tensor), frozenset()))
            else:
                return  # an activation takes part: its output is an activation
        origins, ops = self._merged(entries)
        op = getattr(func, "__name__", None) or type(func).__name__
        self._remember(self.transformed, out, (origins, ops | {op}))

    def _origins(self, value: Any) -> frozenset[int]:
        if not isinstance(value, Tensor):
            return frozenset()
        if id(value) in self.params:
            return frozenset((id(value),))
        entry = self.derived.get(id(value))
        return entry[1] if entry is not None and entry[0] is value else frozenset()

    def _record(self, name: str, args: tuple, kwargs: dict) -> None:
        def shape_of(operand: Any) -> tuple[int, ...] | None:
            return tuple(operand.shape) if self._origins(operand) else None

        where = self.module_stack[-1] if self.module_stack else ""
        for operand, kind in weight_uses(name, args, kwargs, shape_of):
            for param_id in self._origins(operand):
                if self.params[param_id].dim() >= 2:
                    self.uses.setdefault(param_id, (kind, where))

        def transformed_shape(operand: Any) -> tuple[int, ...] | None:
            return tuple(operand.shape) if self._is_transformed(operand) else None

        for operand, _ in weight_uses(name, args, kwargs, transformed_shape):
            _, origins, ops = self.transformed[id(operand)]
            for param_id in origins:
                if self.params[param_id].dim() >= 2:
                    self.transformed_uses[param_id] = (
                        self.transformed_uses.get(param_id, frozenset()) | ops)


def _flat(values: tuple) -> list[Any]:
    """``values`` with lists and tuples among them opened one level (cat's tensor list)."""
    return [item for value in values
            for item in (value if isinstance(value, (list, tuple)) else (value,))]


def _track_module_stack(model: nn.Module, stack: list[str]) -> list[Any]:
    """Forward hooks keeping ``stack`` = the FQNs of the modules whose forward is running.

    A forward that raises leaves its name on the stack, so after a failure ``stack[-1]`` is the
    innermost module that raised; a module that returns pops down to its own entry, which also
    drops what a child that raised left behind when the module caught that child's error.
    """
    handles = []
    for name, module in model.named_modules():
        def enter(_module, _args, name=name):
            stack.append(name)

        def leave(_module, _args, _output, name=name):
            while stack and stack.pop() != name:
                pass

        try:
            pre = module.register_forward_pre_hook(enter)
        except Exception:  # e.g. TorchScript modules take no Python hooks; they are not tracked
            continue
        handles += [pre, module.register_forward_hook(leave)]
    return handles
