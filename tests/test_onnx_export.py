"""Specification of msq_fx.export_onnx and ``msq-fx export-onnx``: integer weights in ONNX."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
import torch
import torchvision
from torch import nn

import msq_fx
import msq_fx.modules
import msq_fx.owners
from msq_fx.cli import main as cli_main
from msq_fx.onnx_export import onnx_runtime_outputs

X = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))


def converted_cnn(bits: list[int] | None = None, grid: str = "nested") -> nn.Module:
    """A SmallCNN converted with the given width per quantized weight (default: 8 bits each)."""
    torch.manual_seed(0)
    qmodel = msq_fx.prepare(msq_fx.SmallCNN(in_channels=1, width=8), X,
                            msq_fx.MSQConfig(quantization=dict(grid=grid)))
    for weight, width in zip(msq_fx.owners.iter_quantized_weights(qmodel), bits or []):
        weight.quantizer.bits.fill_(width)
    return msq_fx.convert(qmodel).eval()


MIXED_BITS = [3, 6, 4, 8, 2, 5]  # one width per SmallCNN weight


def onnx_output(path, inputs: torch.Tensor, accuracy_level: str | None = None) -> torch.Tensor:
    return onnx_runtime_outputs(path, inputs, accuracy_level)[0]


def initializer_types(path) -> dict[str, int]:
    return {tensor.name: tensor.data_type for tensor in onnx.load(str(path)).graph.initializer}


def test_onnx_runtime_gives_the_converted_model_output(tmp_path):
    int_model = converted_cnn(MIXED_BITS)
    result = msq_fx.export_onnx(int_model, X, tmp_path / "model.onnx")
    with torch.no_grad():
        expected = int_model(X)
    torch.testing.assert_close(onnx_output(result.path, X), expected, rtol=1e-5, atol=1e-6)


def test_weights_of_at_most_4_bits_are_int4_and_the_others_int8(tmp_path):
    result = msq_fx.export_onnx(converted_cnn(MIXED_BITS), X, tmp_path / "model.onnx")
    types = initializer_types(result.path)
    codes = sorted(name for name in types if name.endswith(".codes"))
    assert len(codes) == len(MIXED_BITS)
    assert {types[result.initializers[w]] for w in result.int4_weights} == {onnx.TensorProto.INT4}
    assert {types[result.initializers[w]] for w in result.int8_weights} == {onnx.TensorProto.INT8}
    assert len(result.int4_weights) == sum(width <= 4 for width in MIXED_BITS)
    assert sorted(result.initializers.values()) == codes


def test_each_quantized_weight_is_read_through_dequantize_linear_with_its_step(tmp_path):
    int_model = converted_cnn(MIXED_BITS)
    result = msq_fx.export_onnx(int_model, X, tmp_path / "model.onnx")
    proto = onnx.load(str(result.path))
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    dequantized = {node.input[0]: node for node in proto.graph.node
                   if node.op_type == "DequantizeLinear"}
    for name, lowered in int_model.named_modules():
        if isinstance(lowered, msq_fx.modules.LoweredWeight):
            node = dequantized[f"{name}.codes"]
            assert np.array_equal(initializers[node.input[0]].astype(np.int8),
                                  lowered.codes.numpy())
            assert initializers[node.input[1]] == lowered.step.numpy()
            assert initializers[node.input[2]].astype(np.int8) == 0


def test_no_float_copy_of_a_quantized_weight_is_stored(tmp_path):
    int_model = converted_cnn(MIXED_BITS)
    result = msq_fx.export_onnx(int_model, X, tmp_path / "model.onnx")
    weight_shapes = {tuple(m.codes.shape) for m in int_model.modules()
                     if isinstance(m, msq_fx.modules.LoweredWeight)}
    floats = [t for t in onnx.load(str(result.path)).graph.initializer
              if t.data_type == onnx.TensorProto.FLOAT and tuple(t.dims) in weight_shapes]
    assert floats == []


class TiedLinears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("int4", [False, True], ids=["int8", "int4"])
def test_a_tied_weight_is_stored_once_and_read_by_both_layers(tmp_path, int4):
    torch.manual_seed(0)
    inputs = torch.randn(4, 8)
    qmodel = msq_fx.prepare(TiedLinears(), inputs)
    qmodel.a.weight_quantizer.bits.fill_(4 if int4 else 8)
    int_model = msq_fx.convert(qmodel).eval()
    result = msq_fx.export_onnx(int_model, inputs, tmp_path / "tied.onnx")
    assert (result.int4_weights if int4 else result.int8_weights) == ("a.weight",)
    codes = [t.name for t in onnx.load(str(result.path)).graph.initializer
             if t.name.endswith(".codes")]
    assert codes == [result.initializers["a.weight"]]
    with torch.no_grad():
        expected = int_model(inputs)
    torch.testing.assert_close(onnx_output(result.path, inputs), expected, rtol=1e-5, atol=1e-6)


def test_int4_storage_makes_the_file_smaller_than_int8_only(tmp_path):
    int_model = converted_cnn([4] * len(MIXED_BITS))
    int4 = msq_fx.export_onnx(int_model, X, tmp_path / "int4.onnx")
    int8 = msq_fx.export_onnx(int_model, X, tmp_path / "int8.onnx", int4=False)
    assert int8.int4_weights == () and len(int8.int8_weights) == len(MIXED_BITS)
    assert int4.file_bytes < int8.file_bytes
    torch.testing.assert_close(onnx_output(int4.path, X), onnx_output(int8.path, X))


def test_literal_grid_weights_are_exported_in_float_and_listed(tmp_path):
    int_model = converted_cnn(grid="literal")
    result = msq_fx.export_onnx(int_model, X, tmp_path / "model.onnx")
    assert len(result.float_weights) == len(MIXED_BITS)
    assert all("no integer zero point" in reason for _, reason in result.float_weights)
    with torch.no_grad():
        expected = int_model(X)
    torch.testing.assert_close(onnx_output(result.path, X), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("act_bits,integer_type", [(8, onnx.TensorProto.UINT8),
                                                    (4, onnx.TensorProto.UINT8),
                                                    (12, onnx.TensorProto.UINT16)])
def test_quantized_activations_become_quantize_dequantize_pairs(tmp_path, act_bits, integer_type):
    torch.manual_seed(0)
    qmodel = msq_fx.prepare(msq_fx.SmallCNN(in_channels=1, width=8), X,
                            msq_fx.MSQConfig(quantization=dict(act_bits=act_bits)))
    int_model = msq_fx.convert(qmodel).eval()
    result = msq_fx.export_onnx(int_model, X, tmp_path / "model.onnx")
    activations = [name for name, m in int_model.named_modules()
                   if isinstance(m, msq_fx.modules.LoweredActivation)]
    assert list(result.quantized_activations) == activations
    proto = onnx.load(str(result.path))
    quantize = [node for node in proto.graph.node if node.op_type == "QuantizeLinear"]
    assert len(quantize) == len(activations)
    # The first layer sees the signed network input; the later ones ReLU / pooled outputs.
    types = {t.name: t.data_type for t in proto.graph.initializer}
    types |= {node.output[0]: node.attribute[0].t.data_type for node in proto.graph.node
              if node.op_type == "Constant"}
    zero_point_types = [types[node.input[2]] for node in quantize]
    signed_type = {onnx.TensorProto.UINT8: onnx.TensorProto.INT8,
                   onnx.TensorProto.UINT16: onnx.TensorProto.INT16}[integer_type]
    assert zero_point_types[0] == signed_type and set(zero_point_types[1:]) == {integer_type}
    with torch.no_grad():
        expected = int_model(X)
    torch.testing.assert_close(onnx_output(result.path, X), expected, rtol=1e-5, atol=1e-6)


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.image, self.side = nn.Linear(6, 4), nn.Linear(3, 4)

    def forward(self, x, y):
        return self.image(x) * self.side(y)


def test_a_model_with_two_inputs_exports_and_runs_on_both(tmp_path):
    torch.manual_seed(0)
    inputs = (torch.randn(2, 6), torch.randn(2, 3))
    int_model = msq_fx.convert(msq_fx.prepare(TwoInputs(), inputs)).eval()
    result = msq_fx.export_onnx(int_model, inputs, tmp_path / "two.onnx")
    with torch.no_grad():
        expected = int_model(*inputs)
    torch.testing.assert_close(onnx_runtime_outputs(result.path, inputs)[0], expected,
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"takes 2 inputs .* 1 given"):
        onnx_runtime_outputs(result.path, inputs[0])


def test_export_leaves_the_model_as_it_was_given(tmp_path):
    int_model = converted_cnn(MIXED_BITS).train()
    with torch.no_grad():
        before = int_model.eval()(X)
    int_model.train()
    msq_fx.export_onnx(int_model, X, tmp_path / "model.onnx")
    assert int_model.training
    assert all("forward" not in m.__dict__ for m in int_model.modules())
    with torch.no_grad():
        assert torch.equal(int_model.eval()(X), before)


def test_a_failed_export_leaves_the_model_and_no_file(tmp_path):
    int_model = converted_cnn(MIXED_BITS)
    with pytest.raises(Exception):
        msq_fx.export_onnx(int_model, torch.randn(2, 3, 16, 16), tmp_path / "model.onnx")
    assert all("forward" not in m.__dict__ for m in int_model.modules())
    assert list(tmp_path.iterdir()) == []


def test_a_prepared_model_is_refused_with_the_fix(tmp_path):
    qmodel = msq_fx.prepare(msq_fx.SmallCNN(in_channels=1, width=8), X)
    with pytest.raises(ValueError, match=r"export_onnx: .* is still a fake quantizer; call "
                                         r"msq_fx.convert\(model\) first"):
        msq_fx.export_onnx(qmodel, X, tmp_path / "model.onnx")


def test_a_torchvision_model_with_depthwise_convs_exports_and_runs(tmp_path):
    torch.manual_seed(0)
    inputs = torch.randn(1, 3, 64, 64)
    int_model = msq_fx.convert(msq_fx.prepare(
        torchvision.models.mobilenet_v3_small(num_classes=10), inputs)).eval()
    result = msq_fx.export_onnx(int_model, inputs, tmp_path / "mobilenet.onnx")
    assert len(result.int8_weights) == len(list(msq_fx.owners.iter_quantized_weights(int_model)))
    with torch.no_grad():
        expected = int_model(inputs)
    torch.testing.assert_close(onnx_output(result.path, inputs), expected, rtol=1e-4, atol=1e-5)


def test_a_timm_vit_runs_in_onnx_runtime_with_the_converted_weights(tmp_path):
    # ONNX Runtime turns DequantizeLinear -> MatMul into MatMulNBits; at accuracy level 1 it
    # computes in float32, so any difference would come from the weights in the file.
    import timm

    torch.manual_seed(0)
    inputs = torch.randn(1, 3, 32, 32)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                              num_classes=10)
    int_model = msq_fx.convert(msq_fx.prepare(model, inputs)).eval()
    result = msq_fx.export_onnx(int_model, inputs, tmp_path / "vit.onnx")
    with torch.no_grad():
        expected = int_model(inputs)
    torch.testing.assert_close(onnx_output(result.path, inputs, accuracy_level="1"), expected,
                               rtol=1e-4, atol=1e-5)


def test_cli_exports_a_saved_model_and_verifies_it(tmp_path, capsys):
    msq_fx.save(converted_cnn(MIXED_BITS), tmp_path / "model.msq")
    code = cli_main(["export-onnx", str(tmp_path / "model.msq"), str(tmp_path / "model.onnx"),
                     "--input-shape", "2x1x16x16", "--verify", "--trusted"])
    out = capsys.readouterr().out
    assert code == 0
    assert "3 weights as INT4, 3 as INT8, 0 in float" in out
    float32_line = next(line for line in out.splitlines() if "float32 compute" in line)
    assert float(float32_line.split("max |diff|")[1]) < 1e-5
    assert "ONNX Runtime defaults" in out
    assert (tmp_path / "model.onnx").exists()


def test_a_dynamic_batch_export_runs_at_another_batch_size(tmp_path):
    int_model = converted_cnn(MIXED_BITS)
    result = msq_fx.export_onnx(int_model, X, tmp_path / "model.onnx",
                                dynamic_shapes=({0: torch.export.Dim("batch")},))
    five = torch.randn(5, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = int_model(five)
    torch.testing.assert_close(onnx_output(result.path, five), expected, rtol=1e-5, atol=1e-6)


def test_cli_dynamic_batch_writes_a_file_for_any_batch(tmp_path, capsys):
    int_model = converted_cnn(MIXED_BITS)
    msq_fx.save(int_model, tmp_path / "model.msq")
    assert cli_main(["export-onnx", str(tmp_path / "model.msq"), str(tmp_path / "model.onnx"),
                     "--input-shape", "2x1x16x16", "--dynamic-batch", "--trusted"]) == 0
    three = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    assert onnx_output(tmp_path / "model.onnx", three).shape == (3, 10)


def test_cli_reads_the_pickled_structure_only_when_told_the_file_is_trusted(tmp_path, capsys):
    msq_fx.save(converted_cnn(MIXED_BITS), tmp_path / "model.msq")
    code = cli_main(["export-onnx", str(tmp_path / "model.msq"), str(tmp_path / "model.onnx"),
                     "--input-shape", "2x1x16x16"])
    assert code == 2
    assert "add --trusted" in capsys.readouterr().err and not (tmp_path / "model.onnx").exists()


def test_cli_names_a_file_it_cannot_load(tmp_path, capsys):
    (tmp_path / "not_a_model.msq").write_bytes(b"not a model")
    code = cli_main(["export-onnx", str(tmp_path / "not_a_model.msq"),
                     str(tmp_path / "out.onnx"), "--input-shape", "1x1x16x16"])
    assert code == 2
    assert "cannot load" in capsys.readouterr().err and not (tmp_path / "out.onnx").exists()
