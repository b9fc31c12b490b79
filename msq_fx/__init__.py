"""msq_fx: MSQ mixed-precision quantization (Han et al. 2025) for any PyTorch model.

    qmodel = msq_fx.prepare(model, example_inputs, msq_fx.MSQConfig())
    ...train with quantization-aware training...
    int_model = msq_fx.convert(qmodel)
    print(msq_fx.report(int_model))
    msq_fx.save(int_model, "model.msq")   # codes bit-packed: n bits per weight on disk

    msq_fx.assert_quantizes(model, input_size=64)   # in a test suite: does it quantize?

    tuned = msq_fx.fine_tune(model, example_inputs, train_loader, target=8.0)  # a trained model
    int_model = msq_fx.convert(tuned.model)

The names below are the package's surface; everything else is imported from its module
(``msq_fx.weight_cache.cached_quantized_weights``, ``msq_fx.hessian.hutchinson_traces``, ...).
"""
from .api import convert, prepare
from .check import assert_quantizes, check_model
from .config import HessianConfig, MSQConfig, PruningConfig, QuantizationConfig
from .controller import MSQController
from .errors import MSQError
from .fine_tune import FineTuneConfig, FineTuned, fine_tune
from .io import load, save, saved_config, saved_report
from .models import SmallCNN, resnet20
from .onnx_export import export_onnx
from .plots import plot_history
from .report import report

__all__ = [
    "prepare", "convert", "MSQConfig", "QuantizationConfig", "PruningConfig", "HessianConfig",
    "MSQController", "MSQError", "report", "save", "load", "saved_config", "saved_report",
    "export_onnx", "check_model", "assert_quantizes", "plot_history", "resnet20", "SmallCNN",
    "fine_tune", "FineTuneConfig", "FineTuned",
]
__version__ = "0.1.0"
