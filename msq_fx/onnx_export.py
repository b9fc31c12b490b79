"""Export a converted model to ONNX with its quantized weights as integer initializers.

``torch.onnx.export`` of a converted model folds each weight's ``codes * step`` into a float
initializer: the file is as large as the float model's and the bit widths are gone. Here each
weight on the nested grid (``w = c * step``, a signed integer code times a scale) is written as
the standard ONNX weight-only quantization pattern instead,

    codes (INT4 initializer if the layer has at most 4 bits, else INT8)
        -> DequantizeLinear(scale=step, zero_point=0) -> Conv / Gemm / MatMul ...

which ONNX Runtime, TensorRT and other QDQ-aware runtimes read as a quantized weight. The
dequantized values are the converted model's weights exactly. With ``int2=True`` a layer of at
most 2 bits is an INT2 initializer instead, and the file opset 25 (the first with INT2 in
DequantizeLinear) instead of 21. A model prepared with
``act_bits`` also has each activation quantizer written as ``Clip -> QuantizeLinear ->
DequantizeLinear`` (UINT8 / INT8, or 16-bit types above 8 bits), the same rounding as its
``round(clip(x) / step) * step``: both inputs of a quantized layer are then integers in the
graph. The paper-literal grid (``MSQConfig(grid="literal")``) puts its codes at
``(c + 1/2) * step``, which no integer zero point expresses; those weights are exported
dequantized, in float, and listed as such.

Needs the ``onnx``, ``onnxscript`` and ``onnxruntime`` packages: the ``onnx`` extra
(``pip install -e ".[onnx]"`` in a checkout).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import Tensor, nn

from .io import atomic_write, require_converted
from .modules import LoweredActivation, LoweredWeight, rounded_to_grid
from .packed_weights import dequantizing_kernels

__all__ = ["export_onnx", "OnnxExport", "onnx_runtime_outputs", "onnx_runtime_session",
           "dequantize_weight", "dequantize_weight_per_channel", "quantize_activation",
           "ONNX_OPSET", "ONNX_OPSET_INT2", "INT4_MAX_BITS", "INT2_MAX_BITS", "INSTALL_HINT"]

ONNX_OPSET = 21  # the first opset with INT4 in DequantizeLinear
ONNX_OPSET_INT2 = 25  # the first opset with INT2 in DequantizeLinear
INT4_MAX_BITS = 4
INT2_MAX_BITS = 2
INSTALL_HINT = "install the onnx extra (pip install -e '.[onnx]' in a checkout)"
_PROTOBUF_LIMIT = 2**31 - 1  # a larger model keeps its initializers in an external data file


@torch.library.custom_op("msq_fx::dequantize_weight", mutates_args=())
def dequantize_weight(codes: Tensor, step: Tensor) -> Tensor:
    """``codes * step`` as one op, so the ONNX exporter can write it as DequantizeLinear."""
    return codes.to(step.dtype) * step


@dequantize_weight.register_fake
def _dequantize_weight_shape(codes: Tensor, step: Tensor) -> Tensor:
    return codes.new_empty(codes.shape, dtype=step.dtype)


@torch.library.custom_op("msq_fx::dequantize_weight_per_channel", mutates_args=())
def dequantize_weight_per_channel(codes: Tensor, step: Tensor) -> Tensor:
    """``codes * step`` with one step per slice along dim 0 (``step`` is 1-D), as one op, so
    the ONNX exporter can write it as a per-axis DequantizeLinear (axis 0)."""
    return codes.to(step.dtype) * step.reshape((-1,) + (1,) * (codes.dim() - 1))


@dequantize_weight_per_channel.register_fake
def _dequantize_weight_per_channel_shape(codes: Tensor, step: Tensor) -> Tensor:
    return codes.new_empty(codes.shape, dtype=step.dtype)


@torch.library.custom_op("msq_fx::quantize_activation", mutates_args=())
def quantize_activation(x: Tensor, low: Tensor, high: Tensor, step: Tensor,
                        onnx_type: int) -> Tensor:
    """``round(clip(x, low, high) / step) * step`` as one op, so the ONNX exporter can write it
    as Clip -> QuantizeLinear -> DequantizeLinear with integers of ``onnx_type``."""
    return rounded_to_grid(x, low, high, step)


@quantize_activation.register_fake
def _quantize_activation_shape(x: Tensor, low: Tensor, high: Tensor, step: Tensor,
                               onnx_type: int) -> Tensor:
    return torch.empty_like(x)


@dataclass(frozen=True)
class OnnxExport:
    """What ``export_onnx`` wrote.

    Attributes:
        path: the ONNX file.
        int4_weights / int8_weights: the quantized weights (by their first name in the model,
            e.g. ``features.0.weight``) stored as INT4 / INT8 initializers.
        float_weights: (weight, reason) for quantized weights exported dequantized, in float.
        initializers: weight -> the name of its codes initializer in the file.
        file_bytes: size of the file (plus its external data file, if any).
        quantized_activations: activation quantizers written as QuantizeLinear /
            DequantizeLinear (module names).
        int2_weights: the quantized weights stored as INT2 initializers (``int2=True``).
        opset: the file's ONNX opset (25 with INT2 weights, else 21).
    """

    path: Path
    int4_weights: tuple[str, ...]
    int8_weights: tuple[str, ...]
    float_weights: tuple[tuple[str, str], ...]
    initializers: dict[str, str]
    file_bytes: int
    quantized_activations: tuple[str, ...] = ()
    int2_weights: tuple[str, ...] = ()
    opset: int = ONNX_OPSET


def export_onnx(int_model: nn.Module, example_inputs: Any, path: str | os.PathLike, *,
                int4: bool = True, int2: bool = False,
                dynamic_shapes: Any = None) -> OnnxExport:
    """Write ``int_model`` (from ``msq_fx.convert``) to ``path`` as ONNX with integer weights.

    The model is exported in eval mode and left as it was given (mode and modules), also when
    export fails.

    Args:
        int_model: a converted model.
        example_inputs: a tensor or a tuple of positional inputs.
        path: the ONNX file to write.
        int4: store weights of at most 4 bits as INT4 (False: every quantized weight as INT8).
        int2: store weights of at most 2 bits as INT2, in a file of opset 25 (ONNX 1.20, ONNX
            Runtime 1.23 or later read it); else as ``int4`` says.
        dynamic_shapes: passed to ``torch.onnx.export``.

    Returns:
        An :class:`OnnxExport` saying which weights went in as INT2, INT4, INT8 or float.

    Example:
        >>> import os, tempfile, torch, msq_fx
        >>> from torch import nn
        >>> x = torch.randn(1, 3, 4, 4)
        >>> cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2))
        >>> int_model = msq_fx.convert(msq_fx.prepare(cnn, x))
        >>> directory = tempfile.TemporaryDirectory()
        >>> written = msq_fx.export_onnx(int_model, x, os.path.join(directory.name, "cnn.onnx"))
        >>> written.int8_weights, written.int4_weights
        (('0.weight', '3.weight'), ())
        >>> directory.cleanup()
    """
    require_converted(int_model, "msq_fx.export_onnx")
    # The exporter reads each weight's int8 codes buffer: packed weights lend theirs meanwhile.
    with dequantizing_kernels(int_model):
        return _export(int_model, example_inputs, Path(path), int4, int2, dynamic_shapes)


def _export(int_model: nn.Module, example_inputs: Any, destination: Path, int4: bool,
            int2: bool, dynamic_shapes: Any) -> OnnxExport:
    onnx, translations = _onnx_modules()
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    lowered = _lowered_weights(int_model)
    float_weights = tuple((module.names[0], "grid offset 1/2 (grid='literal'): no integer "
                                            "zero point")
                          for module in lowered if float(module.offset) != 0.0)
    integer = [module for module in lowered if float(module.offset) == 0.0]
    int2_weights = [module.names[0] for module in integer if int2
                    and module.num_bits <= INT2_MAX_BITS]
    opset = ONNX_OPSET_INT2 if int2_weights else ONNX_OPSET
    activations = {name: module for name, module in int_model.named_modules()
                   if isinstance(module, LoweredActivation)}
    was_training = int_model.training
    try:
        int_model.eval()
        with _as_one_op(integer, _one_op_forward), \
                _as_one_op(activations.values(), _one_op_activation_forward):
            program = torch.onnx.export(
                int_model, inputs, dynamo=True, opset_version=opset,
                dynamic_shapes=dynamic_shapes, verbose=False,
                custom_translation_table=translations)
    finally:
        int_model.train(was_training)
    proto = program.model_proto
    initializers = _initializer_names(int_model, integer, proto)
    int4_weights = [module.names[0] for module in integer if int4
                    and module.num_bits <= INT4_MAX_BITS and module.names[0] not in int2_weights]
    _store_as(onnx, proto, {initializers[name] for name in int4_weights}, "int4")
    _store_as(onnx, proto, {initializers[name] for name in int2_weights}, "int2")
    if int2_weights:  # INT2 tensors need the IR version of opset 25
        proto.ir_version = max(proto.ir_version, onnx.helper.find_min_ir_version_for(
            [onnx.helper.make_opsetid("", ONNX_OPSET_INT2)]))
    external = proto.ByteSize() > _PROTOBUF_LIMIT
    atomic_write(destination, lambda tmp: onnx.save_model(
        proto, tmp, save_as_external_data=external,
        location=destination.name + ".data" if external else None))
    size = destination.stat().st_size
    if external:
        size += (destination.parent / (destination.name + ".data")).stat().st_size
    narrow = set(int4_weights) | set(int2_weights)
    return OnnxExport(destination, tuple(int4_weights),
                      tuple(m.names[0] for m in integer if m.names[0] not in narrow),
                      float_weights, initializers, size, tuple(activations),
                      tuple(int2_weights), opset)


def onnx_runtime_outputs(path: str | os.PathLike, inputs: Tensor | tuple[Tensor, ...],
                         accuracy_level: str | None = "1") -> list[Tensor]:
    """The outputs of ONNX Runtime (CPU) running the file ``path`` on ``inputs`` (a tensor, or
    a tuple of tensors fed to the file's inputs in order).

    ONNX Runtime rewrites ``DequantizeLinear -> MatMul`` into ``MatMulNBits``, which at its
    default accuracy level (4) quantizes the activations to int8 at run time. Level "1" (the
    default here) computes in float32, so the outputs show whether the file holds the converted
    model's weights; None keeps ONNX Runtime's default.
    """
    config = ({} if accuracy_level is None
              else {"session.qdq_matmulnbits_accuracy_level": accuracy_level})
    session = onnx_runtime_session(path, config)
    tensors = inputs if isinstance(inputs, tuple) else (inputs,)
    names = [given.name for given in session.get_inputs()]
    if len(names) != len(tensors):
        raise ValueError(f"{path} takes {len(names)} inputs ({names}), {len(tensors)} given")
    outputs = session.run(None, {name: tensor.detach().cpu().numpy()
                                 for name, tensor in zip(names, tensors)})
    return [torch.from_numpy(output) for output in outputs]


def onnx_runtime_session(path: str | os.PathLike, config: dict[str, str] | None = None,
                         threads: int | None = None):
    """An ONNX Runtime CPU session on the file ``path``, with the session config entries
    ``config`` and, if given, ``threads`` intra-op threads (one inter-op thread)."""
    try:
        import onnxruntime
    except ImportError as error:
        raise ImportError(f"running an ONNX file needs onnxruntime: {INSTALL_HINT}") from error
    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _onnx_modules() -> tuple[Any, dict]:
    """The ``onnx`` module and the ONNX translations of this module's custom ops."""
    try:
        import ml_dtypes  # noqa: F401  (an onnx dependency: numpy's int4)
        import onnx
        import onnx.numpy_helper
        import onnxscript  # noqa: F401  (torch.onnx.export(dynamo=True) needs it)
        from onnxscript import opset21
    except ImportError as error:
        raise ImportError(f"msq_fx.export_onnx needs onnx and onnxscript ({error.name} is "
                          f"missing): {INSTALL_HINT}") from error

    def dequantize_linear(codes, step):
        zero_point = opset21.Constant(value=onnx.helper.make_tensor(
            "zero_point", onnx.TensorProto.INT8, [], [0]))
        return opset21.DequantizeLinear(codes, step, zero_point)

    def dequantize_linear_per_axis(codes, step):
        # No zero point: it defaults to 0 of the codes' type (a per-axis one would need the
        # scale's length).
        return opset21.DequantizeLinear(codes, step, axis=0)

    def quantize_dequantize(x, low, high, step, onnx_type: int):
        zero_point = opset21.Constant(value=onnx.helper.make_tensor(
            "zero_point", onnx_type, [], [0]))
        clipped = opset21.Clip(x, low, high)
        return opset21.DequantizeLinear(opset21.QuantizeLinear(clipped, step, zero_point), step,
                                        zero_point)

    return onnx, {torch.ops.msq_fx.dequantize_weight.default: dequantize_linear,
                  torch.ops.msq_fx.dequantize_weight_per_channel.default:
                      dequantize_linear_per_axis,
                  torch.ops.msq_fx.quantize_activation.default: quantize_dequantize}


def _lowered_weights(model: nn.Module) -> list[LoweredWeight]:
    """Each LoweredWeight of ``model`` once (a tied one is shared by several owners)."""
    found: dict[int, LoweredWeight] = {}
    for module in model.modules():
        if isinstance(module, LoweredWeight):
            found.setdefault(id(module), module)
    return list(found.values())


def _initializer_names(model: nn.Module, modules: list[LoweredWeight],
                       proto: Any) -> dict[str, str]:
    """Weight name -> the name of its codes initializer in ``proto``.

    torch.export names a buffer after one of the module paths that reach it, and for a tied
    weight that need not be the first; so each path is tried against the file's initializers.
    """
    in_file = {tensor.name for tensor in proto.graph.initializer}
    paths: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, LoweredWeight):
            paths.setdefault(id(module), []).append(f"{name}.codes")
    names = {}
    for module in modules:
        found = [path for path in paths[id(module)] if path in in_file]
        if len(found) != 1:
            raise RuntimeError(f"msq_fx.export_onnx: the codes of {module.names[0]} should be "
                               f"one initializer of the ONNX file, found {found or 'none'} "
                               f"among {paths[id(module)]}")
        names[module.names[0]] = found[0]
    return names


@contextlib.contextmanager
def _as_one_op(modules: Iterable[nn.Module], forward: Any) -> Iterator[None]:
    """Inside, each of ``modules`` runs ``forward`` (which calls one of the custom ops above)."""
    patched = []
    try:
        for module in modules:
            module.forward = forward.__get__(module)
            patched.append(module)
        yield
    finally:
        for module in patched:
            del module.forward


def _one_op_forward(self: LoweredWeight, _latent: Tensor | None = None) -> Tensor:
    if self.step.dim() > 0:  # one step per output channel: a per-axis DequantizeLinear
        return torch.ops.msq_fx.dequantize_weight_per_channel(self.codes, self.step.reshape(-1))
    return torch.ops.msq_fx.dequantize_weight(self.codes, self.step)


def _one_op_activation_forward(self: LoweredActivation, x: Tensor) -> Tensor:
    return torch.ops.msq_fx.quantize_activation(x, self.low, self.high, self.step,
                                                _ACTIVATION_TYPES[(self.signed, self.bits <= 8)])


# ONNX TensorProto element types (INT8 = 3, UINT8 = 2, INT16 = 5, UINT16 = 4) by (signed,
# at most 8 bits); kept as numbers so that this module imports without onnx.
_ACTIVATION_TYPES = {(True, True): 3, (False, True): 2, (True, False): 5, (False, False): 4}


def _store_as(onnx: Any, proto: Any, names: set[str], narrow: str) -> None:
    """Re-type the INT8 initializers ``names`` that feed a DequantizeLinear as ``narrow``
    ("int4" or "int2", ml_dtypes' names; and that node's zero point), in place."""
    import ml_dtypes
    import numpy as np

    dtype = getattr(ml_dtypes, narrow)
    initializers = {tensor.name: tensor for tensor in proto.graph.initializer}
    replaced_zero_points, retyped = set(), set()
    for node in proto.graph.node:
        codes_name = node.input[0] if node.op_type == "DequantizeLinear" else None
        if codes_name not in names or codes_name not in initializers:
            continue
        codes = onnx.numpy_helper.to_array(initializers[codes_name])
        initializers[codes_name].CopyFrom(
            onnx.numpy_helper.from_array(codes.astype(dtype), codes_name))
        zero_point = f"{codes_name}.zero_point"
        # A per-axis DequantizeLinear (one scale per channel) needs a zero point per channel.
        scale = initializers.get(node.input[1])
        shape = tuple(scale.dims) if scale is not None else ()
        proto.graph.initializer.append(
            onnx.numpy_helper.from_array(np.zeros(shape, dtype=dtype), zero_point))
        if len(node.input) > 2:
            replaced_zero_points.add(node.input[2])
            node.input[2] = zero_point
        else:
            node.input.append(zero_point)
        retyped.add(codes_name)
    if retyped != names:
        raise RuntimeError(f"msq_fx.export_onnx: no DequantizeLinear reads "
                           f"{sorted(names - retyped)} in the exported graph")
    # The exporter's type annotations of the codes still say INT8, which a checker refuses.
    element_type = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    for value in proto.graph.value_info:
        if value.name in retyped:
            value.type.tensor_type.elem_type = element_type
    _drop_unused_initializers(proto, replaced_zero_points)


def _drop_unused_initializers(proto: Any, candidates: set[str]) -> None:
    # The INT8 zero points that INT4 / INT2 ones replaced: runtimes warn about unused initializers.
    used = {name for node in proto.graph.node for name in node.input}
    used |= {output.name for output in proto.graph.output}
    kept = [tensor for tensor in proto.graph.initializer
            if tensor.name in used or tensor.name not in candidates]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
