"""msq_fx.check / ``msq-fx check``: the end-to-end check on real models.

The CI subset covers the capture paths that matter for real architectures: a model plain
``torch.fx.symbolic_trace`` cannot trace, a weight used functionally (BEiT's
``F.linear(x, self.qkv.weight)``), ``nn.MultiheadAttention`` and depthwise convs, plus the ops
whose double backward the Hessian needs special handling for (fused attention, hardsigmoid).
Every model of the subset must pass. The sweep over a whole zoo (tools/zoo_sweep) is tested in
test_zoo_sweep.py.
"""
from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from timm.models.beit import Beit
from torch import nn

import msq_fx
from msq_fx import cli
from msq_fx.check import CheckResult, SpecError, check_model
from msq_fx.check.compare import difference_fields, require_same_shapes
from msq_fx.check.train import sgd_steps_in_backward
from msq_fx.zoo import describe_error

THIS_MODULE = Path(__file__).stem  # tests/ is on sys.path, so factories here are specs too

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------- factories used as specs

class ParameterSum(nn.Module):
    """Adds the sum of its own parameters to its output. Conversion removes the float latent
    weights from the parameters, so the converted model computes something else."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        out = self.fc(self.conv(x).mean((2, 3)))
        return out + sum(p.sum() for p in self.parameters())


def parameter_sum_model() -> nn.Module:
    return ParameterSum()


def factory_that_raises() -> nn.Module:
    raise RuntimeError("weights server unreachable")


def resnet20_without_input_size() -> nn.Module:
    return msq_fx.resnet20()


class TinyMHA(nn.Module):
    """Patch embedding + nn.MultiheadAttention (need_weights=True: the explicit attention path)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 32, 8, stride=8)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        attended, _ = self.attn(tokens, tokens, tokens)
        return self.head(attended.mean(1))


class OutOfMemoryInTraining(nn.Module):
    """Runs in eval mode; a training forward with autograd fails to allocate, as a model too big
    for the machine does (the eager float model fails the same way)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 10)

    def forward(self, x):
        if self.training and torch.is_grad_enabled():
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to "
                               "allocate 26214400 bytes")
        return self.fc(x.mean((2, 3)))


def out_of_memory_in_training() -> nn.Module:
    return OutOfMemoryInTraining()


class OutOfMemoryAboveOneSample(nn.Module):
    """Trains on one sample at a time; a training batch of more runs out of memory."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 10)

    def forward(self, x):
        if self.training and torch.is_grad_enabled() and x.shape[0] > 1:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to "
                               "allocate 26214400 bytes")
        return self.fc(x.mean((2, 3)))


def out_of_memory_above_one_sample() -> nn.Module:
    return OutOfMemoryAboveOneSample()


class OutOfMemoryAboveOneSampleThenBroken(OutOfMemoryAboveOneSample):
    """Out of memory above one sample, and broken in training at one sample."""

    def forward(self, x):
        if self.training and torch.is_grad_enabled() and x.shape[0] == 1:
            raise RuntimeError("shape mismatch: this model needs two samples")
        return super().forward(x)


def out_of_memory_then_broken() -> nn.Module:
    return OutOfMemoryAboveOneSampleThenBroken()


class ShiftedWhile(nn.Module):
    """Adds 1 to its output while ``condition()`` holds: what a wrong export or compiled graph
    would look like."""

    def __init__(self, condition) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 10)
        self.condition = condition

    def forward(self, x):
        shift = 1.0 if self.condition() else 0.0
        return self.fc(x.mean((2, 3))) + shift


def exports_differently() -> nn.Module:
    return ShiftedWhile(torch.compiler.is_exporting)


def compiles_differently() -> nn.Module:
    return ShiftedWhile(torch.compiler.is_compiling)


class BreaksTheGraph(nn.Module):
    """Prints a value it computed: one graph break under torch.compile, the same output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        features = self.conv(x).mean((2, 3))
        if float(features.detach().abs().sum()) < 0:  # never true: reading it is the break
            print("negative")
        return self.fc(features)


def breaks_the_graph() -> nn.Module:
    return BreaksTheGraph()


class DataDependentBranch(nn.Module):
    """Runs eagerly, but its branch on a value cannot be captured by torch.export."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 10)

    def forward(self, x):
        out = self.fc(x.mean((2, 3)))
        return out if out.sum() > 0 else -out


def data_dependent_branch() -> nn.Module:
    return DataDependentBranch()


#: What MemoryHungryInTraining allocates in a training forward.
HUNGRY_MIB = 256


class MemoryHungryInTraining(nn.Sequential):
    """Allocates HUNGRY_MIB of scratch memory in every training forward, and nowhere else."""

    def __init__(self) -> None:
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 10))

    def forward(self, x):
        if self.training and torch.is_grad_enabled():
            # float32, 4 bytes each and all written; from x, so a symbolic trace allocates none
            x = x + x.new_ones(HUNGRY_MIB * 2**18).mean()
        return super().forward(x)


def memory_hungry_in_training() -> nn.Module:
    return MemoryHungryInTraining()


def tiny_torchvision_vit() -> nn.Module:
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2,
                                                num_heads=4, hidden_dim=64, mlp_dim=128,
                                                num_classes=10)


def tiny_beit(fused_attention: bool = False) -> nn.Module:
    """BEiT at toy size; it reads its qkv weight functionally: F.linear(x, self.qkv.weight, ...).
    Fused attention (SDPA) is off by default, so this case tests the functional use alone."""
    model = Beit(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused_attention
    return model


def tiny_beit_with_sdpa() -> nn.Module:
    return tiny_beit(fused_attention=True)


# --------------------------------------------------------------- check_model

def test_resnet20_spec_passes_with_every_weight_quantized():
    result = check_model("msq_fx.models:resnet20", input_size=32)
    assert isinstance(result, CheckResult)
    assert (result.status, result.reason, result.stage) == ("PASS", "", None)
    assert result.quantized_weights == 20 and result.float_weights == []
    assert result.max_abs_diff == 0.0 and result.rel_diff == 0.0
    assert result.input_size == (3, 32, 32)
    assert result.graph_nodes > 20 and result.leaves == 0 and result.trace_failure is None
    assert 1 < result.compression <= 32 / 7  # the prune took every group below 8 bits
    assert result.hessian_method == "autograd"
    assert "layer3.2.conv2.weight" in result.table and "compression" in result.table
    assert set(result.stage_seconds) == {"build", "forward", "trace", "prepare", "train",
                                         "prune", "convert", "compare"}
    assert result.summary_line() == ("PASS msq_fx.models:resnet20 (20 weights quantized, "
                                     "max |diff| 0)")


def raised_from(cause: BaseException, message: str) -> RuntimeError:
    try:
        try:
            raise cause
        except BaseException as error:
            raise RuntimeError(message) from error
    except RuntimeError as wrapped:
        return wrapped


def test_an_error_is_described_by_its_type_and_first_line():
    assert describe_error(ValueError("bad shape\nmore detail")) == "ValueError: bad shape"


def test_a_wrapping_error_is_described_with_the_error_it_was_raised_from():
    error = raised_from(KeyError("qkv"), "export failed. Next steps:")
    assert (describe_error(error)
            == "RuntimeError: export failed. Next steps: (from KeyError: 'qkv')")


def test_a_cause_the_message_already_quotes_is_not_repeated():
    error = raised_from(ValueError("no such op"), "prepare failed: no such op")
    assert describe_error(error) == "RuntimeError: prepare failed: no such op"


def test_terminal_colour_codes_are_removed_from_a_description():
    assert describe_error(RuntimeError("\x1b[96mstep 1/3\x1b[0m failed")) == \
        "RuntimeError: step 1/3 failed"


def test_outputs_of_other_shapes_are_refused_naming_both_sides_and_their_shapes():
    with pytest.raises(ValueError, match=r"output shapes differ: eager \[\(2, 3\)\], "
                                         r"compiled \[\(2, 4\)\]"):
        require_same_shapes(("eager", [torch.zeros(2, 3)]), ("compiled", [torch.zeros(2, 4)]))


def test_outputs_of_another_number_are_refused():
    with pytest.raises(ValueError, match="output shapes differ"):
        require_same_shapes(("converted", [torch.zeros(1)]),
                            ("exported", [torch.zeros(1), torch.zeros(1)]))


def test_no_outputs_at_all_are_refused():
    with pytest.raises(ValueError, match="output shapes differ: fake-quant \\[\\]"):
        require_same_shapes(("fake-quant", []), ("converted", []))


def test_a_difference_is_recorded_absolute_and_relative_to_the_largest_output():
    assert difference_fields(0.5, 4.0) == {"max_abs_diff": 0.5, "rel_diff": 0.125}
    assert difference_fields(0.5, 0.0) == {"max_abs_diff": 0.5, "rel_diff": 0.5}


def test_exports_asked_for_are_run_and_compared_with_the_converted_model():
    result = check_model("msq_fx.models:resnet20", input_size=32, exports=("torch", "onnx"))
    assert (result.status, result.reason) == ("PASS", "")
    assert set(result.exports) == {"torch", "onnx"}
    assert result.exports["torch"]["max_abs_diff"] == 0.0
    assert result.exports["onnx"]["rel_diff"] < 1e-5
    assert (result.exports["onnx"]["int8_weights"] + result.exports["onnx"]["int4_weights"],
            result.exports["onnx"]["float_weights"]) == (20, 0)
    assert {"export:torch", "export:onnx"} <= set(result.stage_seconds)
    assert "torch export max |diff| 0" in result.summary_line()
    assert "onnx export max |diff|" in result.summary_line()


def test_an_export_that_changes_the_output_fails_at_its_stage():
    result = check_model(f"{THIS_MODULE}:exports_differently", input_size=8, exports=("torch",))
    assert (result.status, result.stage) == ("FAIL", "export:torch")
    assert result.reason.startswith("export:torch: exported output differs from the converted")
    assert result.exports["torch"]["max_abs_diff"] == pytest.approx(1.0)


def test_a_model_that_cannot_be_exported_fails_naming_the_error():
    result = check_model(f"{THIS_MODULE}:data_dependent_branch", input_size=8,
                         exports=("torch",))
    assert (result.status, result.stage) == ("FAIL", "export:torch")
    assert result.max_abs_diff == 0.0  # the converted model itself is right
    assert result.reason.startswith("export:torch: ") and "data-dependent" in result.reason.lower()
    assert result.exports == {}


def test_without_exports_the_check_exports_nothing():
    result = check_model(f"{THIS_MODULE}:exports_differently", input_size=8)
    assert result.status == "PASS" and result.exports == {}


def test_an_unknown_export_format_is_refused():
    with pytest.raises(ValueError, match=r"unknown export format\(s\) \['tflite'\]"):
        check_model("msq_fx.models:resnet20", input_size=32, exports=("tflite",))


def test_the_compile_stage_runs_the_prepared_model_compiled_in_one_graph():
    result = check_model("msq_fx.models:resnet20", input_size=32, torch_compile=True)
    assert (result.status, result.reason) == ("PASS", "")
    assert result.compiled == {"graphs": 1, "graph_breaks": 0, "break_reasons": [],
                               "max_abs_diff": 0.0, "rel_diff": 0.0}
    assert "compile" in result.stage_seconds
    assert "compiled in 1 graph" in result.summary_line()


def test_a_graph_break_is_reported_with_its_place_and_is_not_a_failure():
    result = check_model(f"{THIS_MODULE}:breaks_the_graph", input_size=8, torch_compile=True)
    assert result.status == "PASS"
    assert result.compiled["graph_breaks"] >= 1 and result.compiled["graphs"] >= 2
    assert f"{THIS_MODULE}.py:" in result.compiled["break_reasons"][0]


def test_a_compiled_model_that_changes_the_output_fails_at_the_compile_stage():
    result = check_model(f"{THIS_MODULE}:compiles_differently", input_size=8,
                         torch_compile=True)
    assert (result.status, result.stage) == ("FAIL", "compile")
    assert result.reason.startswith("compile: the compiled model's output differs")
    assert result.compiled["max_abs_diff"] == pytest.approx(1.0)


def test_without_compile_the_check_compiles_nothing():
    result = check_model(f"{THIS_MODULE}:compiles_differently", input_size=8)
    assert result.status == "PASS" and result.compiled is None


def test_the_peak_memory_rises_at_the_stage_that_needed_the_memory():
    # The peak is the process's high-water mark, so the check runs in a fresh process. Linux
    # keeps the high-water mark across exec, and a process started from this one would begin at
    # this one's peak: the shell forks it instead (the command after it rules out an exec).
    check = [sys.executable, "-m", "msq_fx.cli", "check", "--json", "--threads", "1", "--steps",
             "1", "--input-size", "3x8x8", f"{THIS_MODULE}:memory_hungry_in_training"]
    completed = subprocess.run(["sh", "-c", '"$@"; exit $?', "sh", *check],
                               cwd=Path(__file__).parent, capture_output=True, text=True,
                               timeout=600)
    assert completed.returncode == 0, completed.stderr
    row = json.loads(completed.stdout)
    peaks = row["peak_memory_mib"]
    assert row["status"] == "PASS" and list(peaks) == list(row["stage_seconds"])
    assert peaks["build"] > 100  # torch alone is more than that
    assert peaks["prepare"] - peaks["build"] < HUNGRY_MIB / 2  # nothing trained yet
    assert peaks["train"] - peaks["prepare"] > 0.75 * HUNGRY_MIB


def test_torchvision_model_passes_at_a_small_input_size():
    result = check_model("torchvision:resnet18", input_size=32)
    assert result.status == "PASS", result.reason
    assert result.input_size == (3, 32, 32) and result.quantized_weights == 21


def test_a_module_can_be_checked_directly_and_is_not_modified():
    model = msq_fx.resnet20()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = check_model(model, input_size=(32, 32))
    assert result.status == "PASS" and result.model == "CifarResNet"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_weight_standardized_conv_passes_and_the_result_notes_the_transform():
    from timm.layers import StdConv2d

    torch.manual_seed(0)
    model = nn.Sequential(StdConv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 4))
    result = check_model(model, input_size=(16, 16))
    assert result.status == "PASS", result.reason
    assert len(result.notes) == 1
    assert ("through other ops (batch_norm" in result.notes[0]
            and ", 1: 0.weight." in result.notes[0])


def test_the_checks_sgd_steps_land_inside_backward_with_each_gradient_clipped_on_its_own():
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    x = 100 * torch.randn(5, 4)
    before = {name: p.detach().clone() for name, p in layer.named_parameters()}
    grads = dict(zip(before, torch.autograd.grad(layer(x).square().sum(),
                                                 list(layer.parameters()))))
    with sgd_steps_in_backward(layer, lr=0.1, max_norm=1.0):
        layer(x).square().sum().backward()
    for name, param in layer.named_parameters():
        grad = grads[name]
        expected = before[name] - 0.1 * grad * min(1.0, 1.0 / float(grad.norm()))
        assert torch.allclose(param.detach(), expected, rtol=1e-5, atol=1e-7), name
        assert param.grad is None  # freed as soon as it was used
    assert float(grads["weight"].norm()) > 1.0  # so the clipping was exercised


def test_excluded_weights_are_listed_as_float_with_the_reason():
    config = msq_fx.check.check_config().replace(quantization=dict(exclude=(r"^fc\.",)))
    result = check_model("msq_fx.models:resnet20", input_size=32, config=config)
    assert result.status == "PASS"
    assert result.quantized_weights == 19
    assert result.float_weights == [{"name": "fc.weight", "kind": "linear",
                                     "reason": "excluded by MSQConfig.quantization.exclude "
                                               "pattern '^fc\\\\.'"}]


def test_a_model_that_breaks_after_conversion_fails_at_compare():
    result = check_model(f"{THIS_MODULE}:parameter_sum_model", input_size=8)
    assert (result.status, result.stage) == ("FAIL", "compare")
    assert result.reason.startswith("compare: converted output differs from the fake-quant output")
    assert result.max_abs_diff > 0 and "FAIL" in result.summary_line()


def test_a_factory_that_raises_is_a_skip_naming_the_error():
    result = check_model(f"{THIS_MODULE}:factory_that_raises", input_size=8)
    assert (result.status, result.stage) == ("SKIP", "build")
    assert result.reason == ("build: model cannot be built: RuntimeError: weights server "
                             "unreachable")


def test_a_model_that_does_not_run_at_the_input_size_is_a_skip():
    result = check_model("msq_fx.models:resnet20", input_size=(1, 32, 32))
    assert (result.status, result.stage) == ("SKIP", "forward")
    assert "model does not run eagerly at input (2, 1, 32, 32): RuntimeError" in result.reason


def test_running_out_of_memory_in_training_is_a_failure_not_a_skip():
    result = check_model(f"{THIS_MODULE}:out_of_memory_in_training", input_size=(3, 8, 8))
    assert (result.status, result.stage) == ("FAIL", "train")
    assert result.reason.startswith("train: RuntimeError: DefaultCPUAllocator: can't allocate")


def test_a_model_out_of_memory_at_the_batch_is_checked_again_at_batch_1():
    result = check_model(f"{THIS_MODULE}:out_of_memory_above_one_sample", input_size=(3, 8, 8))
    assert (result.status, result.batch_size) == ("PASS", 1)
    assert result.note == "at batch 1: batch 2 ran out of memory in train"
    assert result.summary_line().endswith("; at batch 1: batch 2 ran out of memory in train)")


def test_when_batch_1_fails_otherwise_the_out_of_memory_at_the_batch_is_the_finding():
    result = check_model(f"{THIS_MODULE}:out_of_memory_then_broken", input_size=(3, 8, 8))
    assert (result.status, result.stage, result.batch_size) == ("FAIL", "train", 2)
    assert "can't allocate memory" in result.reason
    assert result.note == ("at batch 1: SKIP (train: model does not run eagerly in train mode at "
                           "input (1, 3, 8, 8): RuntimeError: shape mismatch: this model needs "
                           "two samples)")


def test_out_of_memory_in_training_at_batch_1_names_the_options_that_need_less():
    result = check_model(f"{THIS_MODULE}:out_of_memory_in_training", input_size=(3, 8, 8))
    assert result.note.startswith("at batch 1: FAIL (train: RuntimeError: DefaultCPUAllocator")
    assert result.note.endswith("; to check it in less memory, try offload_activations=True "
                                "(msq-fx check --offload-activations or --lean-retry)")


def test_a_failures_summary_line_ends_with_its_note():
    result = check_model(f"{THIS_MODULE}:out_of_memory_in_training", input_size=(3, 8, 8))
    assert result.summary_line().endswith(f" ({result.note})") and result.note


def test_a_check_asked_at_batch_1_that_runs_out_of_memory_is_not_retried_but_advised():
    result = check_model(f"{THIS_MODULE}:out_of_memory_in_training", input_size=(3, 8, 8),
                         batch_size=1)
    assert (result.status, result.batch_size) == ("FAIL", 1)
    assert result.note == ("to check it in less memory, try offload_activations=True "
                           "(msq-fx check --offload-activations or --lean-retry)")


def test_the_advice_leaves_out_options_already_in_effect():
    result = check_model(f"{THIS_MODULE}:out_of_memory_in_training", input_size=(3, 8, 8),
                         batch_size=1, offload_activations=True)
    assert result.status == "FAIL" and result.note == ""


def test_out_of_memory_in_the_prune_advises_the_finite_difference_hessian_too(monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                           "26214400 bytes")
    monkeypatch.setattr(msq_fx.MSQController, "epoch_end", out_of_memory)
    result = check_model("msq_fx.models:resnet20", input_size=8, batch_size=1, steps=1)
    assert (result.status, result.stage) == ("FAIL", "prune")
    assert result.note == (
        "to check it in less memory, try config hessian={'method': 'finite_difference'}, "
        "offload_activations=True (msq-fx check --hessian-method finite_difference "
        "--offload-activations or --lean-retry)")


class OutOfMemoryInTrainingUnlessOffloaded(nn.Module):
    """Trains only while saved activations go to disk (the ``offloading`` fixture tells it), as
    a model whose activations at one sample exceed the memory does."""

    offloading = False

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 10)

    def forward(self, x):
        if self.training and torch.is_grad_enabled() and not self.offloading:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to "
                               "allocate 26214400 bytes")
        return self.fc(x.mean((2, 3)))


def out_of_memory_unless_offloaded() -> nn.Module:
    return OutOfMemoryInTrainingUnlessOffloaded()


@pytest.fixture
def offloading(monkeypatch):
    """Lets OutOfMemoryInTrainingUnlessOffloaded see when the check offloads activations."""
    real = msq_fx.check.pipeline.offload_saved_tensors

    @contextlib.contextmanager
    def telling(*args, **kwargs):
        with real(*args, **kwargs) as hooks:
            monkeypatch.setattr(OutOfMemoryInTrainingUnlessOffloaded, "offloading", True)
            try:
                yield hooks
            finally:
                monkeypatch.setattr(OutOfMemoryInTrainingUnlessOffloaded, "offloading", False)
    monkeypatch.setattr(msq_fx.check.pipeline, "offload_saved_tensors", telling)


def test_the_lean_retry_checks_a_model_that_needs_its_activations_on_disk(offloading):
    result = check_model(f"{THIS_MODULE}:out_of_memory_unless_offloaded", input_size=(3, 8, 8),
                         lean_retry=True)
    assert (result.status, result.batch_size) == ("PASS", 1)
    assert result.offloaded_mib is not None
    assert result.note == ("at batch 1 with offload_activations=True: batch 2 ran out of memory "
                           "in train, batch 1 in train")


def test_without_the_lean_retry_the_same_model_fails_with_advice(offloading):
    result = check_model(f"{THIS_MODULE}:out_of_memory_unless_offloaded", input_size=(3, 8, 8))
    assert (result.status, result.stage) == ("FAIL", "train")
    assert result.note.endswith("try offload_activations=True "
                                "(msq-fx check --offload-activations or --lean-retry)")


def test_the_lean_retry_of_a_check_asked_at_batch_1_runs_once_more(offloading):
    result = check_model(f"{THIS_MODULE}:out_of_memory_unless_offloaded", input_size=(3, 8, 8),
                         batch_size=1, lean_retry=True)
    assert (result.status, result.batch_size) == ("PASS", 1)
    assert result.note == ("at batch 1 with offload_activations=True: it ran out of memory "
                           "in train")


def test_a_failed_lean_retry_is_noted_after_the_batch_1_failure():
    result = check_model(f"{THIS_MODULE}:out_of_memory_in_training", input_size=(3, 8, 8),
                         lean_retry=True)
    assert (result.status, result.stage, result.batch_size) == ("FAIL", "train", 2)
    assert result.note.startswith("at batch 1: FAIL (train: RuntimeError: DefaultCPUAllocator")
    assert "; at batch 1 with offload_activations=True: FAIL (train: RuntimeError: " \
           "DefaultCPUAllocator" in result.note


def test_the_lean_retry_of_the_prune_also_takes_the_finite_difference_hessian(monkeypatch):
    real_epoch_end = msq_fx.MSQController.epoch_end

    def out_of_memory_with_double_backward(self, *args, **kwargs):
        if self.config.hessian.method != "finite_difference":
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to "
                               "allocate 26214400 bytes")
        return real_epoch_end(self, *args, **kwargs)
    monkeypatch.setattr(msq_fx.MSQController, "epoch_end", out_of_memory_with_double_backward)
    result = check_model("msq_fx.models:resnet20", input_size=8, batch_size=1, steps=1,
                         lean_retry=True)
    assert result.status == "PASS"
    assert result.hessian_method == "finite_difference" and result.offloaded_mib is not None
    assert result.note == ("at batch 1 with config hessian={'method': 'finite_difference'}, "
                           "offload_activations=True: it ran out of memory in prune")


def test_a_model_that_fits_is_checked_once_at_the_batch_asked_for():
    result = check_model("msq_fx.models:resnet20", input_size=32, batch_size=3, steps=1)
    assert (result.status, result.batch_size, result.note) == ("PASS", 3, "")


@pytest.mark.parametrize("spec, message", [
    ("resnet18", "expected timm:NAME, torchvision:NAME or package.module:factory"),
    ("torchvision:resnet1800", r"unknown torchvision model 'resnet1800' "
                               r"\(did you mean resnet18"),
    ("timm:resnet_nonexistent", "unknown timm model 'resnet_nonexistent'"),
    ("msq_fx.no_such_module:resnet20", "cannot import module 'msq_fx.no_such_module'"),
    ("msq_fx.models:resnet21", r"has no callable 'resnet21' \(did you mean resnet20"),
])
def test_a_bad_spec_is_a_clear_error(spec, message):
    with pytest.raises(SpecError, match=message):
        check_model(spec)


def test_a_factory_model_without_a_declared_input_size_asks_for_one():
    with pytest.raises(ValueError, match="declares no input size.*pass input_size"):
        check_model(f"{THIS_MODULE}:resnet20_without_input_size")


# --------------------------------------------------------------- msq-fx check

def test_cli_prints_the_table_and_a_pass_line(capsys):
    assert cli.main(["check", "msq_fx.models:resnet20", "--input-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "layer1.0.conv1.weight" in out
    assert out.rstrip().splitlines()[-1] == ("PASS msq_fx.models:resnet20 (20 weights quantized, "
                                             "max |diff| 0)")


def test_cli_exits_non_zero_when_a_model_fails(capsys):
    code = cli.main(["check", "msq_fx.models:resnet20", f"{THIS_MODULE}:parameter_sum_model",
                     "--input-size", "32"])
    assert code == 1
    lines = capsys.readouterr().out.rstrip().splitlines()
    assert lines[-1].startswith(f"FAIL {THIS_MODULE}:parameter_sum_model: compare: converted "
                                f"output differs")
    assert any(line.startswith("PASS msq_fx.models:resnet20") for line in lines)


def test_cli_json_prints_one_object_per_model_and_no_table(capsys):
    code = cli.main(["check", "--json", "--input-size", "3x32x32", "--steps", "1", "--seed", "1",
                     "msq_fx.models:resnet20", f"{THIS_MODULE}:factory_that_raises"])
    assert code == 0  # a SKIP is not a failure
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    passed, skipped = (json.loads(line) for line in lines)
    for row in (passed, skipped):
        assert {"model", "status", "reason", "stage", "quantized_weights", "float_weights",
                "notes", "max_abs_diff", "graph_nodes", "leaves", "seconds"} <= set(row)
        assert "table" not in row
    assert (passed["model"], passed["status"], passed["quantized_weights"]) == (
        "msq_fx.models:resnet20", "PASS", 20)
    assert passed["input_size"] == [3, 32, 32] and passed["max_abs_diff"] == 0.0
    assert (skipped["status"], skipped["stage"]) == ("SKIP", "build")


@pytest.mark.parametrize("method", ["autograd", "finite_difference"])
def test_cli_hessian_method_chooses_how_the_prune_takes_h_v(capsys, method):
    code = cli.main(["check", "--json", "--input-size", "3x32x32", "--steps", "1",
                     "--hessian-method", method, "msq_fx.models:resnet20"])
    assert code == 0
    row = json.loads(capsys.readouterr().out)
    assert (row["status"], row["hessian_method"]) == ("PASS", method)


def test_cli_curvature_fisher_ranks_the_prune_by_the_fishers_trace(capsys):
    code = cli.main(["check", "--json", "--input-size", "3x32x32", "--steps", "1",
                     "--curvature", "fisher", "msq_fx.models:resnet20"])
    assert code == 0
    row = json.loads(capsys.readouterr().out)
    assert (row["status"], row["hessian_method"]) == ("PASS", "fisher")


def test_cli_export_adds_each_export_to_the_json_row(capsys):
    code = cli.main(["check", "--json", "--input-size", "3x32x32", "--steps", "1",
                     "--export", "onnx", "--export", "torch", "msq_fx.models:resnet20"])
    assert code == 0
    row = json.loads(capsys.readouterr().out)
    assert row["status"] == "PASS" and set(row["exports"]) == {"onnx", "torch"}


def test_cli_compile_adds_the_compiled_run_to_the_json_row(capsys):
    code = cli.main(["check", "--json", "--input-size", "3x8x8", "--steps", "1", "--compile",
                     f"{THIS_MODULE}:breaks_the_graph"])
    assert code == 0
    row = json.loads(capsys.readouterr().out)
    assert row["status"] == "PASS" and row["compiled"]["graph_breaks"] >= 1


def test_cli_act_bits_checks_with_quantized_activations_and_exports_them(capsys, monkeypatch):
    seen = []
    original = check_model

    def recording(*args, **kwargs):
        seen.append(kwargs["config"].quantization.act_bits)
        return original(*args, **kwargs)

    monkeypatch.setattr("msq_fx.check.check_model", recording)
    code = cli.main(["check", "--json", "--input-size", "3x32x32", "--steps", "1",
                     "--act-bits", "8", "--export", "torch", "msq_fx.models:resnet20"])
    assert code == 0 and seen == [8]
    assert json.loads(capsys.readouterr().out)["status"] == "PASS"


def test_cli_lean_retry_checks_with_less_memory_and_releases_freed_memory(capsys, monkeypatch,
                                                                          offloading):
    released = []  # recorded, not done: it would slow this test process's later allocations
    monkeypatch.setattr(cli, "release_freed_memory", lambda: released.append(True))
    code = cli.main(["check", "--json", "--input-size", "3x8x8", "--lean-retry",
                     f"{THIS_MODULE}:out_of_memory_unless_offloaded"])
    row = json.loads(capsys.readouterr().out)
    assert (code, row["status"], row["batch_size"]) == (0, "PASS", 1)
    assert row["note"].startswith("at batch 1 with offload_activations=True")
    assert released == [True]


def test_cli_rejects_a_bad_spec_before_checking_anything(capsys):
    assert cli.main(["check", "msq_fx.models:resnet20", "torchvision:resnt18"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "msq-fx check: error: unknown torchvision model 'resnt18'" in captured.err


def test_cli_rejects_a_malformed_input_size(capsys):
    with pytest.raises(SystemExit):
        cli.main(["check", "msq_fx.models:resnet20", "--input-size", "32x"])
    assert "expected N, HxW, CxHxW or CxTxHxW" in capsys.readouterr().err


# --------------------------------------------------------------- CI subset of real architectures

def test_efficientvit_b0_cannot_be_traced_by_plain_symbolic_trace():
    model = timm.create_model("efficientvit_b0", pretrained=False, num_classes=10)
    with pytest.raises(Exception, match="control flow"):
        torch.fx.symbolic_trace(model)


def test_beit_reads_its_qkv_weight_functionally():
    source = Path(timm.models.beit.__file__).read_text()
    assert "F.linear(x, weight=self.qkv.weight" in source


CI_SUBSET = [
    pytest.param("timm:efficientvit_b0", 64, id="untraceable-by-symbolic_trace"),
    pytest.param(f"{THIS_MODULE}:tiny_beit", 32, id="functional-weight-beit"),
    pytest.param(f"{THIS_MODULE}:tiny_beit_with_sdpa", 32, id="functional-weight-beit-sdpa"),
    pytest.param(f"{THIS_MODULE}:TinyMHA", 32, id="multihead-attention"),
    pytest.param(f"{THIS_MODULE}:tiny_torchvision_vit", 32, id="multihead-attention-sdpa-vit"),
    pytest.param("timm:test_vit", None, id="timm-test_vit-sdpa"),
    pytest.param("torchvision:mobilenet_v2", 64, id="depthwise-mobilenet_v2"),
    pytest.param("torchvision:efficientnet_b0", 64, id="depthwise-efficientnet_b0"),
    pytest.param("torchvision:mobilenet_v3_small", 64, id="depthwise-mobilenet_v3-hardsigmoid"),
    # Caches graph tensors on itself in the eval-mode Hessian forward; convert must still copy it.
    pytest.param("timm:efficientvit_m0", 64, id="eval-cache-efficientvit_m0"),
    # Cosine attention on padded windows: the double backward is NaN at the zero tokens.
    pytest.param("torchvision:swin_v2_t", 64, id="non-finite-double-backward-swin_v2_t"),
]


@pytest.mark.parametrize("spec, size", CI_SUBSET)
def test_ci_subset_passes(spec, size):
    result = check_model(spec, input_size=size)
    assert result.status == "PASS", result.reason
    assert result.float_weights == []
    assert result.graph_nodes > 0 and result.trace_failure is None


def test_ci_subset_kinds_reach_the_report():
    beit = check_model(f"{THIS_MODULE}:tiny_beit", input_size=32)
    assert "blocks.0.attn.qkv.weight" in beit.table
    mha = check_model(f"{THIS_MODULE}:TinyMHA", input_size=32)
    assert "attn.in_proj_weight" in mha.table and "attention" in mha.table
    mobilenet = check_model("torchvision:mobilenet_v2", input_size=32)
    assert "depthwise" in mobilenet.table


# --------------------------------------------------------------- JUnit XML for CI


def test_cli_junit_xml_has_one_test_case_per_model_with_failures_and_skips(tmp_path, capsys):
    import xml.etree.ElementTree as ElementTree

    report_path = tmp_path / "reports" / "msq.xml"
    code = cli.main(["check", "--input-size", "3x32x32", "--steps", "1", "--junit-xml",
                     str(report_path), "msq_fx.models:resnet20",
                     f"{THIS_MODULE}:parameter_sum_model", f"{THIS_MODULE}:factory_that_raises"])
    assert code == 1
    suite = ElementTree.parse(report_path).getroot()
    assert suite.tag == "testsuite"
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("3", "1", "1")
    cases = {case.get("name"): case for case in suite.iter("testcase")}
    passed = cases["msq_fx.models:resnet20"]
    assert passed.find("failure") is None and passed.find("skipped") is None
    assert "layer1.0.conv1.weight" in passed.find("system-out").text
    failure = cases[f"{THIS_MODULE}:parameter_sum_model"].find("failure")
    assert failure.get("type") == "compare"
    assert failure.get("message").startswith("compare: converted output differs")
    assert cases[f"{THIS_MODULE}:factory_that_raises"].find("skipped") is not None
