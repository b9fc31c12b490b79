"""Sensitivity-grouping pass: decide which quantized weights share one precision decision.

Reads: the discovered targets, the FX graph (when one was captured) and
``config.quantization.groups``.
Returns: a networkx graph over the quantized weights (node = a weight's first FQN) with edges
* ``relation="declared"``: weights matched by one ``MSQConfig.groups`` entry;
* ``relation="dataflow"``: a weight's layer feeds the next quantized layer (reporting only).
A weight reached from several places (tied or reused modules) is one tensor and hence one node
already. ``assign_groups`` turns the non-dataflow connected components into group names.
Changes nothing.
"""
from __future__ import annotations

import re

import networkx as nx
from torch import fx

from msq_fx.config import MSQConfig

from .discover import WeightTarget

__all__ = ["build_sensitivity_graph", "assign_groups", "groups_across_fixed_widths"]

DECLARED, DATAFLOW = "declared", "dataflow"


def build_sensitivity_graph(targets: list[WeightTarget], graph_module: fx.GraphModule | None,
                            config: MSQConfig) -> nx.Graph:
    graph = nx.Graph()
    for rank, target in enumerate(targets):
        graph.add_node(target.name, kind=target.kind, params=target.numel, fqns=target.fqns,
                       rank=rank, tied=len(target.fqns) > 1)
    _add_declared_edges(graph, targets, config)
    if graph_module is not None:
        _add_dataflow_edges(graph, targets, graph_module)
    return graph


def assign_groups(graph: nx.Graph) -> dict[str, str]:
    """Weight name -> group name (the group's first member in execution order)."""
    decisions = nx.Graph()
    decisions.add_nodes_from(graph.nodes)
    decisions.add_edges_from((a, b) for a, b, rel in graph.edges(data="relation")
                             if rel == DECLARED)
    groups: dict[str, str] = {}
    for component in nx.connected_components(decisions):
        leader = min(component, key=lambda name: graph.nodes[name]["rank"])
        groups.update({name: leader for name in component})
    return groups


def _add_declared_edges(graph: nx.Graph, targets: list[WeightTarget], config: MSQConfig) -> None:
    for patterns in config.quantization.groups:
        members = [t.name for t in targets
                   if any(re.search(p, fqn) for p in patterns for fqn in t.fqns)]
        graph.add_edges_from(zip(members, members[1:]), relation=DECLARED)


def _add_dataflow_edges(graph: nx.Graph, targets: list[WeightTarget],
                        graph_module: fx.GraphModule) -> None:
    weight_of_node = _weight_nodes(targets, graph_module)
    for node, name in weight_of_node.items():
        for downstream in _next_weight_nodes(node, weight_of_node):
            other = weight_of_node[downstream]
            if other != name and not graph.has_edge(name, other):
                graph.add_edge(name, other, relation=DATAFLOW)


def _weight_nodes(targets: list[WeightTarget], graph_module: fx.GraphModule) -> dict[fx.Node, str]:
    """Graph nodes that apply a quantized weight: the owner's call_module or the get_attr."""
    owner_of, param_of = {}, {}
    for target in targets:
        for fqn in target.fqns:
            param_of[fqn] = target.name
            owner_of.setdefault(fqn.rpartition(".")[0], target.name)
    nodes: dict[fx.Node, str] = {}
    for node in graph_module.graph.nodes:
        if node.op == "call_module" and node.target in owner_of:
            nodes[node] = owner_of[node.target]
        elif node.op == "get_attr" and node.target in param_of:
            nodes[node] = param_of[node.target]
    return nodes


def _next_weight_nodes(start: fx.Node, weight_nodes: dict[fx.Node, str]) -> set[fx.Node]:
    found, frontier, seen = set(), list(start.users), set()
    while frontier:
        node = frontier.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in weight_nodes:
            found.add(node)
        else:
            frontier.extend(node.users)
    return found


def groups_across_fixed_widths(groups: dict[str, str], fixed_width: set[str]) -> list[str]:
    """Each group that joins a weight whose width a policy fixes (``first_last="fixed"``) with
    weights that prune, described. Reads ``assign_groups``' output and the discovery's
    ``fixed_width``; changes nothing. A group shares one width and one decision, so such a
    group would either move the fixed layer or stop its partners from pruning."""
    members: dict[str, list[str]] = {}
    for weight, group in groups.items():
        members.setdefault(group, []).append(weight)
    mixed = []
    for group, names in members.items():
        fixed = [name for name in names if name in fixed_width]
        if fixed and len(fixed) < len(names):
            others = [name for name in names if name not in fixed_width]
            mixed.append(f"group {group!r} joins {', '.join(fixed)} (held by "
                         f"first_last='fixed') with {', '.join(others)}")
    return mixed
