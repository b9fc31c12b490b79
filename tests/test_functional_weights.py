"""Weights used functionally (F.linear / matmul / conv on a Parameter), inside leaves or not,
weights whose owner cannot carry a quantizer, and tied weights."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from timm.models.beit import Attention as BeitAttention
from timm.models.beit import Beit
from torch import nn

import msq_fx
from conftest import eval_output, expected_weight_names, reported_names
from msq_fx.passes.probe import ProbeError, probe
from msq_fx.report import LayerRow

X = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(0))


def layers(qmodel: nn.Module) -> dict[str, LayerRow]:
    return {row.name: row for row in msq_fx.report(qmodel).layers}


def fake_quant_equals_converted(qmodel: nn.Module, inputs) -> bool:
    fake_quant, lowered = eval_output(qmodel, inputs), eval_output(msq_fx.convert(qmodel), inputs)
    return bool((fake_quant - lowered).abs().max() <= 1e-5 * fake_quant.abs().max())


class FunctionalLinear(nn.Module):
    """Owns a bare weight and applies it with F.linear."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(16, 8))

    def forward(self, x):
        return F.linear(x, self.weight)


class Net(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.head = nn.Linear(inner_features(inner, X), 3)

    def forward(self, x):
        return self.head(self.inner(x))


def inner_features(inner: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad():
        return inner(x).shape[-1]


# A functional use is found by the graph when the module traces, by the probe when it is a leaf.
PATHS = {"graph": ((), None), "probe": (("inner",), X)}


def prepare_via(path: str, inner: nn.Module, inputs=None) -> nn.Module:
    torch.manual_seed(0)
    leaf_modules, example = PATHS[path]
    return msq_fx.prepare(Net(inner), example if inputs is None else inputs,
                          leaf_modules=leaf_modules)


# ---------------------------------------------------------------- functional uses


def test_f_linear_weight_of_a_traceable_module_is_quantized_without_example_inputs():
    qmodel = prepare_via("graph", FunctionalLinear())
    assert layers(qmodel)["inner.weight"].kind == "linear"
    assert not msq_fx.report(qmodel).notes


def test_f_linear_weight_inside_a_user_leaf_is_found_by_the_probe():
    qmodel = prepare_via("probe", FunctionalLinear())
    assert layers(qmodel)["inner.weight"].kind == "linear"
    latent = qmodel.inner._parameters["weight"]
    assert torch.equal(qmodel.inner.weight, msq_fx.quant.quantize_value(latent.detach(), 8))
    assert fake_quant_equals_converted(qmodel, X)


def test_use_inside_a_leaf_without_example_inputs_is_noted_and_warned(caplog):
    with caplog.at_level(logging.WARNING, logger="msq_fx"):
        qmodel = msq_fx.prepare(Net(FunctionalLinear()), None, leaf_modules=("FunctionalLinear",))
    report = msq_fx.report(qmodel)
    assert "inner.weight" not in layers(qmodel)
    assert len(report.notes) == 1 and "inner.weight" in report.notes[0]
    assert "example_inputs" in report.notes[0] and "note: " in report.table()
    assert any("inner.weight" in record.getMessage() for record in caplog.records)


class MatmulProjection(nn.Module):
    """CLIP-style ``x @ self.proj`` with a (in, out) Parameter."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Parameter(torch.randn(8, 6))

    def forward(self, x):
        return torch.matmul(x, self.proj)


@pytest.mark.parametrize("path", PATHS)
def test_right_operand_of_matmul_is_a_linear_weight(path):
    assert layers(prepare_via(path, MatmulProjection()))["inner.proj"].kind == "linear"


class FunctionalConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_w = nn.Parameter(torch.randn(6, 4, 3, 3))
        self.dw_w = nn.Parameter(torch.randn(6, 1, 3, 3))

    def forward(self, x):
        image = x.reshape(x.shape[0], 4, 4, 2)
        y = F.conv2d(F.conv2d(image, self.conv_w, padding=1), self.dw_w, padding=1, groups=6)
        return y.flatten(1)


@pytest.mark.parametrize("path", PATHS)
def test_f_conv2d_weight_is_conv_and_one_channel_per_group_is_depthwise(path):
    rows = layers(prepare_via(path, FunctionalConv()))
    assert (rows["inner.conv_w"].kind, rows["inner.dw_w"].kind) == ("conv", "depthwise")


class OwnAttention(nn.Module):
    """An attention module owning its fused projection weight directly."""

    def __init__(self):
        super().__init__()
        self.qkv_weight = nn.Parameter(torch.randn(24, 8))

    def forward(self, x):
        q, k, v = F.linear(x, self.qkv_weight.t().t()).chunk(3, dim=-1)
        return F.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("path", PATHS)
def test_functional_weight_owned_by_an_attention_module_is_attention(path):
    assert layers(prepare_via(path, OwnAttention()))["inner.qkv_weight"].kind == "attention"


class TokensAndBiases(nn.Module):
    """Parameters that are consumed next to weights but are not weights, plus one real weight."""

    def __init__(self):
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, 8))
        self.pos_embed = nn.Parameter(torch.randn(1, 5, 8))
        self.bias_table = nn.Parameter(torch.randn(9, 1))
        self.register_buffer("bias_index", torch.randint(0, 9, (5, 5)))
        self.gamma = nn.Parameter(torch.ones(8))
        self.query = nn.Parameter(torch.randn(1, 8))
        self.token_embed = nn.Parameter(torch.randn(5, 8))
        self.memory = nn.Parameter(torch.randn(1, 5, 8))
        self.mix = nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        scores = x @ x.transpose(-2, -1) + self.bias_table[self.bias_index].squeeze(-1)
        x = scores.softmax(-1) @ x * self.gamma
        pooled = self.query @ x.transpose(-2, -1)             # a learned query: left operand
        per_token = torch.einsum("bnd,nd->bn", x, self.token_embed)  # n is shared with x
        memory = F.scaled_dot_product_attention(x, self.memory, self.memory)
        x = torch.einsum("bnd,de->bne", x + memory, self.mix)  # the one projection
        return x + pooled.transpose(-2, -1) + per_token[..., None]


@pytest.mark.parametrize("path", PATHS)
def test_tokens_embeddings_bias_tables_and_gammas_are_not_quantized(path):
    qmodel = prepare_via(path, TokensAndBiases())
    assert set(layers(qmodel)) == {"inner.mix", "head.weight"}
    assert not msq_fx.report(qmodel).float_weights


def tiny_beit() -> nn.Module:
    torch.manual_seed(0)
    return Beit(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10,
                use_rel_pos_bias=True, init_values=0.1)


IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_probe_sees_beit_qkv_weight_used_by_f_linear_inside_its_attention():
    result = probe(tiny_beit(), (IMAGES,))
    assert result.kinds["blocks.0.attn.qkv.weight"] == "linear"
    assert result.users["blocks.0.attn.qkv.weight"] == "blocks.0.attn"
    assert "blocks.0.attn.relative_position_bias_table" not in result.kinds


@pytest.mark.parametrize("leaf_modules", [(), (BeitAttention,)], ids=["traced", "attention-leaf"])
def test_tiny_beit_quantizes_every_linear_weight_and_converts_exactly(leaf_modules):
    model = tiny_beit()
    qmodel = msq_fx.prepare(model, IMAGES, leaf_modules=leaf_modules)
    report = msq_fx.report(qmodel)
    assert reported_names(qmodel) == expected_weight_names(model)
    assert not report.float_weights and not report.notes
    assert fake_quant_equals_converted(qmodel, IMAGES)


# ---------------------------------------------------------------- owners that cannot be rewritten


class ContainerOwned(nn.Module):
    """An nn.Sequential owning a weight directly, applied functionally by the parent."""

    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.ReLU())
        self.seq.register_parameter("proj", nn.Parameter(torch.randn(8, 8)))
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(F.linear(self.seq(x), self.seq.proj))


def test_container_owning_a_used_weight_leaves_it_in_float_with_the_reason():
    model = ContainerOwned()
    qmodel = msq_fx.prepare(model, X)
    report = msq_fx.report(qmodel)
    assert [(f.name, f.kind) for f in report.float_weights] == [("seq.proj", "linear")]
    assert "'seq' (Sequential) is a container" in report.float_weights[0].reason
    assert set(layers(qmodel)) == {"fc.weight"}
    assert type(qmodel.seq) is nn.Sequential
    assert torch.equal(qmodel.seq.proj, model.seq.proj)


def test_on_unquantizable_error_raises_naming_the_weight_and_the_reason():
    model = ContainerOwned()
    with pytest.raises(msq_fx.MSQError, match=r"seq\.proj: .*container"):
        msq_fx.prepare(model, X, msq_fx.MSQConfig(quantization=dict(on_unquantizable="error")),
                       inplace=True)
    assert type(model.fc) is nn.Linear and not hasattr(model.fc, "weight_quantizer")


class PropertyOwned(nn.Module):
    """Reads its registered weight through a property of its class."""

    def __init__(self):
        super().__init__()
        self._parameters["weight"] = nn.Parameter(torch.randn(8, 8))

    @property
    def weight(self):
        return self._parameters["weight"]

    def forward(self, x):
        return F.linear(x, self.weight)


def test_weight_its_class_defines_as_a_property_is_left_in_float_with_the_reason():
    report = msq_fx.report(msq_fx.prepare(Net(PropertyOwned()), X))
    assert [(f.name, f.kind) for f in report.float_weights] == [("inner.weight", "linear")]
    assert "property" in report.float_weights[0].reason


# ---------------------------------------------------------------- shared weights


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_tied_weight_is_quantized_once_and_both_owners_read_the_same_quantized_tensor():
    qmodel = msq_fx.prepare(Tied(), X)
    assert [(r.name, r.shared_with) for r in msq_fx.report(qmodel).layers] == [
        ("a.weight", ("b.weight",))]
    assert qmodel.a.weight_quantizer is qmodel.b.weight_quantizer
    latent = qmodel.a._parameters["weight"]
    assert latent is qmodel.b._parameters["weight"]
    assert torch.equal(qmodel.b.weight, msq_fx.quant.quantize_value(latent.detach(), 8))
    assert torch.equal(qmodel.a.weight, qmodel.b.weight)
    int_model = msq_fx.convert(qmodel)
    assert int_model.a.weight_quantizer is int_model.b.weight_quantizer
    assert fake_quant_equals_converted(qmodel, X)


class Reused(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = self.a  # one module under two names

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_module_registered_under_two_names_is_rewritten_once():
    qmodel = msq_fx.prepare(Reused(), X)
    assert type(qmodel.a).__bases__ == (nn.Linear,)
    assert [(r.name, r.shared_with) for r in msq_fx.report(qmodel).layers] == [
        ("a.weight", ("b.weight",))]
    assert fake_quant_equals_converted(qmodel, X)


class TiedToContainer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.seq = nn.Sequential(nn.ReLU())
        self.seq.register_parameter("proj", self.fc.weight)

    def forward(self, x):
        return F.linear(self.fc(x), self.seq.proj)


def test_tied_weight_with_one_unrewritable_owner_stays_float_under_every_name():
    qmodel = msq_fx.prepare(TiedToContainer(), X)
    report = msq_fx.report(qmodel)
    assert not report.layers and type(qmodel.fc) is nn.Linear
    assert [f.name for f in report.float_weights] == ["fc.weight"]
    assert "tied to seq.proj" in report.float_weights[0].reason


# ---------------------------------------------------------------- the probe pass itself


# ---------------------------------------------------------------- weights transformed before use


class StandardizedLinear(nn.Linear):
    """A linear layer that standardizes its weight per output row before using it, as timm's
    StdConv2d does for convs."""

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_features, -1), None, None,
                              training=True, momentum=0.0, eps=1e-6).reshape_as(self.weight)
        return F.linear(x, weight, self.bias)


class ActivationScaledLinear(nn.Module):
    """Scales its weight by a statistic of the input: the weight operand is an activation."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 8))

    def forward(self, x):
        return F.linear(x, self.weight * x.abs().mean())


TRANSFORMED_NOTE = "reach their conv / linear through other ops (batch_norm"


@pytest.mark.parametrize("path", PATHS)
def test_a_weight_standardized_before_use_is_quantized_and_noted(path):
    qmodel = prepare_via(path, StandardizedLinear(8, 6))
    assert layers(qmodel)["inner.weight"].kind == "linear"
    notes = [note for note in msq_fx.report(qmodel).notes if TRANSFORMED_NOTE in note]
    assert len(notes) == 1 and "weight standardization), 1: inner.weight. " in notes[0]
    assert fake_quant_equals_converted(qmodel, X)


@pytest.mark.parametrize("path", PATHS)
def test_weights_used_as_they_are_get_no_transform_note(path):
    qmodel = prepare_via(path, FunctionalLinear())
    assert not any(TRANSFORMED_NOTE in note for note in msq_fx.report(qmodel).notes)


def test_probe_names_the_ops_between_a_parameter_and_its_weight_operand():
    result = probe(Net(StandardizedLinear(8, 6)), (X,))
    assert result.transformed == {"inner.weight": ("batch_norm",)}
    assert "inner.weight" not in result.kinds  # not a use as it is: its kind comes from the class


def test_probe_does_not_count_a_weight_mixed_with_an_activation_as_transformed():
    result = probe(Net(ActivationScaledLinear()), (X,))
    assert result.transformed == {} and "inner.weight" not in result.kinds


def test_probe_restores_training_flags_and_removes_its_hooks():
    model = Net(FunctionalLinear()).train()
    model.inner.eval()
    probe(model, (X,))
    assert model.training and model.head.training and not model.inner.training
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


class Failing(nn.Module):
    def forward(self, x):
        raise ValueError("boom")


def test_probe_error_names_the_innermost_module_that_raised():
    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.ReLU(), Failing()))
    with pytest.raises(ProbeError, match=r"module '1\.1' \(Failing\) raised ValueError: boom"):
        probe(model, (X,))


class ModeAllergic(nn.Module):
    """Runs, but refuses to run under a TorchFunctionMode."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        if torch._C._is_torch_function_mode_enabled():
            raise RuntimeError("no torch function modes here")
        return self.fc(x)


def test_a_failing_probe_falls_back_to_the_graph_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="msq_fx"):
        qmodel = msq_fx.prepare(ModeAllergic(), X)
    assert set(layers(qmodel)) == {"fc.weight"}
    assert any("probe failed" in record.getMessage() for record in caplog.records)


def test_prepare_does_not_modify_a_model_with_functional_and_unrewritable_weights():
    model = ContainerOwned()
    before = copy.deepcopy(model.state_dict())
    msq_fx.prepare(model, X)
    assert [type(m) for m in model.modules()] == [type(m) for m in ContainerOwned().modules()]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("wrap", [
    torch.nn.utils.parametrizations.weight_norm,
    torch.nn.utils.parametrizations.spectral_norm,
    pytest.param(torch.nn.utils.weight_norm, marks=pytest.mark.filterwarnings(
        "ignore:.*weight_norm.* is deprecated:FutureWarning")),
], ids=["weight_norm", "spectral_norm", "old_weight_norm"])
def test_a_computed_weight_is_reported_in_float_with_how_to_quantize_it(wrap):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), wrap(nn.Linear(8, 8)), nn.ReLU(),
                          nn.Linear(8, 2))
    qmodel = msq_fx.prepare(model, torch.randn(3, 8))
    report = msq_fx.report(qmodel)
    assert sorted(layers(qmodel)) == ["0.weight", "4.weight"]
    assert [(f.name, f.kind) for f in report.float_weights] == [("2.weight", "linear")]
    assert "not a Parameter of its own" in report.float_weights[0].reason
    assert "remove_parametrizations" in report.float_weights[0].reason
