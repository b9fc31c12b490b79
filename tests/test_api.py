"""prepare() / convert(): copy semantics, modes, persistence and the errors users see."""
from __future__ import annotations

import contextlib
import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import msq_fx
import msq_fx.modules
import msq_fx.owners
import msq_fx.weight_cache
from conftest import eval_output


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return msq_fx.SmallCNN(in_channels=1, width=8)


X = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))


def test_prepare_does_not_modify_the_given_model():
    model = small_cnn()
    before = copy.deepcopy(model.state_dict())
    classes = [type(m) for m in model.modules()]
    qmodel = msq_fx.prepare(model, X)
    assert qmodel is not model
    assert [type(m) for m in model.modules()] == classes
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert before.keys() == model.state_dict().keys()


def test_prepare_keeps_the_training_mode_of_every_module():
    model = small_cnn().train()
    model.features[1].eval()  # a frozen BatchNorm must stay frozen
    qmodel = msq_fx.prepare(model, X)
    assert qmodel.training and not qmodel.features[1].training and qmodel.features[5].training
    assert model.training and not model.features[1].training


def test_prepared_model_keeps_state_dict_keys_of_the_float_model():
    model = small_cnn()
    keys = set(model.state_dict())
    qkeys = set(msq_fx.prepare(model, X).state_dict())
    assert keys <= qkeys
    assert all(k.endswith(("_quantizer.bits", "_quantizer.prune_step")) for k in qkeys - keys)


def test_prepared_weights_are_quantized_at_init_bits():
    qmodel = msq_fx.prepare(small_cnn(), X)
    for weight in msq_fx.owners.iter_quantized_weights(qmodel):
        seen = weight.owner.weight
        latent = weight.latent
        assert weight.quantizer.num_bits == 8
        assert torch.equal(seen, msq_fx.quant.quantize_value(latent.detach(), 8))
        assert len(torch.unique(seen)) <= 256


@pytest.mark.parametrize("stage", ["prepared", "converted"])
def test_models_survive_pickling_with_identical_outputs(stage):
    qmodel = msq_fx.prepare(small_cnn(), X)
    model = qmodel if stage == "prepared" else msq_fx.convert(qmodel)
    restored = pickle.loads(pickle.dumps(model))
    assert torch.equal(eval_output(model, X), eval_output(restored, X))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    assert torch.equal(eval_output(model, X),
                       eval_output(torch.load(buffer, weights_only=False), X))


def _train_and_validate(qmodel: nn.Module, cache: bool) -> list[torch.Tensor]:
    """Three SGD steps, each followed by an eval-mode forward; the whole run inside a cache block
    when ``cache``. Returns the eval outputs."""
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=0.1)
    target = torch.tensor([0, 1, 2, 3])
    outputs = []
    with (msq_fx.weight_cache.cached_quantized_weights(qmodel) if cache
          else contextlib.nullcontext()):
        for _ in range(3):
            loss = F.cross_entropy(qmodel(X), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            outputs.append(eval_output(qmodel, X))
    return outputs


def test_cached_validation_sees_every_optimizer_step():
    cached = _train_and_validate(msq_fx.prepare(small_cnn(), X), cache=True)
    plain = _train_and_validate(msq_fx.prepare(small_cnn(), X), cache=False)
    assert all(torch.equal(a, b) for a, b in zip(cached, plain))
    assert not torch.equal(cached[0], cached[-1])


def test_cached_weights_of_frozen_layers_give_the_same_gradients_to_the_trained_ones():
    def head_gradient(cache: bool) -> torch.Tensor:
        qmodel = msq_fx.prepare(small_cnn(), X)
        head = list(qmodel.parameters())[-2:]
        for parameter in list(qmodel.parameters())[:-2]:
            parameter.requires_grad_(False)
        with (msq_fx.weight_cache.cached_quantized_weights(qmodel) if cache
              else contextlib.nullcontext()):
            for _ in range(2):  # the second pass is served from the cache
                qmodel.zero_grad()
                qmodel(X).square().mean().backward()
        return head[0].grad

    assert torch.equal(head_gradient(cache=True), head_gradient(cache=False))


def _train_a_little(qmodel: nn.Module) -> None:
    controller = msq_fx.MSQController(qmodel)
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=0.1)
    target = torch.tensor([0, 1, 2, 3])
    for _ in range(3):
        loss = F.cross_entropy(qmodel(X), target) + controller.regularization()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for weight in msq_fx.owners.iter_quantized_weights(qmodel):
        weight.quantizer.bits.fill_(5)


def test_prepared_model_survives_a_state_dict_round_trip():
    trained = msq_fx.prepare(small_cnn(), X)
    _train_a_little(trained)
    fresh = msq_fx.prepare(small_cnn(), X)
    fresh.load_state_dict(trained.state_dict())
    assert torch.equal(eval_output(trained, X), eval_output(fresh, X))
    assert msq_fx.report(fresh).compression == pytest.approx(32 / 5)


def test_converted_model_survives_a_state_dict_round_trip():
    trained = msq_fx.prepare(small_cnn(), X)
    _train_a_little(trained)
    int_model = msq_fx.convert(trained)
    fresh = msq_fx.convert(msq_fx.prepare(small_cnn(), X))
    fresh.load_state_dict(int_model.state_dict())
    assert torch.equal(eval_output(int_model, X), eval_output(fresh, X))


def test_converted_model_holds_int8_codes_and_no_float_latent_weights():
    int_model = msq_fx.convert(msq_fx.prepare(small_cnn(), X))
    state = int_model.state_dict()
    assert "features.0.weight" not in state
    assert state["features.0.weight_quantizer.codes"].dtype == torch.int8
    assert int(state["features.0.weight_quantizer.bits"]) == 8


def test_convert_equals_fake_quant_output_after_pruning():
    qmodel = msq_fx.prepare(small_cnn(), X)
    _train_a_little(qmodel)
    int_model = msq_fx.convert(qmodel)
    assert torch.equal(eval_output(qmodel, X), eval_output(int_model, X))


def test_a_program_exported_inside_a_cache_block_reads_the_codes_not_a_cached_weight():
    int_model = msq_fx.convert(msq_fx.prepare(small_cnn(), X)).eval()
    with torch.no_grad(), msq_fx.weight_cache.cached_quantized_weights(int_model):
        expected = int_model(X)  # fills the cache
        program = torch.export.export(int_model, (X,))
    assert any(name.endswith("weight_quantizer.codes")
               for name in program.graph_signature.buffers)
    assert torch.equal(program.module()(X), expected)


def test_convert_freezes_calibrated_activation_quantizers_with_the_same_output():
    qmodel = msq_fx.prepare(small_cnn(), X, msq_fx.MSQConfig(quantization=dict(act_bits=6)))
    int_model = msq_fx.convert(qmodel)
    lowered = [m for m in int_model.modules() if isinstance(m, msq_fx.modules.LoweredActivation)]
    assert len(lowered) == len(list(msq_fx.owners.iter_quantized_weights(qmodel)))
    assert not any(isinstance(m, msq_fx.modules.ActivationFakeQuant) for m in int_model.modules())
    assert torch.equal(eval_output(qmodel, X), eval_output(int_model, X))


def test_a_converted_model_with_quantized_activations_exports_with_torch_export():
    config = msq_fx.MSQConfig(quantization=dict(act_bits=8))
    int_model = msq_fx.convert(msq_fx.prepare(small_cnn(), X, config))
    program = torch.export.export(int_model.eval(), (X,))
    assert torch.equal(program.module()(X), eval_output(int_model, X))


def test_convert_does_not_modify_the_prepared_model():
    qmodel = msq_fx.prepare(small_cnn(), X)
    before = copy.deepcopy(qmodel.state_dict())
    msq_fx.convert(qmodel)
    after = qmodel.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("build,shape", [
    (small_cnn, (2, 1, 16, 16)),
    (lambda: torchvision.models.mobilenet_v3_small(num_classes=10), (1, 3, 64, 64)),
], ids=["small_cnn", "mobilenet_v3_small"])
def test_converted_model_exports_with_torch_export_and_the_same_output(build, shape):
    inputs = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    int_model = msq_fx.convert(msq_fx.prepare(build(), inputs)).eval()
    exported = torch.export.export(int_model, (inputs,))
    with torch.no_grad():
        assert torch.equal(exported.module()(inputs), int_model(inputs))


def test_convert_of_an_unprepared_model_says_to_prepare_first():
    with pytest.raises(msq_fx.MSQError, match=r"msq_fx.prepare\(\).*holds no MSQ quantizer"):
        msq_fx.convert(small_cnn())


def test_convert_of_a_converted_model_is_refused():
    int_model = msq_fx.convert(msq_fx.prepare(small_cnn(), X))
    with pytest.raises(msq_fx.MSQError, match="already converted"):
        msq_fx.convert(int_model)


def test_prepare_of_a_prepared_model_is_refused():
    qmodel = msq_fx.prepare(small_cnn(), X)
    with pytest.raises(msq_fx.MSQError, match="already MSQ-prepared"):
        msq_fx.prepare(qmodel, X)


def test_example_inputs_that_do_not_run_the_model_are_explained():
    model = small_cnn()
    with pytest.raises(msq_fx.MSQError,
                       match=r"example_inputs do not run .*SmallCNN.*\(4, 3, 16, 16\)"):
        msq_fx.prepare(model, torch.randn(4, 3, 16, 16))


def test_failed_prepare_leaves_the_model_untouched():
    model = small_cnn()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(msq_fx.MSQError):
        msq_fx.prepare(model, torch.randn(4, 3, 16, 16))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert type(model.features[0]) is nn.Conv2d


def test_prepare_in_place_rewrites_and_returns_the_given_model():
    model = small_cnn()
    copied = msq_fx.prepare(small_cnn(), X)
    qmodel = msq_fx.prepare(model, X, inplace=True)
    assert qmodel is model
    assert torch.equal(eval_output(qmodel, X), eval_output(copied, X))


def test_prepare_in_place_undoes_the_rewrite_when_a_later_step_fails(monkeypatch):
    model = small_cnn()
    before = copy.deepcopy(model.state_dict())
    classes = [type(m) for m in model.modules()]
    expected = eval_output(model, X)

    def broken_to_dict(self):  # called once the quantizers are installed
        raise RuntimeError("disk full")

    monkeypatch.setattr(msq_fx.MSQConfig, "to_dict", broken_to_dict)
    with pytest.raises(RuntimeError, match="disk full"):
        msq_fx.prepare(model, X, inplace=True)
    assert [type(m) for m in model.modules()] == classes
    assert before.keys() == model.state_dict().keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert not [attr for attr in vars(model) if attr.startswith("_msq")]
    assert torch.equal(eval_output(model, X), expected)


def test_convert_in_place_lowers_the_given_model_with_the_same_output():
    qmodel = msq_fx.prepare(small_cnn(), X)
    _train_a_little(qmodel)
    expected = eval_output(qmodel, X)
    int_model = msq_fx.convert(qmodel, inplace=True)
    assert int_model is qmodel
    assert "features.0.weight" not in int_model.state_dict()
    assert int_model.state_dict()["features.0.weight_quantizer.codes"].dtype == torch.int8
    assert torch.equal(eval_output(int_model, X), expected)


def test_convert_one_at_a_time_gives_the_same_model_as_all_at_once():
    qmodel = msq_fx.prepare(small_cnn(), X)
    _train_a_little(qmodel)
    expected = eval_output(qmodel, X)
    at_once = msq_fx.convert(qmodel)
    streamed = msq_fx.convert(qmodel, inplace=True, one_at_a_time=True)
    assert at_once.state_dict().keys() == streamed.state_dict().keys()
    assert all(torch.equal(v, streamed.state_dict()[k]) for k, v in at_once.state_dict().items())
    assert torch.equal(eval_output(streamed, X), expected)


def test_convert_one_at_a_time_lets_each_latent_go_before_lowering_the_next(monkeypatch):
    import weakref

    from msq_fx.modules import LoweredWeight

    qmodel = msq_fx.prepare(small_cnn(), X)
    latents = [weakref.ref(w.latent) for w in msq_fx.owners.iter_quantized_weights(qmodel)]
    alive_when_lowering: list[int] = []
    from_fake_quant = LoweredWeight.from_fake_quant.__func__

    def counting(cls, quantizer, latent):
        alive_when_lowering.append(sum(ref() is not None for ref in latents))
        return from_fake_quant(cls, quantizer, latent)

    monkeypatch.setattr(LoweredWeight, "from_fake_quant", classmethod(counting))
    msq_fx.convert(qmodel, inplace=True, one_at_a_time=True)
    assert alive_when_lowering == list(range(len(latents), 0, -1))


def test_convert_one_at_a_time_still_changes_nothing_when_a_weight_cannot_be_lowered():
    qmodel = msq_fx.prepare(small_cnn(), X)
    last = list(msq_fx.owners.iter_quantized_weights(qmodel))[-1]
    last.quantizer.bits.fill_(12)  # as if edited by hand after prepare
    before = {k: v.clone() for k, v in qmodel.state_dict().items()}
    with pytest.raises(msq_fx.MSQError, match=f"{last.name}: 12-bit codes do not fit"):
        msq_fx.convert(qmodel, inplace=True, one_at_a_time=True)
    assert qmodel.state_dict().keys() == before.keys()
    assert not any(isinstance(m, msq_fx.modules.LoweredWeight) for m in qmodel.modules())


def test_prepare_rejects_a_config_of_the_wrong_type():
    with pytest.raises(TypeError, match="MSQConfig"):
        msq_fx.prepare(small_cnn(), X, {"init_bits": 8})


def test_prepare_without_example_inputs_works():
    qmodel = msq_fx.prepare(small_cnn())
    assert len(msq_fx.report(qmodel).layers) == 6


def test_exclude_leaves_matching_weights_in_float_with_the_reason():
    config = msq_fx.MSQConfig(quantization=dict(exclude=(r"^classifier\.2\.",)))
    qmodel = msq_fx.prepare(small_cnn(), X, config)
    report = msq_fx.report(qmodel)
    assert "classifier.2.weight" not in {r.name for r in report.layers}
    assert [(f.name, f.kind) for f in report.float_weights] == [("classifier.2.weight", "linear")]
    assert "exclude" in report.float_weights[0].reason


def test_filter_fn_receives_module_and_fqn():
    report = msq_fx.report(msq_fx.prepare(
        small_cnn(), X, filter_fn=lambda module, fqn: not isinstance(module, nn.Linear)))
    assert {r.kind for r in report.layers} == {"conv", "depthwise"}
    assert len(report.float_weights) == 2


@pytest.mark.parametrize("policy, quantized, fixed",
                         [("quantize", 6, 0), ("fixed", 6, 2), ("float", 4, 0)])
def test_first_last_policy(policy, quantized, fixed):
    config = msq_fx.MSQConfig(quantization=dict(first_last=policy))
    report = msq_fx.report(msq_fx.prepare(small_cnn(), X, config))
    assert len(report.layers) == quantized
    assert sum(not r.prunable for r in report.layers) == fixed
    if policy != "quantize":
        assert {"features.0.weight", "classifier.2.weight"} & (
            {r.name for r in report.layers if not r.prunable}
            | {f.name for f in report.float_weights})


def test_first_last_bits_holds_the_edges_at_their_width_through_pruning_and_convert():
    config = msq_fx.MSQConfig(target_compression=16.0,
                              quantization=dict(init_bits=3, first_last="fixed", first_last_bits=8),
                              pruning=dict(interval=1, threshold=1.0))  # every prunable layer drops
    qmodel = msq_fx.prepare(small_cnn(), X, config)
    controller = msq_fx.MSQController(qmodel)

    def widths():
        return {r.name: r.bits for r in msq_fx.report(qmodel).layers}

    edges = {"features.0.weight", "classifier.2.weight"}
    assert ({name: bits for name, bits in widths().items() if name in edges}
            == dict.fromkeys(edges, 8))
    assert set(widths().values()) == {3, 8}
    batches = [(X, torch.zeros(len(X)))]
    for epoch in range(1, 4):
        controller.epoch_end(epoch, batches, lambda out, _: out.square().mean())
    assert all(bits == 8 for name, bits in widths().items() if name in edges)
    assert all(bits < 3 for name, bits in widths().items() if name not in edges)
    assert torch.equal(eval_output(qmodel, X), eval_output(msq_fx.convert(qmodel), X))


def test_activation_quantization_quantizes_layer_inputs():
    qmodel = msq_fx.prepare(small_cnn(), X, msq_fx.MSQConfig(quantization=dict(act_bits=4)))
    seen = {}
    qmodel.features[4].register_forward_hook(lambda m, args, out: seen.update(x=args[0]))
    eval_output(qmodel, X)
    quantizer = qmodel.features[4].input_quantizer
    assert bool(quantizer.initialized)
    # The hook sees the raw input; the layer itself consumes at most 2^4 levels of it.
    assert len(torch.unique(quantizer(seen["x"]))) <= 16
    int_model = msq_fx.convert(qmodel)
    assert torch.equal(eval_output(qmodel, X), eval_output(int_model, X))


def test_report_counts_compression_in_the_paper_convention():
    qmodel = msq_fx.prepare(small_cnn(), X)
    rows = msq_fx.report(qmodel).layers
    rows_by_name = {r.name: r for r in rows}
    for weight in msq_fx.owners.iter_quantized_weights(qmodel):
        weight.quantizer.bits.fill_(4 if weight.quantizer.kind == "conv" else 2)
    report = msq_fx.report(qmodel)
    bits = sum((4 if r.kind == "conv" else 2) * r.params for r in rows_by_name.values())
    assert report.compression == pytest.approx(32 * report.quantized_params / bits)
    assert 1 < report.model_compression < report.compression
    assert "compression" in report.table()


class CachesAGraphTensor(nn.Module):
    """Caches a tensor computed from its weight in eval mode, as timm's EfficientViT does."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.cache: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            self.cache["scaled"] = self.proj.weight * 2
        return self.proj(x)


def test_convert_copies_a_model_that_cached_a_graph_tensor_in_eval_mode():
    qmodel = msq_fx.prepare(CachesAGraphTensor(), torch.randn(2, 4))
    qmodel.eval()
    qmodel(torch.randn(2, 4))  # with gradients enabled: the cache holds a non-leaf tensor
    assert not qmodel.cache["scaled"].is_leaf
    int_model = msq_fx.convert(qmodel)
    assert int_model.cache["scaled"].grad_fn is None
    assert torch.equal(int_model.cache["scaled"], qmodel.cache["scaled"].detach())
