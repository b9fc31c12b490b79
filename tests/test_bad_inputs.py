"""The catalogue of bad inputs: the mistakes a user of msq_fx makes, one test (or one parametrized
test) per class of mistake.

Each test asserts the error type (``msq_fx.MSQError`` where the library uses it, ``TypeError`` /
``ValueError`` for a misused argument) and that the message names the culprit (the module, tensor
FQN, file, config field or precision group) and the fix. Where an input is accepted, the test
asserts the behaviour is correct.
"""
from __future__ import annotations

import math
import re
import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import msq_fx
from msq_fx.io import MSQFileError


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


X = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
BATCHES = [(torch.randn(16, 4, generator=torch.Generator().manual_seed(2)),
            torch.randint(0, 2, (16,), generator=torch.Generator().manual_seed(3)))]
EVERY_EPOCH = msq_fx.MSQConfig(pruning={"interval": 1})


@pytest.fixture
def prepared() -> nn.Module:
    return msq_fx.prepare(mlp(), X)


@pytest.fixture
def converted(prepared) -> nn.Module:
    return msq_fx.convert(prepared.eval())


@pytest.fixture
def saved(converted, tmp_path):
    path = tmp_path / "model.msq"
    msq_fx.save(converted, path)
    return path


# --------------------------------------------------------------------------- prepare

@pytest.mark.parametrize("value, shown", [(float("nan"), "NaN"), (float("inf"), "inf"),
                                          (float("-inf"), "inf")])
def test_non_finite_weight_to_prepare_names_the_weight_and_the_fix(value, shown):
    model = mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = value
    before = model[2].weight.detach().clone()
    with pytest.raises(msq_fx.MSQError) as info:
        msq_fx.prepare(model, X)
    message = str(info.value)
    assert "2.weight" in message and "0.weight" not in message
    assert "NaN or infinite" in message and shown in message
    assert "Load a good checkpoint, or re-initialize those layers" in message
    assert torch.equal(model[2].weight.isnan(), before.isnan())  # the model is not changed
    assert not any(isinstance(m, msq_fx.modules.WeightFakeQuant) for m in model.modules())


def test_example_inputs_of_the_wrong_shape_name_the_shape_and_the_fix():
    with pytest.raises(msq_fx.MSQError) as info:
        msq_fx.prepare(mlp(), torch.randn(3, 5))
    message = str(info.value)
    assert "example_inputs do not run the model given to prepare() (Sequential)" in message
    assert "Inputs were ((3, 5))" in message
    assert "pass a tuple of the positional inputs model(*example_inputs) accepts" in message


@pytest.mark.parametrize("inputs", [{"x": X}, X.numpy(), "x", 3.0],
                         ids=["dict", "ndarray", "str", "float"])
def test_example_inputs_of_the_wrong_type_name_the_type_and_the_fix(inputs):
    with pytest.raises(TypeError, match=rf"example_inputs must be a tensor or a tuple of "
                                        rf"positional inputs, got {type(inputs).__name__}"):
        msq_fx.prepare(mlp(), inputs)


class ChecksItsLayerType(nn.Module):
    """Runs in float; quantizing ``inner.0`` swaps its class, which its forward refuses."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.inner = nn.Sequential(nn.Linear(4, 4))

    def forward(self, x):
        if type(self.inner[0]) is not nn.Linear:
            raise TypeError("inner.0 must be an nn.Linear")
        return self.inner(self.fc(x))


def test_inputs_that_run_the_float_model_but_not_the_prepared_one_blame_the_rewrite():
    with pytest.raises(msq_fx.MSQError) as info:
        msq_fx.prepare(ChecksItsLayerType(), X)
    message = str(info.value)
    assert message.startswith("the float model runs example_inputs, but the MSQ-prepared model "
                              "(ChecksItsLayerType) fails on them: TypeError: inner.0 must be")
    assert "Keep that module's weights in float" in message
    assert "pass a tuple of the positional inputs" not in message


def test_the_module_an_example_input_fails_in_is_named():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(4, 2))  # 8 features into 4
    with pytest.raises(msq_fx.MSQError, match=r"example_inputs do not run the model given to "
                                              r"prepare\(\) \(Sequential\) in module '2'"):
        msq_fx.prepare(model, X)


def test_a_prepared_model_runs_unchanged_after_the_checks_that_watch_its_modules():
    config = msq_fx.MSQConfig(quantization={"exclude": (r"^inner",)})
    qmodel = msq_fx.prepare(ChecksItsLayerType(), X, config)
    unchecked = msq_fx.prepare(ChecksItsLayerType(), None, config)  # no inputs: no run

    def hooks(model):
        return [(name, len(m._forward_pre_hooks), len(m._forward_hooks))
                for name, m in model.named_modules()]
    assert hooks(qmodel) == hooks(unchecked)
    with torch.no_grad():
        assert qmodel(X).shape == (3, 4)


def test_prepared_model_to_prepare_says_pass_the_float_model(prepared):
    with pytest.raises(msq_fx.MSQError, match=r"already MSQ-prepared or converted \(Sequential "
                                              r"holds MSQ quantizers\)\. Pass the original float "
                                              r"model, or keep training the prepared one"):
        msq_fx.prepare(prepared, X)


def test_converted_model_to_prepare_says_pass_the_float_model(converted):
    with pytest.raises(msq_fx.MSQError, match=r"already MSQ-prepared or converted.*Pass the "
                                              r"original float model"):
        msq_fx.prepare(converted, X)


@pytest.mark.parametrize("model", ["resnet20", None, torch.ones(2)], ids=["str", "None", "tensor"])
def test_prepare_of_something_that_is_not_a_module_names_its_type(model):
    with pytest.raises(TypeError, match=rf"prepare\(\) expects a torch.nn.Module, got "
                                        rf"{type(model).__name__}"):
        msq_fx.prepare(model, X)


@pytest.mark.parametrize("config", [{"target_compression": 4}, "default", 8],
                         ids=["dict", "str", "int"])
def test_prepare_with_a_config_that_is_not_an_msqconfig_names_its_type(config):
    with pytest.raises(TypeError, match=rf"config must be an msq_fx.MSQConfig, got "
                                        rf"{type(config).__name__}"):
        msq_fx.prepare(mlp(), X, config)


@pytest.mark.parametrize("filter_fn", ["0.weight", True, ["0"]], ids=["str", "bool", "list"])
def test_filter_fn_that_is_not_callable_names_it_and_the_fix(filter_fn):
    with pytest.raises(TypeError, match=rf"prepare: filter_fn={re.escape(repr(filter_fn))} is not "
                                        rf"callable; pass None or a function "
                                        rf"filter_fn\(module, fqn\) -> bool"):
        msq_fx.prepare(mlp(), X, filter_fn=filter_fn)


@pytest.mark.parametrize("entry", [3, nn.ReLU(), 1.5], ids=["int", "module-instance", "float"])
def test_leaf_modules_entry_neither_fqn_nor_class_names_the_entry(entry):
    with pytest.raises(TypeError, match=rf"leaf_modules entries must be an FQN / class name "
                                        rf"\(str\) or a class, got .*\({type(entry).__name__}\)"):
        msq_fx.prepare(mlp(), X, leaf_modules=[entry])


def test_leaf_modules_fqn_of_no_submodule_is_named_and_ignored(caplog):
    with caplog.at_level("WARNING", logger="msq_fx"):
        qmodel = msq_fx.prepare(mlp(), X, leaf_modules=["encoder.layer0"])
    assert "leaf_modules entry 'encoder.layer0' is neither a submodule FQN nor a class name" \
        in caplog.text
    assert [row.name for row in msq_fx.report(qmodel).layers] == ["0.weight", "2.weight"]


# --------------------------------------------------------------------------- convert

def test_convert_on_a_float_model_says_prepare_first():
    with pytest.raises(msq_fx.MSQError, match=r"convert\(\) expects a model returned by "
                                              r"msq_fx.prepare\(\), but Sequential: it holds "
                                              r"no MSQ quantizer\. Call msq_fx.prepare\(model, "
                                              r"example_inputs\)"):
        msq_fx.convert(mlp())


def test_convert_twice_says_it_is_already_converted(converted):
    with pytest.raises(msq_fx.MSQError, match=r"but Sequential: it is already converted\. Call "
                                              r"msq_fx.prepare"):
        msq_fx.convert(converted)


def test_convert_of_something_that_is_not_a_module_names_its_type():
    with pytest.raises(TypeError, match=r"convert\(\) expects a torch.nn.Module, got dict"):
        msq_fx.convert({"0.weight": torch.ones(2)})


# --------------------------------------------------------------------------- controller

def test_controller_on_a_float_model_says_pass_the_prepared_model():
    with pytest.raises(msq_fx.MSQError, match=r"MSQController needs a model returned by "
                                              r"msq_fx.prepare\(\); Sequential holds no trainable "
                                              r"MSQ quantizer.*Pass the prepared model"):
        msq_fx.MSQController(mlp())


def test_controller_on_a_converted_model_says_pass_the_prepared_model(converted):
    with pytest.raises(msq_fx.MSQError, match=r"Sequential holds no trainable MSQ quantizer \(a "
                                              r"float model, or one already converted\)\. Pass "
                                              r"the prepared model"):
        msq_fx.MSQController(converted)


@pytest.mark.parametrize("quantization, shown", [
    ({"init_bits": 6}, "init_bits=6 (prepared with 8)"),
    ({"grid": "literal"}, "grid='literal' (prepared with 'nested')"),
    ({"exclude": ["0"]}, "exclude=['0'] (prepared with [])"),
])
def test_controller_config_whose_quantization_differs_names_the_field(prepared, quantization,
                                                                      shown):
    config = msq_fx.MSQConfig(quantization=quantization)
    with pytest.raises(msq_fx.MSQError) as info:
        msq_fx.MSQController(prepared, config)
    message = str(info.value)
    assert "the config's quantization section differs from the one Sequential was prepared " \
           "with" in message
    assert shown in message
    assert "Pass the config given to msq_fx.prepare, or none" in message
    # The schedule may differ: that is accepted.
    msq_fx.MSQController(prepared, msq_fx.MSQConfig(target_compression=8.0,
                                                    pruning={"interval": 3}))


def test_controller_with_a_config_that_is_not_an_msqconfig_names_its_type(prepared):
    with pytest.raises(TypeError, match=r"MSQController: config must be an msq_fx.MSQConfig, got "
                                        r"dict"):
        msq_fx.MSQController(prepared, {"target_compression": 4})


@pytest.mark.parametrize("method, unit", [("epoch_end", "epoch"), ("step_end", "step")])
@pytest.mark.parametrize("count", [0, -1, 1.0, True, "1"])
def test_epoch_or_step_that_is_not_a_count_from_1_says_pass_count_plus_1(prepared, method, unit,
                                                                         count):
    controller = msq_fx.MSQController(prepared)
    with pytest.raises(ValueError) as info:
        getattr(controller, method)(count, BATCHES, F.cross_entropy)
    message = str(info.value)
    assert message.startswith(f"{method}({unit}={count!r})")
    assert f"{unit}s count completed {unit}s from 1" in message
    assert f"pass {unit} + 1 when looping over range()" in message


@pytest.mark.parametrize("method, unit", [("epoch_end", "epoch"), ("step_end", "step")])
def test_repeated_epoch_or_step_says_which_to_continue_with(prepared, method, unit):
    controller = msq_fx.MSQController(prepared)
    getattr(controller, method)(1, BATCHES, F.cross_entropy)
    getattr(controller, method)(2, BATCHES, F.cross_entropy)
    for repeated in (2, 1):
        with pytest.raises(ValueError, match=rf"{method}\({unit}={repeated}\): {unit} 2 was "
                                             rf"already processed; continue with {unit} 3\."):
            getattr(controller, method)(repeated, BATCHES, F.cross_entropy)
    getattr(controller, method)(3, BATCHES, F.cross_entropy)  # the run continues


def test_empty_hessian_batches_are_named():
    controller = msq_fx.MSQController(msq_fx.prepare(mlp(), X, EVERY_EPOCH))
    with pytest.raises(ValueError, match=r"epoch_end: `batches` yielded no \(inputs, targets\) "
                                         r"pair for the Hessian"):
        controller.epoch_end(1, [], F.cross_entropy)
    assert controller.bit_widths() == {"0.weight": 8, "2.weight": 8}


def test_empty_hessian_batches_message_says_the_fix():
    controller = msq_fx.MSQController(msq_fx.prepare(mlp(), X, EVERY_EPOCH))
    with pytest.raises(ValueError, match=r"(?i)pass .*batch"):
        controller.epoch_end(1, iter([]), F.cross_entropy)


def test_non_scalar_loss_names_its_shape_and_asks_for_a_scalar():
    controller = msq_fx.MSQController(msq_fx.prepare(mlp(), X, EVERY_EPOCH))
    per_sample = lambda out, y: F.cross_entropy(out, y, reduction="none")  # noqa: E731
    with pytest.raises(ValueError, match=r"loss_fn must return a scalar \(0-dim\) loss, got "
                                         r"shape \(16,\)"):
        controller.epoch_end(1, BATCHES, per_sample)
    assert controller.bit_widths() == {"0.weight": 8, "2.weight": 8}


def test_nan_latent_at_a_prune_names_the_group_and_the_fix():
    qmodel = msq_fx.prepare(mlp(), X, EVERY_EPOCH)
    controller = msq_fx.MSQController(qmodel)
    latent = next(p for name, p in qmodel.named_parameters() if name == "2.weight")
    with torch.no_grad():
        latent[1, 1] = float("nan")
    with pytest.raises(msq_fx.MSQError) as info:
        controller.epoch_end(1, BATCHES, F.cross_entropy)
    message = str(info.value)
    assert "MSQController.epoch_end(epoch=1)" in message
    assert "2.weight (latent of 2.weight" in message and "0.weight (" not in message
    assert "restore the last good checkpoint" in message and "lower the learning rate" in message
    assert controller.last_epoch == 0 and controller.bit_widths()["2.weight"] == 8


def _bn_net_and_controller(target=10.0, **pruning):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(144, 3))
    config = msq_fx.MSQConfig(target_compression=target, quantization={"scale": "channel"},
                              pruning={"interval": 1, "threshold": 1.0,
                                       "bn_recalibration_batches": 2, **pruning})
    qmodel = msq_fx.prepare(net, torch.randn(2, 1, 8, 8), config)
    return qmodel, msq_fx.MSQController(qmodel, config)


IMAGES = (torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(4)),
          torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(5)))
WRONG_SIZE = (torch.randn(8, 1, 9, 9), torch.randint(0, 3, (8,)))


def test_prune_failing_after_the_widths_changed_leaves_model_and_controller_as_they_were():
    # The Hessian reads the first batch only; the second, of the wrong size, is read by the
    # BatchNorm re-estimate after the new widths and scales are set.
    qmodel, controller = _bn_net_and_controller()
    before = {name: value.clone() for name, value in qmodel.state_dict().items()}
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        controller.epoch_end(1, [IMAGES, WRONG_SIZE], F.cross_entropy)
    after = qmodel.state_dict()
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert changed == []
    assert (controller.last_epoch, controller.prune_count, controller.history) == (0, 0, [])


def test_prune_retried_after_a_failure_prunes_once():
    _, controller = _bn_net_and_controller()
    with pytest.raises(RuntimeError):
        controller.epoch_end(1, [IMAGES, WRONG_SIZE], F.cross_entropy)
    controller.epoch_end(1, [IMAGES, IMAGES], F.cross_entropy)
    assert [(r.bits_before, r.bits_after) for r in controller.history] == [(8, 7), (8, 7)]


def test_measured_finish_without_batches_names_the_call_and_the_fix():
    # 4.5x: the first prune (8 to 7 bits) reaches it, so it is the measured one.
    _, controller = _bn_net_and_controller(4.5, step_policy="fixed", last_prune="measured")
    with pytest.raises(msq_fx.MSQError) as info:
        controller.epoch_end(1, [], F.cross_entropy)
    message = str(info.value)
    assert message.startswith("MSQController.epoch_end(epoch=1): the prune that reaches the "
                              "target measures the loss of each drop")
    assert "pass at least one (inputs, targets) batch" in message
    assert controller.bit_widths() == {"0.weight": 8, "4.weight": 8}


def test_controller_load_state_dict_missing_keys_names_them(prepared):
    controller = msq_fx.MSQController(prepared)
    with pytest.raises(KeyError, match=r"MSQController.load_state_dict: missing \['done', "
                                       r"'history'\]"):
        controller.load_state_dict({"last_epoch": 1, "prune_count": 0})


# --------------------------------------------------------------------------- config

@pytest.mark.parametrize("kwargs, field, expected", [
    ({"target_compression": 0.5}, "MSQConfig.target_compression=0.5", "a number > 1"),
    ({"target_compression": 40}, "MSQConfig.target_compression=40", "lower quantization.min_bits"),
    ({"seed": 1.5}, "MSQConfig.seed=1.5", "an integer"),
    ({"quantization": {"init_bits": 9}}, "MSQConfig.quantization.init_bits=9",
     "an integer in 2..8"),
    ({"quantization": {"init_bits": 4, "min_bits": 6}}, "MSQConfig.quantization.min_bits=6",
     "an integer in 1..init_bits (4)"),
    ({"quantization": {"grid": "log"}}, "MSQConfig.quantization.grid='log'", "one of"),
    ({"quantization": {"exclude": ["("]}}, "MSQConfig.quantization.exclude=('(',)",
     "valid regular expressions"),
    ({"pruning": {"interval_unit": "hour"}}, "MSQConfig.pruning.interval_unit='hour'",
     "one of ('epoch', 'step')"),
    ({"hessian": {"method": "magic"}}, "MSQConfig.hessian.method='magic'",
     "one of ('auto', 'autograd', 'finite_difference')"),
    ({"quantization": "x"}, "MSQConfig.quantization='x'",
     "a QuantizationConfig or a dict of its fields"),
], ids=lambda v: None if not isinstance(v, str) else v.split("=")[0].removeprefix("MSQConfig."))
def test_invalid_config_value_names_the_field_and_what_is_expected(kwargs, field, expected):
    with pytest.raises(ValueError) as info:
        msq_fx.MSQConfig(**kwargs)
    message = str(info.value)
    assert message.startswith(f"{field} is invalid: expected")
    assert expected in message


@pytest.mark.parametrize("data, where, unknown", [
    ({"quantization": {}, "bogus": 1}, "MSQConfig.from_dict", "['bogus']"),
    ({"quantization": {"init_bit": 8}}, "MSQConfig.quantization", "['init_bit']"),
    ({"quantization": {}, "pruning": {"intervall": 2}}, "MSQConfig.pruning", "['intervall']"),
])
def test_unknown_config_field_in_from_dict_names_it_and_the_known_ones(data, where, unknown):
    with pytest.raises(ValueError) as info:
        msq_fx.MSQConfig.from_dict(data)
    message = str(info.value)
    assert message.startswith(f"{where}: unknown field(s) {unknown}; known: [")
    known = {"MSQConfig.from_dict": "'target_compression'", "MSQConfig.quantization": "'init_bits'",
             "MSQConfig.pruning": "'interval'"}[where]
    assert known in message


# --------------------------------------------------------------------------- files

def test_truncated_file_names_the_file_and_the_fix(saved, tmp_path):
    cut = tmp_path / "cut.msq"
    data = saved.read_bytes()
    cut.write_bytes(data[:len(data) // 2])
    for call in (lambda: msq_fx.load(cut, trusted=True), lambda: msq_fx.saved_config(cut)):
        with pytest.raises(MSQFileError) as info:
            call()
        message = str(info.value)
        assert message.startswith(f"{cut}: truncated or corrupt")
        assert "Save the model again, or copy the file again" in message
        assert isinstance(info.value, msq_fx.MSQError) and isinstance(info.value, ValueError)


def test_zero_length_file_names_the_file_and_the_fix(converted, tmp_path):
    empty = tmp_path / "empty.msq"
    empty.write_bytes(b"")
    with pytest.raises(msq_fx.MSQError, match=rf"{re.escape(str(empty))}: truncated or corrupt: "
                                              rf"the file is empty \(0 bytes\).*Save the model "
                                              rf"again, or copy the file again"):
        msq_fx.load(empty, converted)


def test_foreign_file_torch_save_of_a_dict_names_the_file_and_its_keys(converted, tmp_path):
    foreign = tmp_path / "weights.pt"
    torch.save({"state_dict": mlp().state_dict(), "epoch": 3}, foreign)
    with pytest.raises(msq_fx.MSQError) as info:
        msq_fx.load(foreign, converted)
    message = str(info.value)
    assert message.startswith(f"{foreign}: not an msq_fx file: torch.load reads a dict with keys "
                              f"['epoch', 'state_dict']")
    assert "pass a file msq_fx.save() wrote" in message


def test_text_file_names_the_file_and_its_first_bytes(converted, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello world\n")
    with pytest.raises(msq_fx.MSQError) as info:
        msq_fx.load(text, converted)
    message = str(info.value)
    assert message.startswith(f"{text}: not an msq_fx file")
    assert "b'hell'" in message and "pass a file msq_fx.save() wrote" in message


def test_missing_file_names_the_path(converted, tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.msq"))):
        msq_fx.load(tmp_path / "nope.msq", converted)


def test_load_into_a_mismatched_skeleton_names_the_tensors_and_how_to_build_it(saved):
    torch.manual_seed(0)
    wider = msq_fx.convert(msq_fx.prepare(nn.Sequential(nn.Linear(4, 16), nn.ReLU(),
                                                        nn.Linear(16, 2))))
    with pytest.raises(MSQFileError) as info:
        msq_fx.load(saved, wider)
    message = str(info.value)
    assert f"msq_fx.load: {saved} does not match the given model" in message
    assert "0.weight_quantizer.codes: the file has (8, 4) torch.int8, the model (16, 4) " \
           "torch.int8" in message
    assert "build it as convert(prepare(arch, example_inputs, saved_config(path)))" in message


def test_load_without_a_model_of_an_untrusted_file_says_pass_a_model_or_trusted(saved):
    with pytest.raises(MSQFileError, match=rf"{re.escape(str(saved))}: loading without a model "
                                           rf"rebuilds the module.*Pass model=<a converted model "
                                           rf"of the same architecture>.*or trusted=True"):
        msq_fx.load(saved)


def test_save_of_a_prepared_model_says_convert_first(prepared, tmp_path):
    with pytest.raises(ValueError, match=r"msq_fx.save: 0.weight_quantizer is still a fake "
                                         r"quantizer; call msq_fx.convert\(model\) first"):
        msq_fx.save(prepared, tmp_path / "p.msq")
    assert not (tmp_path / "p.msq").exists()


def test_save_of_a_float_model_says_pass_the_converted_model(tmp_path):
    with pytest.raises(ValueError, match=r"msq_fx.save: the model holds no quantized weight; "
                                         r"pass the model returned by msq_fx.convert\(\)"):
        msq_fx.save(mlp(), tmp_path / "f.msq")


# --------------------------------------------------------------------------- odd models

def test_meta_device_model_prepares_and_converts_to_the_same_structure():
    """A model on the meta device (no data) is accepted as a structure: prepare and convert give
    the layers, widths and shapes they give for the real model."""
    qmodel = msq_fx.prepare(mlp().to("meta"))
    rows = [(r.name, r.bits, r.shape) for r in msq_fx.report(qmodel).layers]
    assert rows == [("0.weight", 8, (8, 4)), ("2.weight", 8, (2, 8))]
    int_model = msq_fx.convert(qmodel)
    assert int_model[0].weight_quantizer.codes.device.type == "meta"
    assert int_model(X.to("meta")).shape == (3, 2)


def test_save_of_a_meta_device_model_names_the_meta_device(tmp_path):
    int_model = msq_fx.convert(msq_fx.prepare(mlp().to("meta")))
    with pytest.raises(msq_fx.MSQError, match=r"msq_fx.save: .* meta device .*to_empty"):
        msq_fx.save(int_model, tmp_path / "meta.msq")
    assert not (tmp_path / "meta.msq").exists()


def test_load_into_a_meta_device_skeleton_names_the_meta_device_and_the_fix(saved):
    skeleton = msq_fx.convert(msq_fx.prepare(mlp().to("meta")))
    with pytest.raises(msq_fx.MSQError,
                       match=r"meta device \(0\.bias.*build the skeleton on the CPU"):
        msq_fx.load(saved, skeleton)


def test_half_precision_model_prepares_and_converts_exactly():
    half = mlp().half()
    x = X.half()
    qmodel = msq_fx.prepare(half, x)
    assert [r.name for r in msq_fx.report(qmodel).layers] == ["0.weight", "2.weight"]
    out = qmodel.eval()(x)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    int_model = msq_fx.convert(qmodel)
    assert torch.equal(int_model(x), out)
    assert half[0].weight.dtype == torch.float16  # the user's model is untouched


def test_model_in_eval_mode_keeps_its_mode_and_still_trains():
    model = mlp().eval()
    qmodel = msq_fx.prepare(model, X)
    assert not qmodel.training  # prepare keeps the mode it was given
    controller = msq_fx.MSQController(qmodel)
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in qmodel.named_parameters()}
    for x, y in BATCHES:
        loss = F.cross_entropy(qmodel(x), y) + controller.regularization()
        assert math.isfinite(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    changed = [n for n, p in qmodel.named_parameters() if not torch.equal(p, before[n])]
    assert {"0.weight", "2.weight"} <= set(changed)
    assert controller.epoch_end(1, BATCHES, F.cross_entropy) == []


def test_data_parallel_wrapped_model_is_prepared_trained_and_converted():
    wrapped = nn.DataParallel(mlp())
    qmodel = msq_fx.prepare(wrapped, X)
    assert isinstance(qmodel, nn.DataParallel)
    assert [r.name for r in msq_fx.report(qmodel).layers] == ["module.0.weight",
                                                              "module.2.weight"]
    controller = msq_fx.MSQController(qmodel, EVERY_EPOCH)
    records = controller.epoch_end(1, BATCHES, F.cross_entropy)
    assert {r.group for r in records} == {"module.0.weight", "module.2.weight"}
    int_model = msq_fx.convert(qmodel.eval())
    assert torch.equal(int_model(X), qmodel(X))


@pytest.fixture
def single_process_group():
    """A one-rank gloo process group, so DistributedDataParallel can be built in this process."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group(backend="gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def test_quantized_activations_without_example_inputs_under_distributed_ask_for_them(
        single_process_group):
    config = msq_fx.MSQConfig(quantization={"act_bits": 8})
    with pytest.raises(msq_fx.MSQError, match=r"under torch\.distributed, quantized activations "
                                              r"\(act_bits=8\) need example_inputs"):
        msq_fx.prepare(mlp(), None, config)
    assert msq_fx.prepare(mlp(), X, config)[0].input_quantizer.initialized


def test_ddp_wrapped_model_is_prepared_trained_and_converted(single_process_group):
    qmodel = msq_fx.prepare(nn.parallel.DistributedDataParallel(mlp()), X)
    assert isinstance(qmodel, nn.parallel.DistributedDataParallel)
    assert [r.name for r in msq_fx.report(qmodel).layers] == ["module.0.weight",
                                                              "module.2.weight"]
    controller = msq_fx.MSQController(qmodel, EVERY_EPOCH)
    x, y = BATCHES[0]
    (F.cross_entropy(qmodel(x), y) + controller.regularization()).backward()
    records = controller.epoch_end(1, BATCHES, F.cross_entropy)
    assert {r.group for r in records} == {"module.0.weight", "module.2.weight"}
    int_model = msq_fx.convert(qmodel.eval())
    assert torch.equal(int_model(X), qmodel(X))


def test_prepared_model_to_check_model_fails_naming_the_stage_and_the_fix(prepared):
    result = msq_fx.check_model(prepared, input_size=4)
    assert result.status == "FAIL" and result.stage == "prepare"
    assert "already MSQ-prepared or converted" in result.reason
    assert "Pass the original float model" in result.reason


def test_check_model_given_both_input_size_and_example_inputs_says_one_of_them():
    with pytest.raises(ValueError, match=r"check_model: give input_size \(a random batch of that "
                                         r"shape\) or example_inputs \(the batch itself\), not "
                                         r"both"):
        msq_fx.check_model(mlp(), input_size=4, example_inputs=(X,))


def test_check_model_of_something_that_is_not_a_model_names_its_type():
    with pytest.raises(TypeError, match=r"check_model expects a spec string or an nn.Module, got "
                                        r"int"):
        msq_fx.check_model(3, input_size=4)
