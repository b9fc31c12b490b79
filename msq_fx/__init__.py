"""msq_fx: MSQ mixed-precision quantization (Han et al. 2025) for any PyTorch model.

    qmodel = msq_fx.prepare(model, example_inputs, msq_fx.MSQConfig())
    ...train with quantization-aware training...
    int_model = msq_fx.convert(qmodel)
    print(msq_fx.report(int_model))
    msq_fx.save(int_model, "model.msq")   # codes bit-packed: n bits per weight on disk

    msq_fx.assert_quantizes(model, input_size=64)   # in a test suite: does it quantize?
"""
from .api import MSQError, convert, prepare
from .check import CheckResult, assert_quantizes, check_model
from .config import MSQConfig
from .controller import MSQController, PruneRecord
from .hessian import HessianTraces, NoSecondDerivative, finite_difference_traces, hutchinson_traces
from .probes import ScaledProbes
from .io import load, save, saved_config, saved_report
from .offload import offload_saved_tensors, release_freed_memory
from .onnx_export import OnnxExport, export_onnx
from .plots import plot_history
from .models import SmallCNN, resnet20
from .modules import ActivationFakeQuant, LoweredActivation, LoweredWeight, WeightFakeQuant
from .owners import QuantizedWeight, iter_quantized_weights
from .weight_cache import cached_quantized_weights
from .report import FloatRow, LayerRow, Report, report

__all__ = [
    "MSQConfig", "MSQError", "MSQController", "PruneRecord", "HessianTraces", "hutchinson_traces",
    "finite_difference_traces", "ScaledProbes", "NoSecondDerivative", "prepare", "convert",
    "report", "Report", "LayerRow", "FloatRow", "save", "load", "saved_report", "saved_config",
    "export_onnx", "OnnxExport", "plot_history",
    "WeightFakeQuant", "LoweredWeight", "ActivationFakeQuant", "LoweredActivation",
    "QuantizedWeight",
    "iter_quantized_weights", "cached_quantized_weights", "resnet20", "SmallCNN",
    "check_model", "assert_quantizes", "CheckResult", "offload_saved_tensors",
    "release_freed_memory",
]
__version__ = "0.1.0"
