"""Precision groups (DESIGN.md §5): tied weights and declared groups share one decision, and the
sensitivity graph kept on the prepared model has the expected nodes and edges."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import msq_fx
import msq_fx.owners
from msq_fx import quant
from msq_fx.passes.group import assign_groups
from msq_fx.state import prepared_state


class SharedParameter(nn.Module):
    """Two Linear modules holding one Parameter (``b.weight is a.weight``), then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8, bias=False)
        self.b = nn.Linear(8, 8, bias=False)
        self.b.weight = self.a.weight
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.b(torch.relu(self.a(x))))


class CalledTwice(nn.Module):
    """One Linear module applied twice."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8, bias=False)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.fc(torch.relu(self.fc(x))))


class TiedEmbedding(nn.Module):
    """A language-model style head tied to the embedding (``head.weight is emb.weight``)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.mix = nn.Linear(8, 8, bias=False)
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(torch.relu(self.mix(self.emb(tokens).mean(1))))


class Chain(nn.Module):
    """l0 -> relu -> l1 -> relu -> l2, equal-sized square layers."""

    def __init__(self) -> None:
        super().__init__()
        self.l0 = nn.Linear(8, 8, bias=False)
        self.l1 = nn.Linear(8, 8, bias=False)
        self.l2 = nn.Linear(8, 8, bias=False)

    def forward(self, x):
        return self.l2(torch.relu(self.l1(torch.relu(self.l0(x)))))


class Parallel(nn.Module):
    """Three sibling layers on one input, outputs concatenated: no layer feeds another."""

    def __init__(self) -> None:
        super().__init__()
        self.p0 = nn.Linear(8, 8, bias=False)
        self.p1 = nn.Linear(8, 8, bias=False)
        self.p2 = nn.Linear(8, 8, bias=False)

    def forward(self, x):
        return torch.cat([self.p0(x), self.p1(x), self.p2(x)], dim=1)


X = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
TOKENS = torch.randint(16, (4, 5), generator=torch.Generator().manual_seed(0))


def prepare(model_cls, inputs=X, **config):
    torch.manual_seed(0)
    return msq_fx.prepare(model_cls(), inputs, msq_fx.MSQConfig.from_dict(config))


def weights(qmodel) -> dict[str, msq_fx.owners.QuantizedWeight]:
    return {w.name: w for w in msq_fx.owners.iter_quantized_weights(qmodel)}


def on_grid(shape, nonzero: float, seed: int = 0) -> torch.Tensor:
    """8-bit grid weights (max|w| = 1) with a fraction ``nonzero`` of odd codes: beta at p=1."""
    n = math.prod(shape)
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 128, (n,), generator=generator) * 2
    order = torch.randperm(n, generator=generator)
    codes[order[:round(nonzero * n)]] += 1
    codes[order[-1]] = 0
    return ((codes - 128).float() / 128).reshape(shape)


def set_latent(qmodel, name: str, values: torch.Tensor) -> None:
    with torch.no_grad():
        dict(qmodel.named_parameters())[name].copy_(values)


def groups_of(ctl) -> dict[str, list[str]]:
    return {g.name: [m.name for m in g.members] for g in ctl.groups}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------- tied weights

def test_a_parameter_shared_by_two_modules_is_quantized_once_by_one_quantizer():
    qmodel = prepare(SharedParameter)
    assert list(weights(qmodel)) == ["a.weight", "head.weight"]
    assert qmodel.a.weight_quantizer is qmodel.b.weight_quantizer
    assert qmodel.a.weight_quantizer.names == ("a.weight", "b.weight")
    assert qmodel.a._parameters["weight"] is qmodel.b._parameters["weight"]


def test_a_shared_parameter_forms_one_group_counted_once():
    ctl = msq_fx.MSQController(prepare(SharedParameter))
    assert groups_of(ctl) == {"a.weight": ["a.weight"], "head.weight": ["head.weight"]}
    assert {g.name: g.params for g in ctl.groups} == {"a.weight": 64, "head.weight": 32}
    assert ctl.compression() == pytest.approx(4.0)


def test_one_prune_decision_is_seen_by_both_uses_of_a_shared_parameter():
    qmodel = prepare(SharedParameter, prune_threshold=1.0, prune_interval=1,
                     target_compression=16.0, prune_step_policy="fixed")
    ctl = msq_fx.MSQController(qmodel)
    records = ctl.epoch_end(1, [], F.mse_loss)
    assert [r.group for r in records] == ["a.weight", "head.weight"]
    latent = qmodel.a._parameters["weight"].detach()
    expected = quant.quantize_value(latent, 7)
    assert torch.equal(qmodel.a.weight, expected) and torch.equal(qmodel.b.weight, expected)
    assert ctl.bit_widths() == {"a.weight": 7, "head.weight": 7}


def test_a_module_called_twice_is_one_weight_one_group_one_record():
    qmodel = prepare(CalledTwice, prune_threshold=1.0, prune_interval=1, target_compression=16.0)
    assert list(weights(qmodel)) == ["fc.weight", "head.weight"]
    ctl = msq_fx.MSQController(qmodel)
    data = [(X, torch.randn(4, 4, generator=torch.Generator().manual_seed(1)))]
    records = ctl.epoch_end(1, data, F.mse_loss)
    assert [(r.group, r.params) for r in records] == [("fc.weight", 64), ("head.weight", 32)]
    assert qmodel.fc.weight_quantizer.num_bits == 7
    assert len(torch.unique(qmodel.fc.weight)) <= 2**7


def test_an_embedding_tied_to_the_head_shares_the_heads_bits():
    qmodel = prepare(TiedEmbedding, inputs=TOKENS, prune_threshold=1.0, prune_interval=1,
                     target_compression=16.0, prune_step_policy="fixed")
    named = weights(qmodel)
    assert list(named) == ["emb.weight", "mix.weight"]
    assert named["emb.weight"].quantizer.names == ("emb.weight", "head.weight")
    assert qmodel.emb.weight_quantizer is qmodel.head.weight_quantizer
    ctl = msq_fx.MSQController(qmodel)
    assert [g.name for g in ctl.groups] == ["emb.weight", "mix.weight"]
    ctl.epoch_end(1, [], F.mse_loss)
    table = quant.quantize_value(qmodel.emb._parameters["weight"].detach(), 7)
    assert torch.equal(qmodel.head.weight, table)
    with torch.no_grad():
        assert torch.equal(qmodel.emb(TOKENS), F.embedding(TOKENS, table))


# ------------------------------------------------------------------------- declared groups

GROUP_0_2 = ((r"^l0\.", r"^l2\."),)


def test_declared_group_members_share_one_group_named_after_the_first_member():
    qmodel = prepare(Chain, groups=GROUP_0_2)
    assert {n: w.quantizer.group for n, w in weights(qmodel).items()} == {
        "l0.weight": "l0.weight", "l1.weight": "l1.weight", "l2.weight": "l0.weight"}
    ctl = msq_fx.MSQController(qmodel)
    assert groups_of(ctl) == {"l0.weight": ["l0.weight", "l2.weight"], "l1.weight": ["l1.weight"]}


def test_one_regex_matching_several_weights_declares_one_group():
    qmodel = prepare(Chain, groups=((r"l[12]\.weight$",),))
    assert groups_of(msq_fx.MSQController(qmodel)) == {
        "l0.weight": ["l0.weight"], "l1.weight": ["l1.weight", "l2.weight"]}


def test_separate_group_entries_make_separate_groups():
    qmodel = prepare(Parallel, groups=((r"^p0\.",), (r"^p1\.", r"^p2\.")))
    assert groups_of(msq_fx.MSQController(qmodel)) == {
        "p0.weight": ["p0.weight"], "p1.weight": ["p1.weight", "p2.weight"]}


@pytest.mark.parametrize("declared, expected_bits", [
    (GROUP_0_2, {"l0.weight": 7, "l1.weight": 8, "l2.weight": 7}),  # pooled beta 0.25 < 0.3
    ((), {"l0.weight": 7, "l1.weight": 8, "l2.weight": 8}),         # l2 alone: beta 0.5
])
def test_a_declared_group_is_decided_on_the_beta_pooled_over_its_members(declared, expected_bits):
    qmodel = prepare(Chain, groups=declared, prune_threshold=0.3, prune_interval=1,
                     target_compression=16.0, prune_step_policy="fixed")
    for name, beta in (("l0.weight", 0.0), ("l1.weight", 0.5), ("l2.weight", 0.5)):
        set_latent(qmodel, name, on_grid((8, 8), beta, seed=int(name[1])))
    ctl = msq_fx.MSQController(qmodel)
    records = ctl.epoch_end(1, [], F.mse_loss)
    bits = {n: w.quantizer.num_bits for n, w in weights(qmodel).items()}
    assert bits == expected_bits
    if declared:
        pooled = next(r for r in records if r.group == "l0.weight")
        assert (pooled.params, pooled.beta) == (128, pytest.approx(0.25))


def test_a_declared_group_gets_one_prune_step_from_its_summed_omega():
    qmodel = prepare(Chain, groups=GROUP_0_2, prune_threshold=1.0, prune_interval=1,
                     target_compression=16.0)
    ctl = msq_fx.MSQController(qmodel)
    data = [(X, torch.randn(4, 8, generator=torch.Generator().manual_seed(1)))]
    records = ctl.epoch_end(1, data, F.mse_loss)
    assert [r.group for r in records] == ["l0.weight", "l1.weight"]
    mean = sum(r.omega for r in records) / 2
    group_p = {r.group: r.next_prune_step for r in records}
    assert group_p == {r.group: 2 if r.omega < mean else 1 for r in records}
    steps = {n: int(w.quantizer.prune_step) for n, w in weights(qmodel).items()}
    assert steps["l0.weight"] == steps["l2.weight"] == group_p["l0.weight"]


def test_group_members_starting_at_different_widths_are_aligned_to_the_smallest():
    qmodel = prepare(Chain, groups=GROUP_0_2)
    qmodel.l2.weight_quantizer.bits.fill_(5)
    ctl = msq_fx.MSQController(qmodel)
    assert qmodel.l0.weight_quantizer.num_bits == qmodel.l2.weight_quantizer.num_bits == 5
    assert ctl.bit_widths() == {"l0.weight": 5, "l1.weight": 8}


def test_regularization_of_a_group_is_the_sum_over_its_members():
    grouped = msq_fx.MSQController(prepare(Chain, groups=GROUP_0_2, reg_strength=1e-3))
    single = msq_fx.MSQController(prepare(Chain, reg_strength=1e-3))
    assert grouped.regularization().item() == pytest.approx(single.regularization().item(),
                                                            rel=1e-6)


# ------------------------------------------------------------------------- sensitivity graph

def edges(graph) -> dict[frozenset, str]:
    return {frozenset((a, b)): rel for a, b, rel in graph.edges(data="relation")}


def test_sensitivity_graph_of_a_chain_has_a_dataflow_edge_per_consecutive_pair():
    graph = prepared_state(prepare(Chain)).sensitivity_graph
    assert list(graph.nodes) == ["l0.weight", "l1.weight", "l2.weight"]
    assert [graph.nodes[n]["rank"] for n in graph.nodes] == [0, 1, 2]
    assert all(graph.nodes[n]["kind"] == "linear" and graph.nodes[n]["params"] == 64
               and graph.nodes[n]["tied"] is False for n in graph.nodes)
    assert edges(graph) == {frozenset(("l0.weight", "l1.weight")): "dataflow",
                            frozenset(("l1.weight", "l2.weight")): "dataflow"}


def test_dataflow_edges_do_not_merge_groups():
    graph = prepared_state(prepare(Chain)).sensitivity_graph
    assert assign_groups(graph) == {n: n for n in graph.nodes}


def test_sensitivity_graph_adds_a_declared_edge_for_a_declared_group():
    graph = prepared_state(prepare(Chain, groups=GROUP_0_2)).sensitivity_graph
    assert edges(graph) == {frozenset(("l0.weight", "l1.weight")): "dataflow",
                            frozenset(("l1.weight", "l2.weight")): "dataflow",
                            frozenset(("l0.weight", "l2.weight")): "declared"}
    assert assign_groups(graph) == {"l0.weight": "l0.weight", "l1.weight": "l1.weight",
                                    "l2.weight": "l0.weight"}


def test_a_declared_edge_takes_precedence_over_a_dataflow_edge_on_the_same_pair():
    graph = prepared_state(prepare(Chain, groups=((r"^l[01]\.",),))).sensitivity_graph
    assert edges(graph)[frozenset(("l0.weight", "l1.weight"))] == "declared"
    assert graph.number_of_edges() == 2


def test_sibling_layers_have_no_dataflow_edges():
    graph = prepared_state(prepare(Parallel)).sensitivity_graph
    assert set(graph.nodes) == {"p0.weight", "p1.weight", "p2.weight"}
    assert graph.number_of_edges() == 0


def test_with_quantized_activations_an_embedding_tied_to_the_head_reads_its_token_ids():
    qmodel = prepare(TiedEmbedding, inputs=TOKENS, quantization={"act_bits": 8})
    assert not hasattr(qmodel.emb, "input_quantizer") and hasattr(qmodel.head, "input_quantizer")
    qmodel.eval()
    with torch.no_grad():
        assert torch.equal(qmodel(TOKENS), msq_fx.convert(qmodel)(TOKENS))


def test_a_shared_parameter_is_one_tied_node_without_a_self_loop():
    graph = prepared_state(prepare(SharedParameter)).sensitivity_graph
    assert list(graph.nodes) == ["a.weight", "head.weight"]
    node = graph.nodes["a.weight"]
    assert node["fqns"] == ("a.weight", "b.weight") and node["tied"] is True
    assert node["params"] == 64
    assert edges(graph) == {frozenset(("a.weight", "head.weight")): "dataflow"}


def test_a_module_called_twice_is_one_untied_node_without_a_self_loop():
    graph = prepared_state(prepare(CalledTwice)).sensitivity_graph
    assert graph.nodes["fc.weight"]["fqns"] == ("fc.weight",)
    assert graph.nodes["fc.weight"]["tied"] is False
    assert edges(graph) == {frozenset(("fc.weight", "head.weight")): "dataflow"}


def test_excluded_weights_are_not_nodes_of_the_sensitivity_graph():
    graph = prepared_state(prepare(Chain, exclude=(r"^l1\.",))).sensitivity_graph
    assert list(graph.nodes) == ["l0.weight", "l2.weight"]
    # data flow is traced through the float layer to the next quantized one
    assert edges(graph) == {frozenset(("l0.weight", "l2.weight")): "dataflow"}


def test_a_declared_group_joining_a_fixed_first_layer_with_a_pruned_one_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    config = msq_fx.MSQConfig(quantization={"init_bits": 6, "first_last": "fixed",
                                            "first_last_bits": 8,
                                            "groups": ((r"^0\.", r"^2\."),)})
    with pytest.raises(msq_fx.MSQError, match=r"group '0\.weight' joins 0\.weight \(held by "
                                              r"first_last='fixed'\) with 2\.weight.*leave the "
                                              r"fixed layers out of the groups"):
        msq_fx.prepare(model, torch.randn(3, 4), config)
