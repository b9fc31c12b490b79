"""Specification of passes/weight_uses.py: which operand of a torch op is a weight, which ops are
views of their operand, and how callables and FX nodes are named.

``weight_uses`` only asks ``shape_of`` about operands, so most tests pass names as operands and a
dict of the shapes of the ones that come from Parameters."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from msq_fx.passes.weight_uses import (USE_OPS, VIEW_OPS, graph_op_name, op_name, view_sources,
                                       weight_uses)


def uses(op: str, *args, shapes: dict[str, tuple[int, ...]], **kwargs) -> list[tuple[str, str]]:
    return weight_uses(op, args, kwargs, shapes.get)


# ---------------------------------------------------------------- weight_uses


def test_the_weight_operand_of_linear_is_a_linear_weight():
    assert uses("linear", "x", "w", shapes={"w": (3, 4)}) == [("w", "linear")]


def test_the_input_of_linear_is_never_a_weight_even_when_it_is_a_parameter():
    assert uses("linear", "query", "w", shapes={"query": (1, 4)}) == []


def test_a_keyword_weight_operand_counts_like_a_positional_one():
    assert uses("linear", "x", weight="w", shapes={"w": (3, 4)}) == [("w", "linear")]


def test_an_operand_of_fewer_than_two_dims_is_never_a_weight():
    assert uses("linear", "x", "w", shapes={"w": (4,)}) == []


@pytest.mark.parametrize("groups, shape, kind", [
    (1, (8, 4, 3, 3), "conv"),
    (4, (8, 1, 3, 3), "depthwise"),  # one input channel per group
    (2, (8, 2, 3, 3), "conv"),  # grouped, two input channels per group
])
def test_the_weight_operand_of_conv_is_conv_or_depthwise(groups, shape, kind):
    assert uses("conv2d", "x", "w", None, 1, 0, 1, groups, shapes={"w": shape}) == [("w", kind)]


def test_a_transposed_conv_is_depthwise_when_each_group_has_one_input_channel():
    assert uses("conv_transpose2d", "x", "w", groups=4, shapes={"w": (4, 2, 3, 3)}) == [
        ("w", "depthwise")]


def test_attention_projection_weights_are_attention_weights_and_bias_k_is_not():
    shapes = {"w_in": (24, 8), "w_out": (8, 8), "bias_k": (1, 8)}
    found = uses("multi_head_attention_forward", in_proj_weight="w_in", out_proj_weight="w_out",
                 bias_k="bias_k", shapes=shapes)
    assert found == [("w_in", "attention"), ("w_out", "attention")]


@pytest.mark.parametrize("op, args", [
    ("matmul", ("x", "w")), ("mm", ("x", "w")), ("addmm", ("b", "x", "w")),
    ("bmm", ("x", "w")), ("__rmatmul__", ("w", "x")),
])
def test_the_right_hand_operand_of_a_matmul_is_a_linear_weight(op, args):
    assert uses(op, *args, shapes={"w": (4, 4)}) == [("w", "linear")]


def test_the_left_hand_operand_of_a_matmul_is_a_learned_token_not_a_weight():
    assert uses("matmul", "w", "x", shapes={"w": (4, 4)}) == []


def test_a_stack_of_matrices_is_a_weight_unless_a_leading_dim_is_one():
    assert uses("matmul", "x", "w", shapes={"w": (3, 4, 4)}) == [("w", "linear")]
    assert uses("matmul", "x", "w", shapes={"w": (1, 4, 4)}) == []  # a broadcast embedding


@pytest.mark.parametrize("equation, position, found", [
    ("bnd,de->bne", 1, True),  # d summed, e new: a projection
    ("de,bnd->bne", 0, True),  # any position
    ("bnd,nd->bn", 1, False),  # n shared with x: a per-token embedding
    ("...d,de->...e", 1, True),
    ("bd,...e->b", 1, False),  # operand written with ...
])
def test_an_einsum_operand_is_a_weight_when_it_sums_one_subscript_and_adds_one(
        equation, position, found):
    operands = ["x", "x"]
    operands[position] = "w"
    assert uses("einsum", equation, *operands, shapes={"w": (4, 5)}) == (
        [("w", "linear")] if found else [])


def test_scaled_dot_product_attention_has_no_weight_operand():
    assert "scaled_dot_product_attention" in USE_OPS
    shapes = dict.fromkeys("qkv", (4, 4))
    assert uses("scaled_dot_product_attention", "q", "k", "v", shapes=shapes) == []


# ---------------------------------------------------------------- view_sources


@pytest.mark.parametrize("op, args, sources", [
    ("transpose", ("w", 0, 1), ["w"]),
    ("t", ("w",), ["w"]),
    ("__getitem__", ("w", (slice(0, 2), 1)), ["w"]),
    ("cat", (["w", "v"], 0), ["w", "v"]),
])
def test_a_view_carries_the_values_of_its_sources(op, args, sources):
    assert view_sources(op, args, {}) == sources


def test_indexing_with_a_tensor_is_a_gather_not_a_view():
    assert view_sources("__getitem__", ("table", torch.tensor([0, 2])), {}) == []


def test_an_op_that_is_no_view_has_no_sources():
    assert "add" not in VIEW_OPS
    assert view_sources("add", ("w", "x"), {}) == []


# ---------------------------------------------------------------- naming


@pytest.mark.parametrize("func, name", [
    (F.linear, "linear"), (torch.matmul, "matmul"), (operator.matmul, "matmul"),
    (torch.Tensor.t, "t"), (torch.Tensor.T.__get__, "T"), (torch.add, None),
])
def test_op_name_names_the_callables_of_the_rules(func, name):
    assert op_name(func) == name


class TransposedProjection(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4))

    def forward(self, x):
        return (x @ self.w.T).relu()


def test_graph_op_name_names_view_and_use_nodes_and_nothing_else():
    graph = fx.symbolic_trace(TransposedProjection()).graph
    named = [(node.op, graph_op_name(node)) for node in graph.nodes]
    assert named == [("placeholder", None), ("get_attr", None), ("call_function", "T"),
                     ("call_function", "matmul"), ("call_method", None), ("output", None)]
