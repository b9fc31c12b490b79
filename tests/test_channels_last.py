"""A channels_last model stays channels_last through prepare, training, convert, save and load,
and computes what the contiguous model computes."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import msq_fx
from conftest import eval_output
from msq_fx.modules import LoweredWeight
from msq_fx.owners import iter_quantized_weights

CL = torch.channels_last
INPUTS = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def is_channels_last(tensor: torch.Tensor) -> bool:
    return tensor.is_contiguous(memory_format=CL)


def four_d(tensors) -> list[torch.Tensor]:
    found = [t for t in tensors if t.dim() == 4]
    assert found
    return found


def quantized_weights(model: nn.Module) -> list[torch.Tensor]:
    """Each quantized weight as the model reads it (through its quantizer)."""
    with torch.no_grad():
        return [getattr(w.owner, w.attr) for w in iter_quantized_weights(model)]


def conv_outputs(model: nn.Module, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """The output of every conv of ``model`` on ``inputs`` (eval mode)."""
    outputs = {}
    hooks = [m.register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o))
             for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    eval_output(model, inputs)
    for hook in hooks:
        hook.remove()
    return outputs


def pair(config: msq_fx.MSQConfig | None = None) -> tuple[nn.Module, nn.Module]:
    """torchvision resnet18 (random weights) prepared contiguous and channels_last, from the
    same weights."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    contiguous = msq_fx.prepare(model, INPUTS, config)
    channels_last = msq_fx.prepare(copy.deepcopy(model).to(memory_format=CL),
                                   INPUTS.to(memory_format=CL), config)
    return contiguous, channels_last


@pytest.fixture(scope="module")
def prepared(one_torch_thread) -> tuple[nn.Module, nn.Module]:
    return pair()


@pytest.fixture(scope="module")
def converted(prepared) -> tuple[nn.Module, nn.Module]:
    return tuple(msq_fx.convert(model) for model in prepared)


def test_prepare_keeps_channels_last_latents_and_quantized_weights(prepared):
    _, channels_last = prepared
    latents = [w.latent for w in iter_quantized_weights(channels_last)]
    assert all(is_channels_last(t) for t in four_d(latents))
    assert all(is_channels_last(t) for t in four_d(quantized_weights(channels_last)))


def test_prepared_conv_outputs_stay_channels_last(prepared):
    _, channels_last = prepared
    outputs = conv_outputs(channels_last, INPUTS.to(memory_format=CL))
    assert len(outputs) == 20 and all(is_channels_last(o) for o in outputs.values())


def test_channels_last_quantizes_to_the_same_weights_and_outputs(prepared):
    contiguous, channels_last = prepared
    for a, b in zip(quantized_weights(contiguous), quantized_weights(channels_last)):
        assert torch.equal(a, b)  # elementwise, so exact
    # The conv kernels differ between the layouts, so the outputs agree to float rounding.
    torch.testing.assert_close(eval_output(channels_last, INPUTS.to(memory_format=CL)),
                               eval_output(contiguous, INPUTS), rtol=1e-4, atol=1e-5)


def test_convert_keeps_channels_last_codes_and_dequantized_weights(converted):
    _, channels_last = converted
    codes = [m.codes for m in channels_last.modules() if isinstance(m, LoweredWeight)]
    assert all(is_channels_last(t) for t in four_d(codes))
    assert all(is_channels_last(t) for t in four_d(quantized_weights(channels_last)))
    outputs = conv_outputs(channels_last, INPUTS.to(memory_format=CL))
    assert all(is_channels_last(o) for o in outputs.values())


def test_convert_equals_the_fake_quant_model_exactly_in_either_format(prepared, converted):
    for qmodel, int_model, inputs in zip(prepared, converted,
                                         (INPUTS, INPUTS.to(memory_format=CL))):
        for a, b in zip(quantized_weights(qmodel), quantized_weights(int_model)):
            assert torch.equal(a, b) and a.stride() == b.stride()
        assert torch.equal(eval_output(int_model, inputs), eval_output(qmodel, inputs))


def test_converted_models_of_either_format_have_the_same_codes_and_close_outputs(converted):
    contiguous, channels_last = converted
    for a, b in zip(contiguous.modules(), channels_last.modules()):
        if isinstance(a, LoweredWeight):
            assert torch.equal(a.codes, b.codes) and torch.equal(a.step, b.step)
    torch.testing.assert_close(eval_output(channels_last, INPUTS.to(memory_format=CL)),
                               eval_output(contiguous, INPUTS), rtol=1e-4, atol=1e-5)


def test_a_model_made_channels_last_after_prepare_converts_channels_last(prepared):
    contiguous, _ = prepared
    moved = copy.deepcopy(contiguous).to(memory_format=CL)  # as tools/cifar10_resnet20 does
    int_model = msq_fx.convert(moved)
    codes = [m.codes for m in int_model.modules() if isinstance(m, LoweredWeight)]
    assert all(is_channels_last(t) for t in four_d(codes))
    assert torch.equal(eval_output(int_model, INPUTS.to(memory_format=CL)),
                       eval_output(moved, INPUTS.to(memory_format=CL)))


def test_a_converted_model_made_channels_last_reads_channels_last_weights(converted):
    contiguous, _ = converted
    moved = copy.deepcopy(contiguous).to(memory_format=CL)
    assert all(is_channels_last(t) for t in four_d(quantized_weights(moved)))
    torch.testing.assert_close(eval_output(moved, INPUTS.to(memory_format=CL)),
                               eval_output(contiguous, INPUTS), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scale", ["channel"])
def test_learned_scales_keep_channels_last_and_the_same_weights(one_torch_thread, scale):
    contiguous, channels_last = pair(msq_fx.MSQConfig(quantization=dict(scale=scale)))
    weights = quantized_weights(channels_last)
    assert all(is_channels_last(t) for t in four_d(weights))
    for a, b in zip(quantized_weights(contiguous), weights):
        assert torch.equal(a, b)
    int_model = msq_fx.convert(channels_last)
    assert all(is_channels_last(t) for t in four_d(quantized_weights(int_model)))
    assert torch.equal(eval_output(int_model, INPUTS.to(memory_format=CL)),
                       eval_output(channels_last, INPUTS.to(memory_format=CL)))


def test_a_training_step_gives_channels_last_gradients_close_to_the_contiguous_ones(prepared):
    targets = torch.tensor([1, 7])
    gradients = []
    for model, inputs in zip(copy.deepcopy(prepared), (INPUTS, INPUTS.to(memory_format=CL))):
        # Batch norm in eval mode: the training mode's statistics over two 1x1 maps in layer4
        # would turn float rounding into large gradient differences.
        model.eval()
        F.cross_entropy(model(inputs), targets).backward()
        gradients.append([w.latent.grad for w in iter_quantized_weights(model)])
    assert all(is_channels_last(g) for g in four_d(gradients[1]))
    for a, b in zip(*gradients):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("how", ["trusted", "model"])
def test_save_and_load_keep_channels_last(converted, tmp_path, how):
    _, channels_last = converted
    msq_fx.save(channels_last, tmp_path / "model.msq")
    if how == "trusted":
        loaded = msq_fx.load(tmp_path / "model.msq", trusted=True)
    else:
        skeleton = msq_fx.convert(msq_fx.prepare(
            torchvision.models.resnet18(weights=None).to(memory_format=CL),
            INPUTS.to(memory_format=CL)))
        loaded = msq_fx.load(tmp_path / "model.msq", model=skeleton)
    codes = [m.codes for m in loaded.modules() if isinstance(m, LoweredWeight)]
    assert all(is_channels_last(t) for t in four_d(codes))
    for a, b in zip(channels_last.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b) and a.stride() == b.stride()
    assert torch.equal(eval_output(loaded, INPUTS.to(memory_format=CL)),
                       eval_output(channels_last, INPUTS.to(memory_format=CL)))


def test_a_channels_last_float_weight_comes_back_channels_last(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)).to(memory_format=CL)
    config = msq_fx.MSQConfig(quantization=dict(exclude=("0.weight",)))
    int_model = msq_fx.convert(msq_fx.prepare(model, INPUTS.to(memory_format=CL), config))
    msq_fx.save(int_model, tmp_path / "model.msq")
    loaded = msq_fx.load(tmp_path / "model.msq", trusted=True)
    assert is_channels_last(loaded[0].weight) and not loaded[0].weight.is_contiguous()
    assert torch.equal(eval_output(loaded, INPUTS.to(memory_format=CL)),
                       eval_output(int_model, INPUTS.to(memory_format=CL)))
