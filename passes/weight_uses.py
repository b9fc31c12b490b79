"""Which operand of a torch op is used as a weight: the one rule the discover pass (on the FX
graph) and the probe pass (eagerly) both apply. Not a pass itself: a table of ops and a function.

A Parameter is a weight only where an op consumes it as its weight operand, directly or through
view-like ops (``VIEW_OPS``: ``.t()``, ``.T``, ``transpose``, ``reshape``, basic indexing such as
``w[:d]``, ``chunk``/``split``, dtype casts, ``cat``/``stack`` of Parameters). It must have at
least 2 dims (biases, norm scales and layer-scale gammas are 1-D). Per op:

* ``linear``: the ``weight`` operand -> ``"linear"``. The input never counts: a learned
  query or latent fed to a layer is an activation, not a weight.
* ``conv*`` / ``conv_transpose*``: the ``weight`` operand -> ``"depthwise"`` when
  ``groups > 1`` and every group has one input channel, else ``"conv"``.
* ``multi_head_attention_forward`` / ``_native_multi_head_attention``: the in-, out- and
  separate q/k/v projection weights -> ``"attention"`` (``bias_k``/``bias_v`` never).
* ``matmul``, ``@``, ``mm``, ``addmm``, ``bmm``, ``baddbmm``, ``tensordot``: only the
  right-hand operand (in ``x @ W``, ``W`` maps the last dim of ``x`` to a new one: a
  projection), and only when, as consumed, it is a matrix (2-D) or a stack of matrices whose
  leading dims are all > 1 (per-head / per-expert projections) -> ``"linear"``. A left-hand
  Parameter (``self.query @ k.T``: a learned token) and a right-hand one with a singleton
  leading dim (``attn @ self.memory`` with shape 1 x N x D: a broadcast embedding) do not count.
* ``einsum``: a 2-D operand, in any position, with exactly one subscript summed against another
  operand and one subscript found only in it and in the output (``'bnd,de->bne'``: d summed,
  e new) -> ``"linear"``. ``'bnd,nd->bn'`` (n is shared with x: a per-token embedding) and
  operands written with ``...`` do not count.
* ``scaled_dot_product_attention``: no operand is a weight; q/k/v/attn_mask are activations,
  and a Parameter there is a learned token or a position bias.

Position embeddings, cls tokens, relative-position bias tables and layer-scale gammas are added,
concatenated with activations, multiplied elementwise or gathered with a tensor index before use;
none of these is a weight operand (a tensor index is a gather, not a view, so it is not followed),
so they are never taken for weights.
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import fx

__all__ = ["USE_OPS", "VIEW_OPS", "op_name", "graph_op_name", "view_sources", "weight_uses"]

_CONV_OPS = frozenset({"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
                       "conv_transpose3d"})
# op -> (position, keyword) of the right-hand operand.
_MATMUL_OPS = {"matmul": (1, "other"), "mm": (1, "mat2"), "bmm": (1, "mat2"),
               "addmm": (2, "mat2"), "baddbmm": (2, "batch2"), "tensordot": (1, "b"),
               "__rmatmul__": (0, "self")}  # Tensor.__rmatmul__(self, other) is other @ self
_ATTENTION_OPS = {
    "multi_head_attention_forward": ((5, "in_proj_weight"), (11, "out_proj_weight"),
                                     (18, "q_proj_weight"), (19, "k_proj_weight"),
                                     (20, "v_proj_weight")),
    "_native_multi_head_attention": ((5, "qkv_weight"), (7, "proj_weight")),
}
_CONV_GROUPS = (6, "groups")  # conv: (input, weight, bias, stride, padding, dilation, groups);
                              # conv_transpose: (..., padding, output_padding, groups, dilation)

#: Ops whose operands may be weights (scaled_dot_product_attention is listed so that a probe
#: records that it saw it; ``weight_uses`` never returns an operand of it).
USE_OPS = frozenset({"linear", "einsum", "scaled_dot_product_attention"}
                    | _CONV_OPS | set(_MATMUL_OPS) | set(_ATTENTION_OPS))
#: Ops whose output is the first operand (or, for cat/stack, the listed tensors) rearranged or
#: cast, so a weight read through them is still that weight.
VIEW_OPS = frozenset({
    "t", "T", "mT", "H", "mH", "adjoint", "data", "transpose", "swapaxes", "swapdims", "permute",
    "movedim", "moveaxis", "reshape", "view", "view_as", "reshape_as", "flatten", "unflatten",
    "squeeze", "unsqueeze", "expand", "expand_as", "contiguous", "to", "type", "type_as", "float",
    "half", "bfloat16", "double", "detach", "clone", "narrow", "select", "__getitem__", "chunk",
    "split", "tensor_split", "unbind", "cat", "concat", "concatenate", "stack", "conj",
    "resolve_conj", "resolve_neg",
})
#: Tensor properties that are views; eagerly they reach a TorchFunctionMode as the descriptor's
#: ``__get__``, in an FX graph as ``getattr(x, "T")``.
_PROPERTY_VIEWS = frozenset({"T", "mT", "H", "mH", "data"})
_LIST_SOURCE_OPS = frozenset({"cat", "concat", "concatenate", "stack"})


def _callable_names() -> dict[Any, str]:
    names: dict[Any, str] = {operator.matmul: "matmul", operator.getitem: "__getitem__"}
    spaces = (torch, F, torch._C._nn, torch.Tensor, torch._C.TensorBase)
    for name in sorted(USE_OPS | VIEW_OPS):
        for space in spaces:
            candidate = space.__dict__.get(name) if isinstance(space, type) else getattr(
                space, name, None)
            if callable(candidate):
                names.setdefault(candidate, name)
    for space in (torch.Tensor, torch._C.TensorBase):
        names.setdefault(space.__matmul__, "matmul")
        names.setdefault(space.__getitem__, "__getitem__")
    return names


_NAMES = _callable_names()


def op_name(func: Any) -> str | None:
    """The op name (a key of the rules above) of a callable a TorchFunctionMode receives."""
    if getattr(func, "__name__", None) == "__get__":  # a Tensor property such as .T
        name = getattr(getattr(func, "__self__", None), "__name__", None)
        return name if name in _PROPERTY_VIEWS else None
    try:
        return _NAMES.get(func)
    except TypeError:  # an unhashable callable is none of ours
        return None


def graph_op_name(node: fx.Node) -> str | None:
    """The op name of an FX node, or None when it is none of the ops above."""
    if node.op == "call_function":
        if node.target is getattr:
            attr = node.args[1] if len(node.args) > 1 else None
            return attr if attr in _PROPERTY_VIEWS else None
        return op_name(node.target)
    if node.op == "call_method":
        name = "matmul" if node.target == "__matmul__" else node.target
        return name if name in USE_OPS or name in VIEW_OPS else None
    return None


def view_sources(op: str, args: Sequence[Any], kwargs: dict[str, Any]) -> list[Any]:
    """The operands whose values ``op``'s output carries; [] when it is not a view here.

    ``__getitem__`` is a view only for basic indexing (ints, slices, None, Ellipsis); an index
    tensor gathers (a relative-position bias table read through an index is not its table).
    """
    if op not in VIEW_OPS or not args:
        return []
    if op == "__getitem__" and not _is_basic_index(args[1] if len(args) > 1 else None):
        return []
    if op in _LIST_SOURCE_OPS:
        first = args[0] if args else kwargs.get("tensors", ())
        return list(first) if isinstance(first, (list, tuple)) else [first]
    return [args[0]]


def _is_basic_index(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return all(isinstance(i, (int, slice, type(None), type(Ellipsis))) for i in items)


def weight_uses(op: str, args: Sequence[Any], kwargs: dict[str, Any],
                shape_of: Callable[[Any], tuple[int, ...] | None]) -> list[tuple[Any, str]]:
    """The operands of one call of ``op`` used as a weight, each with the kind it implies.

    ``shape_of(operand)`` is the operand's shape as consumed, or None when it does not come from
    a Parameter (such operands are never returned).
    """
    def arg(position: int, keyword: str, default: Any = None) -> Any:
        if keyword in kwargs:
            return kwargs[keyword]
        return args[position] if len(args) > position else default

    uses: list[tuple[Any, str]] = []

    def add(operand: Any, kind: str | Callable[[tuple[int, ...]], str],
            fits: Callable[[tuple[int, ...]], bool]) -> None:
        shape = None if operand is None else shape_of(operand)
        if shape is not None and len(shape) >= 2 and fits(shape):
            uses.append((operand, kind(shape) if callable(kind) else kind))

    if op == "linear":
        add(arg(1, "weight"), "linear", lambda s: len(s) == 2)
    elif op in _CONV_OPS:
        groups, transposed = arg(*_CONV_GROUPS, default=1), "transpose" in op
        add(arg(1, "weight"), lambda s: _conv_kind(s, groups, transposed), lambda s: len(s) >= 3)
    elif op in _ATTENTION_OPS:
        for position, keyword in _ATTENTION_OPS[op]:
            add(arg(position, keyword), "attention", lambda s: len(s) == 2)
    elif op in _MATMUL_OPS:
        add(arg(*_MATMUL_OPS[op]), "linear", _is_projection)
    elif op == "einsum":
        uses.extend(_einsum_uses(args, kwargs, shape_of))
    return uses


def _conv_kind(shape: tuple[int, ...], groups: Any, transposed: bool) -> str:
    # conv weight: (out, in / groups, *k); transposed: (in, out / groups, *k). Depthwise means
    # groups == in_channels, i.e. one input channel per group.
    one_input_per_group = shape[0] == groups if transposed else shape[1] == 1
    depthwise = isinstance(groups, int) and groups > 1 and one_input_per_group
    return "depthwise" if depthwise else "conv"


def _is_projection(shape: tuple[int, ...]) -> bool:
    return len(shape) == 2 or all(d > 1 for d in shape[:-2])


def _einsum_uses(args: Sequence[Any], kwargs: dict[str, Any],
                 shape_of: Callable[[Any], tuple[int, ...] | None]) -> Iterable[tuple[Any, str]]:
    if not args or not isinstance(args[0], str):
        return []  # the sublist form einsum(op, [0, 1], op, [1, 2]) is not analysed
    operands = list(args[1:])
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    equation = args[0].replace(" ", "")
    inputs, arrow, output = equation.partition("->")
    subscripts = inputs.split(",")
    if len(subscripts) != len(operands):
        return []
    if not arrow:  # implicit output: the letters used once, in alphabetical order
        letters = inputs.replace(",", "").replace(".", "")
        output = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    uses = []
    for index, (operand, sub) in enumerate(zip(operands, subscripts)):
        shape = shape_of(operand)
        if shape is None or len(shape) != 2 or len(sub) != 2 or "." in sub or sub[0] == sub[1]:
            continue
        others = set("".join(s for i, s in enumerate(subscripts) if i != index))
        summed = [c for c in sub if c in others and c not in output]
        new = [c for c in sub if c in output and c not in others]
        if len(summed) == 1 and len(new) == 1:
            uses.append((operand, "linear"))
    return uses
