"""Discover pass: find every conv / depthwise conv / linear / attention weight of a model.

Reads: the model (its module tree and parameters), its FX graph when one could be captured, the
leaves the tracer kept opaque and, when ``prepare`` had example inputs, the probe pass's record
of which Parameters one eager forward consumed as weights.
Returns: a ``Discovery`` -- the weights to quantize (each tensor once, with every FQN it is
reachable under, in execution order), the conv/linear/attention weights left in float with the
reason, and notes on what could not be checked or is read through a transform. Changes nothing.

Weights are found in three ways, so neither a leaf nor a functional use hides one:
* module walk: ``nn.Conv*``/``nn.ConvTranspose*`` (``groups == in_channels > 1`` is depthwise),
  ``nn.Linear`` and subclasses, ``nn.MultiheadAttention`` (``in_proj_weight`` or the separate
  q/k/v projections; its ``out_proj`` counts as attention) -- including modules inside leaves;
* graph: a Parameter read by ``get_attr`` and consumed, possibly through view-like ops, as the
  weight operand of a linear / conv / matmul / einsum / attention op (``F.linear(x,
  self.qkv.weight)``), by the rule in ``weight_uses``;
* probe: the same rule applied eagerly, which also sees uses inside leaves.
A functional use whose Parameter is owned directly by an attention module (``nn.MultiheadAttention``
or a class whose name contains "Attention"/"Attn") is of kind ``"attention"``; a Parameter of a
``nn.Linear`` (a timm ``Attention``'s ``qkv``) keeps the module walk's ``"linear"``.

Without a probe, a Parameter inside a leaf (or anywhere, when there is no graph) is used where
nothing looks; each such floating-point Parameter of 2+ dims that no other way classified is named
in a note, since it may be a functional weight left in float without a row in the report.

A quantized weight that its op reads only through other ops computed from parameters alone
(weight standardization) is named in a note with those ops: the probe's record when it ran,
else the graph's reads followed to their op (which cannot see inside leaves).

The first and last layer of ``MSQConfig.quantization.first_last`` are decided here, once, for
every policy (``rewrite`` reads ``Discovery.fixed_width``): the first and the last, in execution
order, of the weights that survive ``exclude``, ``filter_fn`` and the dtype check. See
``_first_and_last``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import fx, nn

from msq_fx.config import MSQConfig

from .weight_uses import USE_OPS, graph_op_name, view_sources, weight_uses

__all__ = ["WeightTarget", "FloatWeight", "Discovery", "discover"]

_ATTENTION_CLASS_NAME = re.compile(r"attention|attn", re.IGNORECASE)


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
    """What discover found and decided.

    Attributes:
        targets: the weights to quantize, in execution order.
        float_weights: the conv / linear / attention weights left in float, with the reason.
        notes: what could not be checked, or is read through a transform.
        fixed_width: names of the targets whose width a policy fixes (never pruned; at
            ``first_last_bits``, or ``init_bits`` when that is None): the first and last
            layer under ``first_last="fixed"``, else empty.
    """

    targets: list[WeightTarget] = field(default_factory=list)
    float_weights: list[FloatWeight] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    fixed_width: frozenset[str] = frozenset()

    def leave_in_float(self, floats: Iterable[FloatWeight]) -> "Discovery":
        """A copy in which the targets named by ``floats`` are float leftovers instead.

        A fixed-width target among them is float now, and no other target is fixed in its place.
        """
        floats = list(floats)
        names = {f.name for f in floats}
        return replace(self, targets=[t for t in self.targets if t.name not in names],
                       float_weights=self.float_weights + floats, notes=list(self.notes),
                       fixed_width=self.fixed_width - names)


def discover(model: nn.Module, graph_module: fx.GraphModule | None, config: MSQConfig, *,
             probed: Mapping[str, str] | None = None,
             transformed: Mapping[str, Sequence[str]] | None = None,
             leaves: Iterable[str] = (),
             filter_fn: Callable[[nn.Module, str], bool] | None = None) -> Discovery:
    """Find the quantizable weights of ``model`` and apply the config's exclusions and policies.

    Args:
        graph_module: the traced graph, or None when none could be captured.
        probed: FQN -> kind of the Parameters an eager forward used as weights (the probe
            pass's ``ProbeResult.kinds``), or None when no probe ran.
        transformed: FQN -> the ops a Parameter went through before its weight operand (the
            probe's ``ProbeResult.transformed``); None when no probe ran, and then the graph's
            reads are followed instead (which cannot see inside leaves).
        leaves: FQNs of the submodules the graph keeps opaque (the trace pass's ``leaves``).
        filter_fn: ``filter_fn(module, fqn) -> bool`` (prepare's argument); False keeps that
            weight float.
    """
    names_of = _parameter_names(model)
    kinds = _kinds_from_modules(model)
    functional = dict(_kinds_from_graph(model, graph_module)) if graph_module is not None else {}
    for qualname, kind in (probed or {}).items():
        functional.setdefault(qualname, kind)
    for qualname, kind in functional.items():
        if _resolve_parameter(model, qualname) is not None:
            kinds.setdefault(qualname, _functional_kind(model, qualname, kind))
    order = _execution_order(model, graph_module, names_of, probed or {})
    found = _merge_tied(model, kinds, names_of, order)
    discovery = _apply_policies(model, found, config, filter_fn)
    discovery.float_weights.extend(_computed_weights(model))
    if probed is None:
        discovery.notes.extend(_unseen_uses_note(model, graph_module, leaves, found, names_of))
    if transformed is None and graph_module is not None:
        transformed = _transformed_in_graph(graph_module, discovery.targets)
    discovery.notes.extend(_transformed_weights_note(transformed or {}, discovery.targets))
    return discovery


# --------------------------------------------------------------------------- module walk

def _kinds_from_modules(model: nn.Module, *, parameters_only: bool = True) -> dict[str, str]:
    """FQN -> kind of each conv / linear / attention module's weight; with
    ``parameters_only=False`` also the weights that are not Parameters (computed)."""
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
    if not parameters_only:
        return kinds
    return {k: v for k, v in kinds.items() if _resolve_parameter(model, k) is not None}


def _computed_weights(model: nn.Module) -> list[FloatWeight]:
    """The conv / linear / attention weights that are computed, not Parameters (a
    parametrization such as weight_norm or spectral_norm, a hook that sets them): there is no
    tensor to quantize in place, so they stay float, said so rather than skipped silently."""
    reason = ("computed from other Parameters (a parametrization such as weight_norm or "
              "spectral_norm, or a hook), not a Parameter of its own, so it cannot be quantized "
              "in place; to quantize it, fold it into a plain weight first "
              "(torch.nn.utils.parametrize.remove_parametrizations, or "
              "torch.nn.utils.remove_weight_norm) and prepare that model")
    return [FloatWeight(name, kind, reason)
            for name, kind in _kinds_from_modules(model, parameters_only=False).items()
            if _resolve_parameter(model, name) is None
            and isinstance(_attribute(model, name), torch.Tensor)]


def _attribute(model: nn.Module, qualname: str):
    """What ``model.<qualname>`` reads (None where it does not exist)."""
    owner_name, _, attr = qualname.rpartition(".")
    try:
        return getattr(model.get_submodule(owner_name), attr, None)
    except (AttributeError, RuntimeError):
        return None


# --------------------------------------------------------------------------- graph

def _kinds_from_graph(model: nn.Module, graph_module: fx.GraphModule) -> dict[str, str]:
    kinds: dict[str, str] = {}
    for node in graph_module.graph.nodes:
        if node.op != "get_attr":
            continue
        param = _resolve_parameter(model, node.target)
        if param is None or param.dim() < 2:
            continue
        kind = _graph_use_kind(node, tuple(param.shape))
        if kind is not None:
            kinds[node.target] = kind
    return kinds


def _graph_use_kind(node: fx.Node, shape: tuple[int, ...]) -> str | None:
    """Kind of the first op that consumes ``node`` (or a view of it) as its weight operand.

    The graph has no shapes, so a view is taken to keep the Parameter's shape (exact for
    transposes, which is how projection weights are read; einsum checks its own subscripts).
    """
    chain, frontier, visited = {node}, list(node.users), set()
    while frontier:
        user = frontier.pop(0)
        if user in visited:
            continue
        visited.add(user)
        op = graph_op_name(user)
        if op is None:
            continue
        if op in USE_OPS:
            uses = weight_uses(op, user.args, user.kwargs,
                               lambda a: shape if isinstance(a, fx.Node) and a in chain else None)
            if uses:
                return uses[0][1]
        elif any(isinstance(s, fx.Node) and s in chain
                 for s in view_sources(op, user.args, user.kwargs)):
            chain.add(user)
            frontier.extend(user.users)
    return None


def _functional_kind(model: nn.Module, qualname: str, kind: str) -> str:
    """A functional linear use of a Parameter an attention module owns directly is attention."""
    if kind != "linear":
        return kind
    owner = model.get_submodule(qualname.rpartition(".")[0])
    return "attention" if _is_attention_module(owner) else kind


def _is_attention_module(module: nn.Module) -> bool:
    return isinstance(module, nn.MultiheadAttention) or any(
        _ATTENTION_CLASS_NAME.search(cls.__name__) for cls in type(module).__mro__
        if cls not in (nn.Module, object))


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
                     names_of: dict[int, list[str]], probed: Mapping[str, str]) -> dict[str, int]:
    """Rank of each parameter FQN: graph order where a graph exists, then the probe's order of
    first use, then module order."""
    order: dict[str, int] = {}
    first_use = {name: rank for rank, name in enumerate(probed)}
    if graph_module is not None:
        for node in graph_module.graph.nodes:
            if node.op == "call_module":  # a leaf's Parameters in probed order, then the rest
                nested = _named_direct_and_nested(model, node.target)
                for pname, _ in sorted(nested, key=lambda p: first_use.get(p[0], len(first_use))):
                    order.setdefault(pname, len(order))
            elif node.op == "get_attr":
                order.setdefault(node.target, len(order))
    for name in probed:
        order.setdefault(name, len(order))
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

def _apply_policies(model: nn.Module, found: list[WeightTarget], config: MSQConfig,
                    filter_fn: Callable[[nn.Module, str], bool] | None) -> Discovery:
    discovery = Discovery()
    reasons = {target.name: _exclusion_reason(model, target, config, filter_fn)
               for target in found}
    first_last = _first_and_last([t for t in found if reasons[t.name] is None])
    if config.quantization.first_last == "fixed":
        discovery.fixed_width = first_last
    for target in found:
        reason = reasons[target.name]
        if (reason is None and config.quantization.first_last == "float"
                and target.name in first_last):
            reason = "first/last layer kept float (MSQConfig.quantization.first_last='float')"
        if reason is None:
            discovery.targets.append(target)
        else:
            discovery.float_weights.append(FloatWeight(target.name, target.kind, reason))
    return discovery


def _first_and_last(kept: list[WeightTarget]) -> frozenset[str]:
    """The names of the first and last layer of ``MSQConfig.quantization.first_last``, among
    ``kept``.

    ``kept`` are the weights that ``exclude``, ``filter_fn`` and the dtype check leave to be
    quantized, in execution order. The policy exists to protect the layer that reads the raw
    input and the one that produces the output at the quantized model's edges, which are the
    most sensitive to a narrow width; once the user has excluded, say, the stem, the first
    *quantized* layer takes its place at that edge. Counting the excluded weight would let
    ``"float"`` protect nothing (the excluded weight is float already) while ``"fixed"`` protected
    its successor, so both policies use this one list. A weight that ``rewrite.unrewritable``
    refuses later stays float for its own reason; the policy does not move on to a neighbour.
    """
    return frozenset({kept[0].name, kept[-1].name}) if kept else frozenset()


def _exclusion_reason(model: nn.Module, target: WeightTarget, config: MSQConfig,
                      filter_fn: Callable[[nn.Module, str], bool] | None) -> str | None:
    param = _resolve_parameter(model, target.name)
    if not param.is_floating_point():
        return f"not a floating-point tensor ({param.dtype})"
    if param.numel() == 0:
        return f"empty tensor (shape {tuple(param.shape)}: no values to quantize)"
    for fqn in target.fqns:
        for pattern in config.quantization.exclude:
            if re.search(pattern, fqn):
                return f"excluded by MSQConfig.quantization.exclude pattern {pattern!r}"
        if filter_fn is not None:
            owner_name = fqn.rpartition(".")[0]
            if not filter_fn(model.get_submodule(owner_name), fqn):
                return "excluded by prepare's filter_fn"
    return None


# --------------------------------------------------------------------------- unseen uses

def _unseen_uses_note(model: nn.Module, graph_module: fx.GraphModule | None,
                      leaves: Iterable[str], found: list[WeightTarget],
                      names_of: dict[int, list[str]]) -> list[str]:
    """Without a probe: the 2+-dim floating-point Parameters whose uses nothing looked at."""
    if graph_module is None:
        scopes, where = [""], "the model has no FX graph"
    else:
        scopes, where = (sorted(set(leaves)),
                         "they live inside leaf modules the FX graph keeps opaque")
    classified = {fqn for target in found for fqn in target.fqns}
    unseen = []
    for fqns in names_of.values():
        param = _resolve_parameter(model, fqns[0])
        if (param is None or param.dim() < 2 or not param.is_floating_point()
                or classified.intersection(fqns)):
            continue
        if any(_is_inside(fqn, scope) for fqn in fqns for scope in scopes):
            unseen.append(fqns[0])
    if not unseen:
        return []
    shown = _listed(unseen)
    return [f"how these Parameters of 2+ dims are used was not seen ({where}, and no eager "
            f"probe ran: prepare() got no example_inputs, or probing them failed): {shown}. A "
            f"functional weight use among them (e.g. F.linear(x, self.w)) is missed and that "
            f"weight left in float without a report row; pass example_inputs to prepare() to "
            f"probe them."]


def _transformed_in_graph(graph_module: fx.GraphModule,
                          targets: list[WeightTarget]) -> dict[str, list[str]]:
    """FQN -> the ops between a target's graph reads and the conv / linear they reach, for the
    targets the graph reads (outside leaves) but never consumes as a weight through views only."""
    reads: dict[str, list[fx.Node]] = {}
    for node in graph_module.graph.nodes:
        if node.op == "get_attr":
            reads.setdefault(node.target, []).append(node)
    transformed: dict[str, list[str]] = {}
    for target in targets:
        nodes = [node for fqn in target.fqns for node in reads.get(fqn, ())]
        if not nodes or any(_graph_use_kind(node, target.shape) for node in nodes):
            continue  # read by its module call (opaque), or consumed as a weight directly
        ops = _ops_before_a_weight_use(nodes)
        if ops:
            transformed[target.name] = ops
    return transformed


def _transformed_weights_note(transformed: Mapping[str, Sequence[str]],
                              targets: list[WeightTarget]) -> list[str]:
    """A note on the quantized weights their conv / linear reads only through other ops.

    Weight standardization (timm's StdConv2d, ScaledStdConv2d) is the common case: the op runs
    on a float transform of the dequantized codes, so the codes are exact storage and the
    converted model matches, but an integer kernel cannot take the codes as they are.
    """
    names = [t.name for t in targets if any(fqn in transformed for fqn in t.fqns)]
    if not names:
        return []
    ops = sorted({op for t in targets for fqn in t.fqns for op in transformed.get(fqn, ())})
    return [f"quantized weights that reach their conv / linear through other ops "
            f"({', '.join(ops)}; e.g. weight standardization), {len(names)}: {_listed(names)}. "
            f"They are stored as n-bit codes and the converted model reproduces the fake-quant "
            f"output, but the op runs on the transformed float weights, which an integer kernel "
            f"cannot take as they are."]


def _ops_before_a_weight_use(reads: list[fx.Node], max_depth: int = 8) -> list[str]:
    """Names of the non-view ops between ``reads`` and the conv / linear they reach, or []."""
    seen, crossed, reached = set(reads), [], False
    frontier = [(user, 1) for node in reads for user in node.users]
    while frontier:
        node, depth = frontier.pop(0)
        if node in seen or depth > max_depth or node.op not in ("call_function", "call_method"):
            continue
        seen.add(node)
        op = graph_op_name(node)
        if op in USE_OPS:
            reached = True
            continue
        if op is None:
            name = node.target if isinstance(node.target, str) else getattr(
                node.target, "__name__", str(node.target))
            crossed.append(name)
        frontier.extend((user, depth + 1) for user in node.users)
    return sorted(set(crossed)) if reached else []


def _listed(names: list[str], shown: int = 8) -> str:
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more} more" if more > 0 else "")


def _is_inside(fqn: str, scope: str) -> bool:
    return scope == "" or fqn.startswith(scope + ".")
