"""check_model(): run the whole MSQ pipeline on one model and say whether it holds up.

The pipeline is the one a user runs, shortened to a few steps on random data:

    build -> eager forward -> trace -> prepare -> train (SGD + LSB regularization)
          -> prune (one Algorithm 1 step, Hessian included) -> convert -> compare
          [-> export:torch / export:onnx, when asked for]

A model PASSes when nothing raises, every conv / linear / attention weight is either quantized or
listed as float with a reason, and the converted integer model reproduces the fake-quant model's
eval output (max |diff| <= 1e-5 * max |output|, all finite). A model that cannot be built, or does
not run eagerly at the requested input, is a SKIP: that is a property of the model, not of the
quantization. Every other exception is a FAIL naming the stage and the error.

Models are named by a spec:

    timm:resnet18                   timm.create_model(name, pretrained=False)
    torchvision:vit_b_16            torchvision.models.get_model(name, weights=None); any task:
                                    segmentation, detection, video and optical flow too (see
                                    msq_fx.torchvision_tasks for the adapters of the last two)
    package.module:factory          importlib.import_module(package.module).factory()

A factory may return ``(model, example_inputs)`` instead of a model, for models whose input is not
one float batch of the declared size: token ids, several inputs. The check then runs on those
inputs (a tensor, or a tuple of positional tensors, each batched along its first dimension).
"""
from __future__ import annotations

import copy
import difflib
import functools
import gc
import importlib
import math
import re
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .api import convert, prepare
from .config import MSQConfig
from .controller import MSQController
from .offload import offload_saved_tensors
from .report import Report, report
from .torchvision_tasks import build_torchvision_model, torchvision_input_size, torchvision_tasks
from .utils import call_model, eval_mode, is_out_of_memory

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"

#: Converted and fake-quant outputs may differ by at most this fraction of the largest output.
RELATIVE_TOLERANCE = 1e-5

#: Classes for the classifier head where the factory lets us choose: small heads save memory and
#: time on 1000-class models, and the check does not depend on the number of classes.
NUM_CLASSES = 10

STAGES = ("build", "forward", "trace", "prepare", "train", "prune", "convert", "compare")

#: What ``exports`` may ask for: ``torch.export`` of the converted model, and
#: ``msq_fx.export_onnx`` run by ONNX Runtime (float32 compute).
EXPORT_FORMATS = ("torch", "onnx")

#: An exported model's outputs may differ from the converted model's by at most this fraction of
#: the largest output. torch.export runs the same kernels; ONNX Runtime's float kernels round
#: differently, while a wrong weight moves outputs by their own order of magnitude.
EXPORT_TOLERANCE = {"torch": RELATIVE_TOLERANCE, "onnx": 1e-3}


class SpecError(ValueError):
    """A model spec that names no model; the message says which forms are accepted."""


def check_config(seed: int = 0) -> MSQConfig:
    """The MSQConfig a check runs with: prune at the first epoch end, and prune for sure.

    ``prune_threshold=1.0`` makes every group whose LSBs are not all set lose bits at that prune
    (after a few steps no group has beta < the paper's 0.3), so the converted model is checked at
    mixed widths rather than at the initial 8 bits. One Hutchinson probe (training uses up to
    32) runs the same double backward as many and keeps the Hessian affordable on large models;
    the estimate's quality is not what is checked here.
    """
    return MSQConfig(prune_interval=1, prune_threshold=1.0, hessian_min_samples=1,
                     hessian_max_samples=1, seed=seed)


# --------------------------------------------------------------------------- result

@dataclass(frozen=True)
class CheckResult:
    """What check_model found for one model.

    Attributes:
        model: the spec (or the class name of a module that was passed in).
        status: "PASS", "FAIL" or "SKIP" (the model itself does not build or run eagerly).
        reason: why it failed or was skipped, one line per problem; "" on PASS.
        stage: the stage of the first problem (one of STAGES), None on PASS.
        input_size: the per-sample input shape used, e.g. (3, 224, 224); with several example
            inputs, a tuple of their per-sample shapes.
        quantized_weights: how many weight tensors carry an MSQ quantizer.
        float_weights: conv / linear / attention weights left in float: {name, kind, reason}.
        notes: what prepare noted about the weights (uses it could not see; weights their op
            reads through a transform such as weight standardization).
        max_abs_diff / rel_diff: max |converted - fake-quant| over the eval outputs, and that
            divided by max |fake-quant output|; None when the comparison was not reached.
        graph_nodes: nodes of the captured FX graph (0 when no graph could be captured).
        leaves: how many submodules the capture kept opaque beyond the standard torch.nn layers;
            ``leaf_reasons`` maps each one's FQN to why.
        trace_failure: why no graph could be captured at all (prepare then works from the module
            tree alone), else None.
        compression: 32 / average bits over the quantized weights after the prune.
        batch_size: the batch the result was obtained with: the one asked for, or 1 when that
            ran out of memory and a batch of 1 got further (``note`` then says so).
        note: what a reader should know beyond the status: that a PASS came at batch 1, or how
            the batch-1 retry of an out-of-memory failure failed and which options would lower
            the memory of the stage that failed; "" otherwise.
        hessian_method: how the prune computed H v: "autograd" (double backward) or
            "finite_difference" (the fallback when the double backward ran out of memory or met
            an op without a second derivative); None when the prune was not reached.
        seconds: wall time of the whole check; ``stage_seconds`` splits it by stage.
        peak_memory_mib: the process's peak resident memory (MiB) at the end of each stage; a
            high-water mark, so in a process that checks one model the first stage where it
            jumps is the one that needed the memory.
        offloaded_mib: with ``offload_activations``, the saved activations written to disk by
            the training steps and the prune (MiB); None without.
        table: the per-layer report table of the converted (else prepared) model.
        exports: per export format asked for, ``max_abs_diff`` / ``rel_diff`` of the exported
            model's outputs against the converted model's, and for ONNX the number of weights
            stored as INT4, INT8 and float and the file's size.
    """

    model: str
    status: str
    reason: str = ""
    stage: str | None = None
    input_size: tuple[int, ...] | None = None
    quantized_weights: int = 0
    float_weights: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    max_abs_diff: float | None = None
    rel_diff: float | None = None
    graph_nodes: int = 0
    leaves: int = 0
    leaf_reasons: dict[str, str] = field(default_factory=dict)
    trace_failure: str | None = None
    compression: float | None = None
    hessian_method: str | None = None
    batch_size: int = 0
    note: str = ""
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    peak_memory_mib: dict[str, float] = field(default_factory=dict)
    offloaded_mib: float | None = None
    table: str = ""
    exports: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status == PASS

    def summary_line(self) -> str:
        """``PASS model (N weights quantized, max |diff| X; note)`` or ``FAIL model: reason
        (note)``, the note where there is one."""
        if self.passed:
            note = f"; {self.note}" if self.note else ""
            exported = "".join(f", {target} export max |diff| {found['max_abs_diff']:.3g}"
                               for target, found in self.exports.items())
            return (f"PASS {self.model} ({self.quantized_weights} weights quantized, "
                    f"max |diff| {self.max_abs_diff:.3g}{exported}{note})")
        return f"{self.status} {self.model}: {self.reason}" + (f" ({self.note})" if self.note
                                                                else "")

    def to_dict(self, include_table: bool = True) -> dict[str, Any]:
        """Plain JSON-able data; the table is left out when ``include_table`` is False."""
        data = asdict(self)
        data["input_size"] = list(self.input_size) if self.input_size else None
        if not include_table:
            data.pop("table")
        return data


def junit_xml(results: Sequence[CheckResult], suite: str = "msq-fx check") -> str:
    """The results as a JUnit XML test suite, one test case per model, which CI systems show as
    tests: a FAIL is a failure with its reason, a SKIP is skipped, and each case's output holds
    its summary line and per-layer table."""
    from xml.etree import ElementTree

    root = ElementTree.Element("testsuite", name=suite, tests=str(len(results)),
                               failures=str(sum(r.status == FAIL for r in results)),
                               skipped=str(sum(r.status == SKIP for r in results)),
                               time=f"{sum(r.seconds for r in results):.3f}")
    for result in results:
        case = ElementTree.SubElement(root, "testcase", classname=suite, name=result.model,
                                      time=f"{result.seconds:.3f}")
        if result.status == FAIL:
            ElementTree.SubElement(case, "failure", message=result.reason,
                                   type=result.stage or "").text = result.reason
        elif result.status == SKIP:
            ElementTree.SubElement(case, "skipped", message=result.reason)
        ElementTree.SubElement(case, "system-out").text = "\n".join(
            filter(None, [result.summary_line(), result.table]))  # the line holds the note
    ElementTree.indent(root)
    return ElementTree.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


class _Findings:
    """The facts gathered so far while one check runs; becomes a CheckResult at the end."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.start = time.perf_counter()
        self.status = PASS
        self.problems: list[tuple[str, str]] = []  # (stage, one-line reason)
        self.out_of_memory = False  # the first problem was an allocation failure
        self.fields: dict[str, Any] = {"stage_seconds": {}, "peak_memory_mib": {}}

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Add the wall time spent inside to ``stage_seconds[stage]``, even when it raises."""
        start = time.perf_counter()
        try:
            yield
        finally:
            seconds = self.fields["stage_seconds"].get(stage, 0.0) + time.perf_counter() - start
            self.fields["stage_seconds"][stage] = round(seconds, 3)
            peak = peak_resident_mib()
            if peak is not None:
                self.fields["peak_memory_mib"][stage] = peak

    def problem(self, stage: str, reason: str, status: str = FAIL,
                error: BaseException | None = None) -> None:
        if not self.problems:
            self.status = status
            self.out_of_memory = error is not None and is_out_of_memory(error)
        self.problems.append((stage, reason))

    def result(self) -> CheckResult:
        return CheckResult(
            model=self.name, status=self.status,
            reason="; ".join(reason for _, reason in self.problems),
            stage=self.problems[0][0] if self.problems else None,
            seconds=round(time.perf_counter() - self.start, 3), **self.fields)


class _StageFailed(Exception):
    """Ends a check early; the failure is already recorded in the findings."""


@contextmanager
def _stage(findings: _Findings, stage: str, status: str = FAIL, prefix: str = "") -> Iterator[None]:
    """Record any exception raised inside as the check's failure at ``stage``, then stop."""
    try:
        with findings.timed(stage):
            yield
    except _StageFailed:
        raise
    except Exception as error:  # any error of the model or the library is the check's finding
        findings.problem(stage, f"{stage}: {prefix}{describe_error(error)}", status, error)
        raise _StageFailed from error


def peak_resident_mib() -> float | None:
    """The process's peak resident memory so far in MiB (None where the OS does not say)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def describe_error(error: BaseException) -> str:
    """``ExceptionType: first line of the message``, and the first line of the error it was
    raised from (the deepest ``raise ... from``) where the message does not say it already,
    so a wrapper's generic message still shows what went wrong. Terminal colour codes are
    removed."""
    described = _first_line(error)
    cause = error.__cause__
    while cause is not None and cause.__cause__ is not None:
        cause = cause.__cause__
    if cause is not None:
        cause_message = _first_line(cause).partition(": ")[2]
        if cause_message not in described:
            described += f" (from {_first_line(cause)})"
    return described


_TERMINAL_COLOURS = re.compile(r"\x1b\[[0-9;]*m")


def _first_line(error: BaseException) -> str:
    lines = _TERMINAL_COLOURS.sub("", str(error)).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


# --------------------------------------------------------------------------- specs

@dataclass(frozen=True)
class ModelSpec:
    """A resolved spec: where the model comes from and how to build it.

    ``source`` is "timm", "torchvision" or "factory"; ``name`` the model name (or the factory's
    ``module:attribute`` path); ``factory`` the callable for the "factory" source.
    """

    text: str
    source: str
    name: str
    factory: Callable[[], nn.Module] | None = None

    def build(self, size_override: tuple[int, ...] | None = None) -> nn.Module:
        """Build the model with random weights (never downloads).

        With ``size_override``, models that pin their resolution are built for it when their
        factory takes the size (timm ``img_size``, torchvision ViT ``image_size``).
        """
        if self.source == "factory":
            return self.factory()
        attempts = _build_kwargs(self.source, size_override)
        for kwargs in attempts[:-1]:
            try:
                return self._build(**kwargs)
            except TypeError:  # the factory does not take this option; try with fewer
                continue
        return self._build(**attempts[-1])

    def _build(self, **kwargs: Any) -> nn.Module:
        if self.source == "timm":
            import timm
            return timm.create_model(self.name, pretrained=False, **kwargs)
        return build_torchvision_model(self.name, **kwargs)

    def default_input_size(self, model: nn.Module) -> tuple[int, ...] | None:
        """The per-sample input shape the model is made for ((C, H, W), (C, T, H, W) for video), or
        None if unknown."""
        if self.source == "torchvision":
            return torchvision_input_size(self.name, model)
        return input_size_of_module(model)


def _build_kwargs(source: str, size_override: tuple[int, ...] | None) -> list[dict[str, Any]]:
    """Keyword sets to try, richest first: a small head, and the requested resolution."""
    size_key = {"timm": "img_size", "torchvision": "image_size"}[source]
    head = {"num_classes": NUM_CLASSES}
    attempts = [head, {}]
    if size_override is not None:
        sized = {size_key: size_override[-1]} if size_override[-1] == size_override[-2] else {
            size_key: tuple(size_override[-2:])}
        attempts = [{**head, **sized}, sized] + attempts
    return attempts


def input_size_of_module(model: nn.Module) -> tuple[int, ...] | None:
    """The input shape a module declares: timm's pretrained_cfg/default_cfg ``input_size``, or a
    torchvision ViT's ``image_size``; None when it declares none."""
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, dict) and cfg.get("input_size"):
            return tuple(int(s) for s in cfg["input_size"])
    size = getattr(model, "image_size", None)
    if isinstance(size, int):
        return (3, size, size)
    return None


def parse_spec(text: str) -> ModelSpec:
    """Resolve ``timm:NAME``, ``torchvision:NAME`` or ``package.module:factory``; SpecError if it
    names nothing (the model is not built yet)."""
    source, sep, name = text.partition(":")
    if not sep or not source or not name:
        raise SpecError(f"bad model spec {text!r}: expected timm:NAME, torchvision:NAME or "
                        f"package.module:factory")
    if source == "timm":
        return ModelSpec(text, "timm", _known_timm_model(name))
    if source == "torchvision":
        return ModelSpec(text, "torchvision", _known_torchvision_model(name))
    return ModelSpec(text, "factory", text, _factory(source, name, text))


def built_from_spec(text: str, input_size: int | Sequence[int] | None = None,
                    fallback: tuple[int, ...] | None = None) -> tuple[nn.Module, tuple[int, ...]]:
    """The model a SPEC names, built with random weights, and the per-sample input shape to feed
    it: ``input_size`` (see :func:`normalize_input_size`), else the size the model declares,
    else ``fallback``. SpecError for a SPEC that names nothing, ValueError when no shape is
    known."""
    spec = parse_spec(text)
    model = spec.build()
    shape = normalize_input_size(input_size, spec.default_input_size(model)) or fallback
    if shape is None:
        raise ValueError(f"{text}: the model declares no input size; give one (--input-size "
                         f"CxHxW)")
    return model, shape


def output_classes(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """The width of the model's (batch, classes) output, from one eval forward on zeros; 1 for
    any other output (whose :func:`task_loss` ignores the labels)."""
    with torch.no_grad():
        output = primary_output(model.eval()(torch.zeros(1, *input_shape)))
    return output.shape[1] if output.dim() == 2 else 1


def _known_timm_model(name: str) -> str:
    import timm
    if not timm.is_model(name):
        raise SpecError(f"unknown timm model {name!r}{_suggest(name, timm.list_models())}; "
                        f"see timm.list_models()")
    return name


def torchvision_classification_models() -> list[str]:
    """Every torchvision classification model name (torchvision.models, not its submodules)."""
    return [name for name, task in torchvision_tasks().items() if task == "classification"]


def _known_torchvision_model(name: str) -> str:
    known = torchvision_tasks()
    if name not in known:
        raise SpecError(f"unknown torchvision model {name!r}{_suggest(name, list(known))}; see "
                        f"torchvision.models.list_models()")
    return name


def _factory(module_name: str, attribute: str, text: str) -> Callable[[], nn.Module]:
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise SpecError(f"model spec {text!r}: cannot import module {module_name!r} "
                        f"({describe_error(error)}); expected timm:NAME, torchvision:NAME or "
                        f"package.module:factory") from error
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise SpecError(f"model spec {text!r}: module {module_name!r} has no callable "
                        f"{attribute!r}{_suggest(attribute, dir(module))}")
    return factory


def _suggest(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def normalize_input_size(size: int | Sequence[int] | None,
                         default: tuple[int, ...] | None) -> tuple[int, ...] | None:
    """A per-sample shape from ``size``: an int (or 1-tuple) is a square side and (H, W) a
    spatial size, both replacing the default's last two dimensions (channels 3 when there is no
    default); three or more numbers, (C, H, W) or a video's (C, T, H, W), are taken as is. None
    keeps ``default``."""
    if size is None:
        return default
    size = (size,) if isinstance(size, int) else tuple(int(s) for s in size)
    if not size or min(size) < 1:
        raise ValueError(f"input_size must be positive: an int, (H, W), (C, H, W) or "
                         f"(C, T, H, W), got {size}")
    if len(size) >= 3:
        return size
    leading = default[:-2] if default and len(default) >= 3 else (3,)
    return (*leading, *(size * 2 if len(size) == 1 else size))


# --------------------------------------------------------------------------- outputs and loss

def primary_output(outputs: Any) -> Tensor:
    """The main prediction of a model output: the tensor itself, ``out`` (or the first tensor)
    of a dict, the first element of a tuple/list (Inception's and GoogLeNet's aux logits)."""
    if isinstance(outputs, Tensor):
        return outputs
    if isinstance(outputs, dict) and outputs:
        return primary_output(outputs["out"] if "out" in outputs else next(iter(outputs.values())))
    if isinstance(outputs, (tuple, list)) and outputs:
        return primary_output(outputs[0])
    raise TypeError(f"the model output ({type(outputs).__name__}) holds no tensor")


def output_tensors(outputs: Any) -> list[Tensor]:
    """Every tensor in a (nested) model output, in order."""
    if isinstance(outputs, Tensor):
        return [outputs]
    if isinstance(outputs, dict):
        return [t for value in outputs.values() for t in output_tensors(value)]
    if isinstance(outputs, (tuple, list)):
        return [t for value in outputs for t in output_tensors(value)]
    return []


def task_loss(outputs: Any, targets: Tensor | None) -> Tensor:
    """Cross-entropy of the primary output against class labels; the mean square of it for
    models whose output is not (batch, classes). A dict of scalars is a model's own losses
    (torchvision detection in train mode): their sum, labels unused."""
    if isinstance(outputs, dict) and outputs and all(
            isinstance(value, Tensor) and value.dim() == 0 for value in outputs.values()):
        return torch.stack([value.float() for value in outputs.values()]).sum()
    logits = primary_output(outputs).float()
    if targets is not None and logits.dim() == 2:
        return F.cross_entropy(logits, targets)
    return logits.pow(2).mean()


# --------------------------------------------------------------------------- inputs

def first_rows(inputs: Tensor | tuple, count: int = 1) -> Tensor | tuple:
    """The first ``count`` samples of every input."""
    if isinstance(inputs, tuple):
        return tuple(first_rows(value, count) for value in inputs)
    return inputs[:count]


def input_shapes(inputs: Tensor | tuple, per_sample: bool = False) -> tuple:
    """The shape of the inputs: a tensor's, or a tuple of them; ``per_sample`` drops the batch
    dimension."""
    start = 1 if per_sample else 0
    if isinstance(inputs, tuple):
        return tuple(tuple(value.shape[start:]) for value in inputs)
    return tuple(inputs.shape[start:])


def model_and_inputs(built: Any, name: str) -> tuple[nn.Module, Tensor | tuple | None]:
    """Split what a spec built into the model and its example inputs (None when it gave none).
    TypeError, naming the spec, when it is neither a module nor ``(module, example_inputs)``
    with batched tensor inputs."""
    if isinstance(built, nn.Module):
        return built, None
    if isinstance(built, tuple) and len(built) == 2 and isinstance(built[0], nn.Module):
        model, inputs = built
        tensors = inputs if isinstance(inputs, tuple) else (inputs,)
        if tensors and all(isinstance(t, Tensor) and t.dim() >= 1 for t in tensors) and len(
                {t.shape[0] for t in tensors}) == 1:
            return model, inputs
        raise TypeError(f"{name}: the example inputs must be a tensor or a tuple of tensors "
                        f"with the same batch size along their first dimension; got "
                        f"{_describe_value(inputs)}")
    raise TypeError(f"{name}: expected an nn.Module or a (nn.Module, example_inputs) pair, got "
                    f"{_describe_value(built)}")


def _describe_value(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of ({', '.join(_describe_value(v) for v in value)})"
    return f"a {type(value).__name__}"


# --------------------------------------------------------------------------- the check

def check_model(spec_or_model: str | nn.Module, *, input_size: int | Sequence[int] | None = None,
                batch_size: int = 2, steps: int = 3, seed: int = 0,
                config: MSQConfig | None = None, exports: Sequence[str] = (),
                example_inputs: Tensor | tuple | None = None,
                offload_activations: bool = False, lean_retry: bool = False) -> CheckResult:
    """Run prepare -> train -> prune -> convert on one model and compare the converted output.

    Args:
        spec_or_model: a spec string (see the module docstring) or an nn.Module (used as given;
            prepare works on a copy, but the eager forward checks run it).
        input_size: per-sample input shape (int side, (H, W), (C, H, W), video (C, T, H, W));
            default: the size the model declares (timm's pretrained_cfg; for torchvision see
            msq_fx.torchvision_tasks.torchvision_input_size).
        batch_size, steps, seed: the random batch, the number of SGD steps, the seed of both.
        config: the MSQConfig to prepare with (default: ``check_config(seed)``); keep its
            ``prune_interval=1``, or the single ``epoch_end(1, ...)`` prunes nothing.
        exports: formats of ``EXPORT_FORMATS`` to export the converted model to; each exported
            model must reproduce the converted model's outputs (``EXPORT_TOLERANCE``).
        example_inputs: the inputs to check a module with instead of a random batch: a tensor,
            or a tuple of positional tensors (token ids, several inputs), batched along their
            first dimension. ``input_size`` does not apply then, and ``batch_size`` only in the
            retry after an out-of-memory, which takes their first sample. A factory spec gives
            its own by returning ``(model, example_inputs)``.
        offload_activations: keep the activations the training steps and the prune save for
            their backward in files, not in memory (``msq_fx.offload_saved_tensors``): for
            models whose activations at the input size, not their weights, exceed the memory.
            Slower by a write and a read of each; ``offloaded_mib`` says how much went to disk.
            Call ``msq_fx.release_freed_memory()`` once before (``msq-fx check`` does), or the
            memory of the activations read back stays with the process.
        lean_retry: when the batch of 1 runs out of memory in training or in the prune, check
            once more at batch 1 with the options that lower that stage's memory and were not
            in effect (the finite-difference Hessian, activations on disk), instead of only
            naming them in ``note``. Call ``msq_fx.release_freed_memory()`` once before, as
            for ``offload_activations``.

    Returns a CheckResult; raises SpecError for a spec that names no model, ValueError when
    the input size is neither given nor declared by the model (or given with example inputs),
    and TypeError for example inputs that are not batched tensors. Nothing else raises. When the
    batch asked for runs out of memory, the check runs again at batch 1 and returns that result
    (with ``note`` saying so) if it passes; otherwise the first result, whose ``note`` says how
    the batch of 1 failed. ``seconds`` and the peak memory then cover every run. Where the batch
    of 1 ran out of memory in training or in the prune, ``note`` also names the options (the
    finite-difference Hessian, activations on disk) not yet in effect that need less there;
    with ``lean_retry`` a third run tries them, and its PASS is the result (``note`` names the
    options, ``hessian_method`` and ``offloaded_mib`` show them).
    """
    spec = parse_spec(spec_or_model) if isinstance(spec_or_model, str) else None
    if spec is None and not isinstance(spec_or_model, nn.Module):
        raise TypeError(f"check_model expects a spec string or an nn.Module, "
                        f"got {type(spec_or_model).__name__}")
    if example_inputs is not None:
        if input_size is not None:
            raise ValueError("check_model: give input_size (a random batch of that shape) or "
                             "example_inputs (the batch itself), not both")
        model_and_inputs((nn.Identity(), example_inputs), "check_model(example_inputs=...)")
    unknown = sorted(set(exports) - set(EXPORT_FORMATS))
    if unknown:
        raise ValueError(f"unknown export format(s) {unknown}; choose from {EXPORT_FORMATS}")
    config = check_config(seed) if config is None else config
    name = spec.text if spec else type(spec_or_model).__name__
    run = functools.partial(_checked_run, name, spec, spec_or_model, input_size,
                            steps=steps, seed=seed, config=config,
                            exports=tuple(dict.fromkeys(exports)), example_inputs=example_inputs,
                            offload=offload_activations)
    first = run(batch_size)
    if not first.out_of_memory:
        return first.result()
    stage = first.problems[0][0]
    at_one = first
    if batch_size != 1:
        # Whether an architecture quantizes does not depend on the batch; a batch of 1 halves
        # the activations, so a model too big for this machine at the batch may still be checked.
        gc.collect()
        at_one = run(1)
        if at_one.status == PASS:
            at_one.start = first.start  # the time of both runs
            at_one.fields["note"] = f"at batch 1: batch {batch_size} ran out of memory in {stage}"
            return at_one.result()
    untried = _untried_less_memory_options(at_one, config, offload_activations)
    notes = [] if at_one is first else [f"at batch 1: {_outcome(at_one)}"]
    if lean_retry and untried:
        gc.collect()
        lean = run(1, config=(config.replace(hessian_method="finite_difference")
                              if "finite_difference" in untried else config),
                   offload=offload_activations or "offload" in untried)
        way = ", ".join(_LESS_MEMORY_OPTIONS[option][0] for option in untried)
        if lean.status == PASS:
            lean.start = first.start  # the time of every run
            ran_out = (f"batch {batch_size} ran out of memory in {stage}, batch 1 in "
                       f"{at_one.problems[0][0]}" if at_one is not first
                       else f"it ran out of memory in {stage}")
            lean.fields["note"] = f"at batch 1 with {way}: {ran_out}"
            return lean.result()
        notes.append(f"at batch 1 with {way}: {_outcome(lean)}")
    else:
        notes.append(_less_memory_hint(untried))
    first.fields["note"] = "; ".join(filter(None, notes))
    return first.result()


def _outcome(findings: _Findings) -> str:
    """``STATUS (first reason)`` of a run that did not pass, for the note of the first run."""
    return f"{findings.status} ({findings.problems[0][1] if findings.problems else ''})"


#: The check's options that lower its memory: (check_model's, msq-fx check's) spelling.
_LESS_MEMORY_OPTIONS = {
    "finite_difference": ("config hessian_method='finite_difference'",
                          "--hessian-method finite_difference"),
    "offload": ("offload_activations=True", "--offload-activations"),
}

#: Which of them lower the memory of each stage.
_LESS_MEMORY_BY_STAGE = {"train": ("offload",), "prune": ("finite_difference", "offload")}


def _untried_less_memory_options(findings: _Findings, config: MSQConfig,
                                 offload: bool) -> list[str]:
    """The keys of ``_LESS_MEMORY_OPTIONS`` that lower the memory of the stage where
    ``findings`` ran out of memory and were not in effect; [] when it did not run out."""
    if not findings.out_of_memory:
        return []
    in_effect = {"offload": offload,
                 "finite_difference": config.hessian_method == "finite_difference"}
    return [option for option in _LESS_MEMORY_BY_STAGE.get(findings.problems[0][0], ())
            if not in_effect[option]]


def _less_memory_hint(options: Sequence[str]) -> str:
    """What to try, in both spellings, for the ``_LESS_MEMORY_OPTIONS`` keys given."""
    if not options:
        return ""
    spellings = [_LESS_MEMORY_OPTIONS[option] for option in options]
    return (f"to check it in less memory, try {', '.join(api for api, _ in spellings)} "
            f"(msq-fx check {' '.join(cli for _, cli in spellings)} or --lean-retry)")


def assert_quantizes(spec_or_model: str | nn.Module, **options: Any) -> CheckResult:
    """:func:`check_model`, for a test suite: the result on PASS, else AssertionError with the
    status, the reason and the per-layer table. ``options`` go to check_model.

        def test_my_net_quantizes():
            msq_fx.assert_quantizes(MyNet(), input_size=64)
    """
    result = check_model(spec_or_model, **options)
    if not result.passed:
        raise AssertionError(f"{result.summary_line()}\n{result.table}".rstrip())
    return result


def _checked_run(name: str, spec: ModelSpec | None, given: Any, input_size: Any,
                 batch_size: int, *, steps: int, seed: int, config: MSQConfig,
                 exports: tuple[str, ...], example_inputs: Tensor | tuple | None,
                 offload: bool) -> _Findings:
    findings = _Findings(name)
    findings.fields["batch_size"] = batch_size
    try:
        _run_pipeline(findings, spec, given, input_size, batch_size, steps, seed, config,
                      exports, example_inputs, offload)
    except _StageFailed:
        pass
    return findings


def _run_pipeline(findings: _Findings, spec: ModelSpec | None, given: Any,
                  input_size: Any, batch_size: int, steps: int, seed: int,
                  config: MSQConfig, exports: tuple[str, ...] = (),
                  example_inputs: Tensor | tuple | None = None, offload: bool = False) -> None:
    requested = normalize_input_size(input_size, None) if input_size is not None else None
    torch.manual_seed(seed)
    with _stage(findings, "build", SKIP, "model cannot be built: "):
        built = spec.build(requested) if spec else given
    with _stage(findings, "build"):
        model, given_inputs = model_and_inputs(built, findings.name)
    generator = torch.Generator().manual_seed(seed)
    inputs = _inputs(findings, spec, model, input_size, batch_size, generator,
                     example_inputs if given_inputs is None else given_inputs)
    targets = _labels(findings, model, inputs, generator)
    _capture(findings, model, config)
    # A model the spec built is the check's own: prepare it in place, so the largest models
    # need not fit twice. The expected weight names are taken first, from the float model.
    expected = expected_weight_names(model)
    with _stage(findings, "prepare"):
        qmodel = prepare(model, inputs, config, inplace=spec is not None)
        _check_coverage(findings, expected, qmodel)
    findings.fields["table"] = report(qmodel).table()
    del model  # the spec can rebuild it if a failure needs diagnosing
    with _stage(findings, "train"):
        controller = MSQController(qmodel, config)
    with _saved_activations(findings, offload):
        with findings.timed("train"):
            _train(findings, qmodel, controller, inputs, targets, steps,
                   rebuild=(lambda: model_and_inputs(spec.build(requested), findings.name)[0])
                   if spec else (lambda: copy.deepcopy(given)))
        with _stage(findings, "prune"):
            # The Hessian's double backward keeps about three copies of the activations; one
            # sample exercises it as fully as the batch does, at half the memory on the largest.
            first = (first_rows(inputs), None if targets is None else targets[:1])
            records = controller.epoch_end(1, [first], task_loss)
    findings.fields["hessian_method"] = records[0].hessian_method if records else None
    findings.fields["compression"] = round(controller.compression(), 4)
    findings.fields["table"] = report(qmodel).table()  # the widths after the prune
    del controller  # it holds every latent weight, which the conversion is to let go
    fake_quant = _eval_outputs(findings, qmodel, inputs)
    with _stage(findings, "convert"):
        # The fake-quant model is not needed any more, and a check that fails midway discards
        # the model anyway: each latent goes as soon as its codes exist.
        int_model = convert(qmodel, inplace=True, one_at_a_time=True)
    findings.fields["table"] = report(int_model).table()
    converted = _eval_outputs(findings, int_model, inputs)
    _compare(findings, fake_quant, converted)
    for target in exports:
        _check_export(findings, target, int_model, inputs, converted)


@contextmanager
def _saved_activations(findings: _Findings, offload: bool) -> Iterator[None]:
    """Inside, with ``offload``, saved activations go to disk; records ``offloaded_mib``."""
    if not offload:
        yield
        return
    with offload_saved_tensors() as hooks:
        try:
            yield
        finally:
            findings.fields["offloaded_mib"] = round(hooks.bytes_written / 2**20, 1)


def _inputs(findings: _Findings, spec: ModelSpec | None, model: nn.Module, input_size: Any,
            batch_size: int, generator: torch.Generator,
            given: Tensor | tuple | None) -> Tensor | tuple:
    """The batch to check with: the given example inputs (their first sample at batch 1), else
    a random one of the requested or declared size."""
    if given is None:
        shape = _input_shape(findings, spec, model, input_size)
        return torch.randn((batch_size, *shape), generator=generator)
    if input_size is not None:
        findings.fields["note"] = (f"input_size {input_size} not used: the factory gave its own "
                                   f"example inputs")
    inputs = first_rows(given) if batch_size == 1 else given
    findings.fields["input_size"] = input_shapes(inputs, per_sample=True)
    findings.fields["batch_size"] = len(_first_tensor(inputs))
    return inputs


def _input_shape(findings: _Findings, spec: ModelSpec | None, model: nn.Module,
                 input_size: Any) -> tuple[int, ...]:
    """The per-sample input shape: the requested one, else the one the model declares."""
    default = spec.default_input_size(model) if spec else input_size_of_module(model)
    shape = normalize_input_size(input_size, default)
    if shape is None:
        raise ValueError(f"{findings.name} declares no input size (no pretrained_cfg / "
                         f"default_cfg 'input_size'); pass input_size (--input-size on the "
                         f"command line)")
    findings.fields["input_size"] = shape
    return shape


def _labels(findings: _Findings, model: nn.Module, inputs: Tensor | tuple,
            generator: torch.Generator) -> Tensor | None:
    """Random labels for the classes the model predicts (None when its output is not (batch,
    classes): one row per sample). Runs the model once in eval mode on ``inputs``: a model
    that fails here is a SKIP."""
    with _stage(findings, "forward", SKIP,
                f"model does not run eagerly at input {input_shapes(inputs)}: "):
        with torch.no_grad(), eval_mode(model):
            logits = primary_output(call_model(model, inputs))
    batch_size = len(_first_tensor(inputs))
    if logits.dim() != 2 or logits.shape[0] != batch_size:  # e.g. a detector's boxes
        return None
    return torch.randint(0, logits.shape[1], (batch_size,), generator=generator)


def _first_tensor(inputs: Tensor | tuple) -> Tensor:
    return inputs[0] if isinstance(inputs, tuple) else inputs


def _capture(findings: _Findings, model: nn.Module, config: MSQConfig) -> None:
    """Trace the model as prepare() does and record the graph size and the opaque leaves."""
    from msq_fx.passes.trace import trace

    with _stage(findings, "trace"):
        captured = trace(model, leaf_modules=config.leaf_modules,
                         concrete_args=config.concrete_args)
    findings.fields.update(graph_nodes=captured.num_nodes, leaves=len(captured.leaves),
                           leaf_reasons=dict(captured.leaves), trace_failure=captured.failure)


def expected_weight_names(model: nn.Module) -> set[str]:
    """Every conv / linear / multi-head-attention weight FQN, from the module tree alone."""
    names = set()
    for name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{name}." if name else ""
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            names.add(prefix + "weight")
        if isinstance(module, nn.MultiheadAttention):
            for attr in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
                if getattr(module, attr, None) is not None:
                    names.add(prefix + attr)
    return {n for n in names if _is_parameter(model, n)}


def _is_parameter(model: nn.Module, qualname: str) -> bool:
    owner_name, _, attr = qualname.rpartition(".")
    return isinstance(model.get_submodule(owner_name)._parameters.get(attr), nn.Parameter)


def _check_coverage(findings: _Findings, expected: set[str], qmodel: nn.Module) -> None:
    """Every weight in ``expected`` (conv/linear/attention) must be quantized or listed as float
    with a reason."""
    rows: Report = report(qmodel)
    findings.fields["quantized_weights"] = len(rows.layers)
    findings.fields["float_weights"] = [{"name": f.name, "kind": f.kind, "reason": f.reason}
                                        for f in rows.float_weights]
    findings.fields["notes"] = list(rows.notes)
    covered = ({r.name for r in rows.layers} | {n for r in rows.layers for n in r.shared_with}
               | {f.name for f in rows.float_weights})
    missing = sorted(expected - covered)
    if missing:
        findings.problem("prepare", f"prepare: {len(missing)} weight(s) neither quantized nor "
                                    f"listed as float: {_first(missing)}")
    unexplained = [f.name for f in rows.float_weights if not f.reason.strip()]
    if unexplained:
        findings.problem("prepare", f"prepare: float weight(s) without a reason: "
                                    f"{_first(unexplained)}")


def _first(names: list[str], count: int = 5) -> str:
    more = f" and {len(names) - count} more" if len(names) > count else ""
    return ", ".join(names[:count]) + more


def _train(findings: _Findings, qmodel: nn.Module, controller: MSQController,
           inputs: Tensor | tuple,
           targets: Tensor | None, steps: int, rebuild: Callable[[], nn.Module]) -> None:
    """``steps`` SGD steps on task loss + LSB regularization, in train mode.

    Each parameter takes its SGD step as soon as its gradient is complete, inside the backward
    pass, and its gradient is freed at once (``sgd_steps_in_backward``): the check never holds a
    whole gradient, which on the largest models is the difference between fitting and not.
    A failure here is a SKIP when the float model fails the same way eagerly in train mode
    (``rebuild`` gives a fresh float model to try, never the caller's own).
    """
    qmodel.train()
    try:
        with sgd_steps_in_backward(qmodel, lr=1e-3, max_norm=1.0):
            for step in range(1, steps + 1):
                # Two backward passes, because in one the regularizer's gradient of every weight
                # (its nodes run first) would wait in autograd's buffers for the task gradient
                # of the same weight: a whole gradient's memory, which the in-backward steps
                # are there to avoid. Alone, each weight's term is stepped on and dropped. The
                # regularizer is taken after the task step, at the weights that step moved.
                for name, make_loss in (("loss",
                                         lambda: task_loss(call_model(qmodel, inputs), targets)),
                                        ("LSB regularization", controller.regularization)):
                    loss = make_loss()
                    if not torch.isfinite(loss):
                        findings.problem("train", f"train: {name} is {float(loss.detach())} at "
                                                  f"step {step}")
                        raise _StageFailed
                    if loss.requires_grad:
                        loss.backward()
    except _StageFailed:
        raise
    except Exception as error:  # decide whose failure it is before recording it
        # Out of memory is a limit of the machine, not a property of the float model: rebuilding
        # it to try eagerly would only fail the same way and turn the finding into a SKIP.
        eager_error = None if is_out_of_memory(error) else _eager_train_error(rebuild, inputs,
                                                                              targets)
        if eager_error is not None:
            findings.problem("train", f"train: model does not run eagerly in train mode at input "
                                      f"{input_shapes(inputs)}: {eager_error}", SKIP)
        else:
            findings.problem("train", f"train: {describe_error(error)}", error=error)
        raise _StageFailed from error


@contextmanager
def sgd_steps_in_backward(model: nn.Module, lr: float, max_norm: float) -> Iterator[None]:
    """Inside, a backward pass also applies ``p -= lr * clip(grad)`` to each parameter as its
    gradient lands, then drops the gradient.

    Each gradient is clipped to norm ``max_norm`` on its own (a global norm would need every
    gradient at once): the steps are there to drive gradients through the quantizers, not to
    learn, and batch-2 batch norm over 1x1 feature maps gives gradient norms of 1e6 that would
    otherwise blow the weights up. A parameter's gradient lands after every use of it in the
    pass, so no op still needs its old value.
    """
    def step(param: Tensor) -> None:
        with torch.no_grad():
            grad = param.grad
            scale = min(1.0, max_norm / (float(grad.norm()) + 1e-12))
            param.add_(grad, alpha=-lr * scale)
        param.grad = None

    params = {id(p): p for p in model.parameters() if p.requires_grad}.values()
    handles = [param.register_post_accumulate_grad_hook(step) for param in params]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for param in params:
            param.grad = None


def _eager_train_error(rebuild: Callable[[], nn.Module], inputs: Tensor | tuple,
                       targets: Tensor | None) -> str | None:
    """The error the float model raises in one train-mode step, or None if it runs."""
    try:
        model = rebuild().train()
        task_loss(call_model(model, inputs), targets).backward()
    except Exception as error:  # the float model's own failure is what we are looking for
        return describe_error(error)
    return None


def _eval_outputs(findings: _Findings, model: nn.Module, inputs: Tensor | tuple) -> list[Tensor]:
    with _stage(findings, "compare"), torch.no_grad(), eval_mode(model):
        return output_tensors(call_model(model, inputs))


def _check_export(findings: _Findings, target: str, int_model: nn.Module,
                  inputs: Tensor | tuple, converted: list[Tensor]) -> None:
    """Export ``int_model`` to ``target``, run the result on ``inputs`` and record how far its
    outputs are from ``converted``; a failure or a difference beyond EXPORT_TOLERANCE fails."""
    stage = f"export:{target}"
    found: dict[str, Any] = {}
    with _stage(findings, stage), torch.no_grad(), eval_mode(int_model):
        if target == "torch":
            args = inputs if isinstance(inputs, tuple) else (inputs,)
            exported = output_tensors(torch.export.export(int_model, args).module()(*args))
        else:
            exported = _onnx_outputs(int_model, inputs, found)
        if [t.shape for t in exported] != [t.shape for t in converted]:
            raise ValueError(f"output shapes differ: exported {[tuple(t.shape) for t in exported]},"
                             f" converted {[tuple(t.shape) for t in converted]}")
    diff, scale = _largest_difference(converted, exported)
    found.update(max_abs_diff=diff, rel_diff=diff / scale if scale > 0 else diff)
    findings.fields.setdefault("exports", {})[target] = found
    allowed = EXPORT_TOLERANCE[target]
    if not diff <= allowed * scale:
        findings.problem(stage, f"{stage}: exported output differs from the converted output by "
                                f"{diff:.3g} (max |output| {scale:.3g}, allowed {allowed:g} of it)")


def _largest_difference(reference: list[Tensor], other: list[Tensor]) -> tuple[float, float]:
    """max |reference - other| over all outputs, and max |reference|."""
    scale = max(float(t.detach().abs().max()) for t in reference)
    diff = max(float((a.double() - b.double()).abs().max()) for a, b in zip(reference, other))
    return diff, scale


def _onnx_outputs(int_model: nn.Module, inputs: Tensor | tuple,
                  found: dict[str, Any]) -> list[Tensor]:
    """``int_model`` through ``export_onnx`` and ONNX Runtime; what was written goes to
    ``found``."""
    from .onnx_export import export_onnx, onnx_runtime_outputs  # onnx is an optional extra

    with tempfile.TemporaryDirectory() as directory:
        written = export_onnx(int_model, inputs, Path(directory) / "model.onnx")
        found.update(int4_weights=len(written.int4_weights), int8_weights=len(written.int8_weights),
                     float_weights=len(written.float_weights), file_bytes=written.file_bytes)
        return onnx_runtime_outputs(written.path, inputs)


def _compare(findings: _Findings, fake_quant: list[Tensor], lowered: list[Tensor]) -> None:
    """Eval outputs of the converted and fake-quant models must match and be finite."""
    with _stage(findings, "compare"):
        if not fake_quant or [t.shape for t in fake_quant] != [t.shape for t in lowered]:
            raise ValueError(f"output structures differ: fake-quant "
                             f"{[tuple(t.shape) for t in fake_quant]}, converted "
                             f"{[tuple(t.shape) for t in lowered]}")
    diff, scale = _largest_difference(fake_quant, lowered)
    findings.fields.update(max_abs_diff=diff, rel_diff=diff / scale if scale > 0 else diff)
    if not all(bool(torch.isfinite(t).all()) for t in fake_quant + lowered):
        findings.problem("compare", "compare: eval output is not finite")
    elif not diff <= RELATIVE_TOLERANCE * scale or math.isnan(diff):
        findings.problem("compare", f"compare: converted output differs from the fake-quant "
                                    f"output by {diff:.3g} (max |output| {scale:.3g}, allowed "
                                    f"{RELATIVE_TOLERANCE:g} of it)")
