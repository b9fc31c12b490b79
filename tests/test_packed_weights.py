"""Specification of convert(..., kernels="packed"): codes held at 1, 2, 4 or 8 bits each, the same
weights and outputs as the int8-container model, through save / load and torch.export."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import msq_fx
import msq_fx.owners
from msq_fx.modules import LoweredWeight
from msq_fx.packed_weights import (PackedWeight, container_bits, pack_codes_in_memory,
                                   unpack_codes_in_memory, use_kernels)
from msq_fx.weight_cache import cached_quantized_weights

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
WIDTHS = [2, 3, 4, 8, 1, 5]  # one per SmallCNN weight: every container, and odd widths


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def prepared_cnn(bits=WIDTHS, scale="max", grid="nested", channels_last=False) -> nn.Module:
    torch.manual_seed(0)
    model = msq_fx.SmallCNN(in_channels=3, width=8)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    config = msq_fx.MSQConfig(quantization=dict(scale=scale, grid=grid))
    qmodel = msq_fx.prepare(model, X, config).eval()
    for weight, width in zip(msq_fx.owners.iter_quantized_weights(qmodel), bits):
        weight.quantizer.bits.fill_(width)
    return qmodel


def outputs(model: nn.Module, inputs=X) -> torch.Tensor:
    with torch.no_grad():
        return model(inputs)


def packed_modules(model: nn.Module) -> list[PackedWeight]:
    return [m for m in model.modules() if isinstance(m, PackedWeight)]


@pytest.mark.parametrize("width", [1, 2, 4, 8])
def test_codes_pack_into_width_bit_fields_and_back(width):
    generator = torch.Generator().manual_seed(width)
    for numel in (1, 7, 8, 1001):
        codes = torch.randint(-2 ** (width - 1), 2 ** (width - 1), (numel,), dtype=torch.int8,
                              generator=generator)
        packed = pack_codes_in_memory(codes, width)
        assert packed.dtype == torch.int8 and packed.numel() == -(-numel * width // 8)
        assert torch.equal(unpack_codes_in_memory(packed, width, numel), codes)


def test_containers_are_the_smallest_of_1_2_4_8_bits():
    assert [container_bits(bits) for bits in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]


@pytest.mark.parametrize("scale", ["max", "tensor", "channel"])
@pytest.mark.parametrize("grid", ["nested", "literal"])
def test_packed_model_equals_the_fake_quant_and_the_int8_models_exactly(scale, grid):
    qmodel = prepared_cnn(scale=scale, grid=grid)
    packed = msq_fx.convert(qmodel, kernels="packed").eval()
    dequantized = msq_fx.convert(qmodel).eval()
    assert torch.equal(outputs(packed), outputs(qmodel))
    assert torch.equal(outputs(packed), outputs(dequantized))
    for mine, theirs in zip(packed_modules(packed), (m for m in dequantized.modules()
                                                    if isinstance(m, LoweredWeight))):
        assert torch.equal(mine(), theirs()) and torch.equal(mine.codes, theirs.codes)


def test_each_weight_holds_its_codes_at_the_container_width():
    packed = msq_fx.convert(prepared_cnn(), kernels="packed")
    modules = packed_modules(packed)
    assert [m.container for m in modules] == [container_bits(b) for b in WIDTHS]
    for module in modules:
        numel = module.codes.numel()
        assert module.packed.numel() == -(-numel * module.container // 8)
        assert "codes" not in dict(module.named_buffers())
    # A model at 4 bits holds half the code bytes of the int8 containers.
    four = prepared_cnn(bits=[4] * 6)
    held = {kernels: sum(b.numel() for n, b in msq_fx.convert(four, kernels=kernels)
                         .named_buffers() if n.endswith((".codes", ".packed")))
            for kernels in ("dequantize", "packed")}
    assert held["packed"] * 2 == pytest.approx(held["dequantize"], abs=6)


def test_a_transformer_layer_with_attention_weights_equals_exactly():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    tokens = torch.randn(2, 5, 16)
    qmodel = msq_fx.prepare(layer, tokens, msq_fx.MSQConfig(quantization=dict(init_bits=4))).eval()
    packed = msq_fx.convert(qmodel, kernels="packed").eval()
    assert {m.kind for m in packed_modules(packed)} >= {"attention", "linear"}
    assert torch.equal(outputs(packed, tokens), outputs(qmodel, tokens))


def test_channels_last_weights_come_back_channels_last():
    qmodel = prepared_cnn(channels_last=True)
    packed = msq_fx.convert(qmodel, kernels="packed").eval()
    lowered = [m for m in msq_fx.convert(qmodel).modules() if isinstance(m, LoweredWeight)]
    for mine, theirs in zip(packed_modules(packed), lowered):
        assert mine().stride() == theirs().stride() and mine.codes.stride() == theirs.codes.stride()
    inputs = X.to(memory_format=torch.channels_last)
    assert torch.equal(outputs(packed, inputs), outputs(qmodel, inputs))


def test_save_and_load_round_trip_either_way(tmp_path):
    qmodel = prepared_cnn(scale="channel")
    packed = msq_fx.convert(qmodel, kernels="packed").eval()
    expected = outputs(packed)
    msq_fx.save(packed, tmp_path / "packed.msq")
    msq_fx.save(msq_fx.convert(qmodel), tmp_path / "int8.msq")
    sizes = [msq_fx.io.saved_sizes(tmp_path / name) for name in ("packed.msq", "int8.msq")]
    assert sizes[0].code_bytes == sizes[1].code_bytes  # the file does not depend on the kernels
    assert sizes[0].tensor_bytes == sizes[1].tensor_bytes
    loaded = msq_fx.load(tmp_path / "packed.msq", trusted=True)
    assert len(packed_modules(loaded)) == len(WIDTHS)
    assert torch.equal(outputs(loaded), expected)
    config = msq_fx.saved_config(tmp_path / "packed.msq")
    for name in ("packed.msq", "int8.msq"):
        # The skeleton starts every weight at init_bits: the loaded widths pick the containers.
        skeleton = msq_fx.convert(msq_fx.prepare(msq_fx.SmallCNN(in_channels=3, width=8), X,
                                                 config), kernels="packed")
        filled = msq_fx.load(tmp_path / name, model=skeleton).eval()
        assert [m.container for m in packed_modules(filled)] == \
            [container_bits(b) for b in WIDTHS]
        assert torch.equal(outputs(filled), expected)
    into_int8 = msq_fx.load(tmp_path / "packed.msq", model=msq_fx.convert(
        msq_fx.prepare(msq_fx.SmallCNN(in_channels=3, width=8), X, config))).eval()
    assert torch.equal(outputs(into_int8), expected)


def test_a_mismatched_state_is_refused_and_the_module_kept():
    module = packed_modules(msq_fx.convert(prepared_cnn(), kernels="packed"))[1]
    before = module.codes.clone()
    state = module.state_dict()
    with pytest.raises(RuntimeError, match="size mismatch for codes"):
        module.load_state_dict({**state, "codes": torch.zeros(3, 3, dtype=torch.int8)})
    with pytest.raises(RuntimeError, match="do not fit 3-bit"):
        module.load_state_dict({**state, "codes": torch.full_like(before, 7)})
    assert torch.equal(module.codes, before)


def test_a_state_whose_codes_do_not_fit_its_width_leaves_width_and_step_as_they_were():
    module = packed_modules(msq_fx.convert(prepared_cnn(), kernels="packed"))[1]  # 3 bits
    before = {key: value.clone() for key, value in module.state_dict().items()}
    narrower = {**before, "bits": torch.tensor(2), "step": before["step"] * 2,
                "codes": torch.full_like(before["codes"], 3)}
    with pytest.raises(RuntimeError, match="do not fit 2-bit"):
        module.load_state_dict(narrower)
    after = module.state_dict()
    assert all(torch.equal(after[key], value) for key, value in before.items())
    assert module.num_bits == 3


def test_torch_export_traces_the_unpacking_from_the_packed_codes():
    qmodel = prepared_cnn()
    packed = msq_fx.convert(qmodel, kernels="packed", keep_float=True).eval()
    outputs(packed)  # the kept float weights exist; export must not capture them
    program = torch.export.export(packed, (X,))
    assert torch.equal(program.module()(X), outputs(qmodel))
    held = list(program.state_dict.values()) + list(program.constants.values())
    weights = {tuple(m.shape) for m in packed_modules(packed)}
    assert not [t for t in held if t.is_floating_point() and tuple(t.shape) in weights]


def test_torch_compile_traces_it_to_the_same_outputs():
    qmodel = prepared_cnn()
    packed = msq_fx.convert(qmodel, kernels="packed", keep_float=("conv",)).eval()
    compiled = torch.compile(packed, backend="aot_eager", fullgraph=True)
    assert torch.equal(outputs(compiled), outputs(qmodel))


def test_kept_float_weights_are_computed_once_and_survive_copies(tmp_path):
    qmodel = prepared_cnn()
    packed = msq_fx.convert(qmodel, kernels="packed", keep_float=("conv", "depthwise")).eval()
    conv, linear = packed.features[0].weight_quantizer, packed.classifier[0].weight_quantizer
    assert conv.keep_float and not linear.keep_float
    assert conv() is conv() and linear() is not linear()
    for copied in (copy.deepcopy(packed), pickle.loads(pickle.dumps(packed))):
        weight = copied.features[0].weight_quantizer
        assert weight.keep_float and weight() is weight()
        assert torch.equal(outputs(copied), outputs(qmodel))
    msq_fx.save(packed, tmp_path / "kept.msq")
    loaded = msq_fx.load(tmp_path / "kept.msq", trusted=True)
    assert loaded.features[0].weight_quantizer.keep_float
    assert torch.equal(outputs(loaded), outputs(qmodel))


def test_use_kernels_switches_in_place_and_keeps_tied_weights_one_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 10, bias=False))
    model[1].weight = model[0].weight  # tied
    tokens = torch.tensor([[1, 2, 3]])
    int_model = msq_fx.convert(msq_fx.prepare(model, tokens, msq_fx.MSQConfig(
        quantization=dict(init_bits=4)))).eval()
    expected = outputs(int_model, tokens)
    use_kernels(int_model, "packed")
    found = {id(m) for m in int_model.modules() if isinstance(m, LoweredWeight)}
    assert len(found) == 1 and isinstance(int_model[1].weight_quantizer, PackedWeight)
    assert int_model[0].weight_quantizer is int_model[1].weight_quantizer
    assert torch.equal(outputs(int_model, tokens), expected)
    use_kernels(int_model, "dequantize")
    assert type(int_model[1].weight_quantizer) is LoweredWeight
    assert torch.equal(outputs(int_model, tokens), expected)


def test_the_inference_weight_cache_serves_packed_weights():
    qmodel = prepared_cnn()
    packed = msq_fx.convert(qmodel, kernels="packed").eval()
    weight = packed.classifier[0].weight_quantizer
    with torch.no_grad(), cached_quantized_weights(packed):
        assert weight() is weight()
        assert torch.equal(packed(X), outputs(qmodel))
    assert weight.cache is None


@pytest.mark.parametrize("arguments, message", [
    (dict(kernels="int4"), "kernels must be one of"),
    (dict(kernels="packed", keep_float=("convolution",)), "unknown kinds"),
    (dict(keep_float=True), "applies to kernels='packed'"),
])
def test_bad_kernel_arguments_are_refused_before_anything_changes(arguments, message):
    qmodel = prepared_cnn()
    with pytest.raises(ValueError, match=message):
        msq_fx.convert(qmodel, inplace=True, **arguments)
    assert msq_fx.convert(qmodel) is not None  # still a prepared model
