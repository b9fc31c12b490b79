"""export_onnx(..., int2=True): layers of at most 2 bits as INT2 initializers (opset 25), run in
ONNX Runtime; and export of a model converted with kernels="packed"."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
import torch

import msq_fx
import msq_fx.owners
from msq_fx.onnx_export import onnx_runtime_outputs
from msq_fx.packed_weights import PackedWeight

X = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
WIDTHS = [2, 3, 4, 8, 1, 5]  # one per SmallCNN weight: two of them fit INT2


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def converted(scale: str, kernels: str = "dequantize"):
    torch.manual_seed(0)
    qmodel = msq_fx.prepare(msq_fx.SmallCNN(in_channels=1, width=8), X,
                            msq_fx.MSQConfig(quantization=dict(scale=scale)))
    for weight, width in zip(msq_fx.owners.iter_quantized_weights(qmodel), WIDTHS):
        weight.quantizer.bits.fill_(width)
    return msq_fx.convert(qmodel.eval(), kernels=kernels).eval()


@pytest.mark.parametrize("scale", ["max", "channel"])
def test_two_bit_layers_are_int2_and_onnx_runtime_gives_the_converted_output(tmp_path, scale):
    int_model = converted(scale)
    result = msq_fx.export_onnx(int_model, X, tmp_path / "model.onnx", int2=True)
    proto = onnx.load(str(result.path))
    onnx.checker.check_model(proto, full_check=True)
    assert result.opset == 25 and {(o.domain, o.version) for o in proto.opset_import} == {("", 25)}
    assert set(result.int2_weights) == {"features.0.weight", "classifier.0.weight"}
    assert len(result.int4_weights) == 2 and len(result.int8_weights) == 2
    initializers = {t.name: t for t in proto.graph.initializer}
    nodes = {node.input[0]: node for node in proto.graph.node
             if node.op_type == "DequantizeLinear"}
    for name in result.int2_weights:
        codes = initializers[result.initializers[name]]
        assert codes.data_type == onnx.TensorProto.INT2
        zero_point = initializers[nodes[codes.name].input[2]]
        assert zero_point.data_type == onnx.TensorProto.INT2
        scales = onnx.numpy_helper.to_array(initializers[nodes[codes.name].input[1]])
        assert scales.shape == (() if scale == "max" else (zero_point.dims[0],))
        assert not onnx.numpy_helper.to_array(zero_point).astype(np.int8).any()
        lowered = dict(int_model.named_modules())[codes.name.removesuffix(".codes")]
        assert np.array_equal(onnx.numpy_helper.to_array(codes).astype(np.int8),
                              lowered.codes.numpy())
    with torch.no_grad():
        expected = int_model(X)
    torch.testing.assert_close(onnx_runtime_outputs(result.path, X)[0], expected,
                               rtol=1e-5, atol=1e-6)


def test_without_int2_the_file_stays_opset_21_with_int4(tmp_path):
    result = msq_fx.export_onnx(converted("max"), X, tmp_path / "model.onnx")
    assert result.opset == 21 and result.int2_weights == ()
    assert len(result.int4_weights) == 4
    onnx.checker.check_model(onnx.load(str(result.path)), full_check=True)


def test_a_packed_model_exports_as_its_int8_model_does_and_stays_packed(tmp_path):
    packed = converted("channel", kernels="packed")
    modules = [m for m in packed.modules() if isinstance(m, PackedWeight)]
    result = msq_fx.export_onnx(packed, X, tmp_path / "packed.onnx", int2=True)
    reference = msq_fx.export_onnx(converted("channel"), X, tmp_path / "int8.onnx", int2=True)
    assert result.initializers == reference.initializers
    assert result.int2_weights == reference.int2_weights
    assert [m for m in packed.modules() if isinstance(m, PackedWeight)] == modules
    with torch.no_grad():
        expected = packed(X)
    torch.testing.assert_close(onnx_runtime_outputs(result.path, X)[0], expected,
                               rtol=1e-5, atol=1e-6)
