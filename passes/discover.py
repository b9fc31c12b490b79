"""Discover pass: find every conv / depthwise conv / linear / attention weight of a model.

Reads: the model (its module tree and parameters) and, when one could be captured, its FX graph.
Returns: a ``Discovery`` -- the weights to quantize (each tensor once, with every FQN it is reachable
under, in execution order) and the conv/linear/attention weights left in float with the reason.
Changes nothing.

Weights are found in two ways, so neither a leaf nor a functional use hides one:
* module walk: ``nn.Conv*``/``nn.ConvTranspose*`` (``groups == in_channels > 1`` is depthwise),
  ``nn.Linear`` and subclasses, ``nn.MultiheadAttention`` (``in_proj_weight`` or the separate
  q/k/v projections; its ``out_proj`` counts as attention) -- including modules inside leaves;
* graph: a Parameter read by ``get_attr`` and consumed, possibly through view-like ops, by a
  linear / conv / matmul / attention function (``F.linear(x, self.qkv.weight)``).
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from msq_fx.config import MSQConfig

_LINEAR_FUNCTIONS = {F.linear, torch._C._nn.linear, torch.addmm}
_CONV_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
                   F.conv_transpose3d, torch.conv1d, torch.conv2d, torch.conv3d}
_MATMUL_FUNCTIONS = {torch.matmul, operator.matmul, torch.mm, torch.bmm, torch.einsum,
                     torch.baddbmm, torch.tensordot}
_MATMUL_METHODS = {"matmul", "mm", "bmm", "__matmul__", "__rmatmul__"}
_ATTENTION_FUNCTIONS = {F.multi_head_attention_forward}
_VIEW_FUNCTIONS = {torch.transpose, torch.t, torch.reshape, torch.flatten, torch.squeeze,
                   torch.unsqueeze, torch.permute, getattr, operator.getitem}
_VIEW_METHODS = {"t", "transpose", "permute", "reshape", "view", "to", "type", "contiguous",
                 "flatten", "unsqueeze", "squeeze", "float", "half", "bfloat16", "expand",
                 "chunk", "split", "unbind", "type_as"}
_CONV_GROUPS_ARG = 6  # F.conv2d(input, weight, bias, stride, padding, dilation, groups)


@dataclass(frozen=True)
class WeightTarget:
    """One tensor to quantize: every FQN it is reachable under (tied uses), and its kind."""

    fqns: tuple[str, ...]
    kind: str
    shape: tuple[int, ...]

    @property
    def name(self) -> str:
        return self.fqns[0]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class FloatWeight:
    """A conv / linear / attention weight left in float, and why."""

    name: str
    kind: str
    reason: str


@dataclass
class Discovery:
    targets: list[WeightTarget] = field(default_factory=list)
    float_weights: list[FloatWeight] = field(default_factory=list)


def discover(model: nn.Module, graph_module: fx.GraphModule | None,
             config: MSQConfig) -> Discovery:
    """Find the quantizable weights of ``model`` and apply the config's exclusions and policies."""
    names_of = _parameter_names(model)
    kinds = _kinds_from_modules(model)
    if graph_module is not None:
        for qualname, kind in _kinds_from_graph(model, graph_module).items():
            kinds.setdefault(qualname, kind)
    order = _execution_order(model, graph_module, names_of)
    found = _merge_tied(model, kinds, names_of, order)
    return _apply_policies(model, found, config)


# --------------------------------------------------------------------------- module walk

def _kinds_from_modules(model: nn.Module) -> dict[str, str]:
    kinds: dict[str, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{name}." if name else ""
        if isinstance(module, nn.modules.conv._ConvNd):
            depthwise = module.groups > 1 and module.groups == module.in_channels
            kinds[prefix + "weight"] = "depthwise" if depthwise else "conv"
        elif isinstance(module, nn.MultiheadAttention):
            for attr in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
                if getattr(module, attr, None) is not None:
                    kinds[prefix + attr] = "attention"
            kinds[prefix + "out_proj.weight"] = "attention"
        elif isinstance(module, nn.Linear):
            kinds.setdefault(prefix + "weight", "linear")
    return {k: v for k, v in kinds.items() if _resolve_parameter(model, k) is not None}


# --------------------------------------------------------------------------- graph

def _kinds_from_graph(model: nn.Module, graph_module: fx.GraphModule) -> dict[str, str]:
    kinds: dict[str, str] = {}
    for node in graph_module.graph.nodes:
        if node.op != "get_attr":
            continue
        param = _resolve_parameter(model, node.target)
        if param is None or param.dim() < 2:
            continue
        kind = _consumer_kind(node, param)
        if kind is not None:
            kinds[node.target] = kind
    return kinds


def _consumer_kind(node: fx.Node, param: torch.Tensor) -> str | None:
    """Kind implied by the ops that consume ``node`` (following view-like ops)."""
    frontier, visited = list(node.users), set()
    while frontier:
        user = frontier.pop()
        if user in visited:
            continue
        visited.add(user)
        kind = _kind_of_op(user, param)
        if kind is not None:
            return kind
        if _is_view(user):
            frontier.extend(user.users)
    return None


def _kind_of_op(node: fx.Node, param: torch.Tensor) -> str | None:
    if node.op == "call_function":
        if node.target in _ATTENTION_FUNCTIONS:
            return "attention"
        if node.target in _LINEAR_FUNCTIONS or node.target in _MATMUL_FUNCTIONS:
            return "linear"
        if node.target in _CONV_FUNCTIONS:
            groups = node.kwargs.get("groups", node.args[_CONV_GROUPS_ARG]
                                     if len(node.args) > _CONV_GROUPS_ARG else 1)
            depthwise = isinstance(groups, int) and groups > 1 and param.shape[1] == 1
            return "depthwise" if depthwise else "conv"
    if node.op == "call_method" and node.target in _MATMUL_METHODS:
        return "linear"
    return None


def _is_view(node: fx.Node) -> bool:
    return ((node.op == "call_function" and node.target in _VIEW_FUNCTIONS)
            or (node.op == "call_method" and node.target in _VIEW_METHODS))


# --------------------------------------------------------------------------- tensors and names

def _resolve_parameter(model: nn.Module, qualname: str) -> nn.Parameter | None:
    owner_name, _, attr = qualname.rpartition(".")
    try:
        owner = model.get_submodule(owner_name)
    except AttributeError:
        return None
    param = owner._parameters.get(attr)
    return param if isinstance(param, nn.Parameter) else None


def _parameter_names(model: nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return names


def _execution_order(model: nn.Module, graph_module: fx.GraphModule | None,
                     names_of: dict[int, list[str]]) -> dict[str, int]:
    """Rank of each parameter FQN: graph order where a graph exists, module order otherwise."""
    order: dict[str, int] = {}
    if graph_module is not None:
        for node in graph_module.graph.nodes:
            if node.op == "call_module":
                for pname, _ in _named_direct_and_nested(model, node.target):
                    order.setdefault(pname, len(order))
            elif node.op == "get_attr":
                order.setdefault(node.target, len(order))
    for names in names_of.values():
        for name in names:
            order.setdefault(name, len(order))
    return order


def _named_direct_and_nested(model: nn.Module, module_name: str):
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return []
    prefix = f"{module_name}." if module_name else ""
    return [(prefix + n, p) for n, p in module.named_parameters(remove_duplicate=False)]


def _merge_tied(model: nn.Module, kinds: dict[str, str], names_of: dict[int, list[str]],
                order: dict[str, int]) -> list[WeightTarget]:
    """One target per tensor; FQNs sorted by first use, kind from the first FQN that has one."""
    by_tensor: dict[int, WeightTarget] = {}
    for qualname in sorted(kinds, key=lambda q: order.get(q, len(order))):
        param = _resolve_parameter(model, qualname)
        if id(param) in by_tensor:
            continue
        fqns = sorted(set(names_of.get(id(param), [qualname])) | {qualname},
                      key=lambda q: order.get(q, len(order)))
        by_tensor[id(param)] = WeightTarget(tuple(fqns), kinds[qualname], tuple(param.shape))
    return sorted(by_tensor.values(), key=lambda t: order.get(t.name, len(order)))


# --------------------------------------------------------------------------- policies

def _apply_policies(model: nn.Module, found: list[WeightTarget], config: MSQConfig) -> Discovery:
    discovery = Discovery()
    first_last = {found[0].name, found[-1].name} if found else set()
    for target in found:
        reason = _exclusion_reason(model, target, config)
        if reason is None and config.first_last == "float" and target.name in first_last:
            reason = "first/last layer kept float (MSQConfig.first_last='float')"
        if reason is None:
            discovery.targets.append(target)
        else:
            discovery.float_weights.append(FloatWeight(target.name, target.kind, reason))
    return discovery


def _exclusion_reason(model: nn.Module, target: WeightTarget, config: MSQConfig) -> str | None:
    param = _resolve_parameter(model, target.name)
    if not param.is_floating_point():
        return f"not a floating-point tensor ({param.dtype})"
    for fqn in target.fqns:
        for pattern in config.exclude:
            if re.search(pattern, fqn):
                return f"excluded by MSQConfig.exclude pattern {pattern!r}"
        if config.filter_fn is not None:
            owner_name = fqn.rpartition(".")[0]
            if not config.filter_fn(model.get_submodule(owner_name), fqn):
                return "excluded by MSQConfig.filter_fn"
    return None
