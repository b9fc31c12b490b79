"""One run of the check's pipeline on one model, at one batch size:

    build -> eager forward -> trace -> prepare -> train (SGD + LSB regularization)
          -> prune (one Algorithm 1 step, Hessian included) -> convert -> compare
          [-> export:torch / export:onnx, when asked for]

and with ``torch_compile`` a ``compile`` stage between the prune and the conversion
(:mod:`.compiled`). Each stage records what it finds in the run's
:class:`~.stages.Findings`; the first failure ends the run.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from ..api import convert, prepare
from ..config import MSQConfig
from ..controller import MSQController
from ..offload import offload_saved_tensors
from ..report import report
from ..zoo.outputs import task_loss
from ..zoo.specs import ModelSpec, normalize_input_size
from .compare import compare, eval_outputs
from .compiled import check_compiled
from .coverage import check_coverage, expected_weight_names
from .exports import check_export
from .inputs import first_rows, inputs_to_check, model_and_inputs, random_labels
from .result import SKIP
from .stages import Findings, StageFailed, in_stage
from .train import train_steps

__all__ = ["checked_run"]


def checked_run(name: str, spec: ModelSpec | None, given: Any, input_size: Any,
                batch_size: int, *, steps: int, seed: int, config: MSQConfig,
                exports: tuple[str, ...], example_inputs: Tensor | tuple | None,
                offload: bool, torch_compile: bool = False) -> Findings:
    """Run the pipeline on the model ``spec`` builds (else on ``given``, a module) at
    ``batch_size``; the findings, whether it passed or stopped at a failure."""
    findings = Findings(name)
    findings.fields["batch_size"] = batch_size
    try:
        _run_pipeline(findings, spec, given, input_size, batch_size, steps, seed, config,
                      exports, example_inputs, offload, torch_compile)
    except StageFailed:
        pass
    return findings


def _run_pipeline(findings: Findings, spec: ModelSpec | None, given: Any,
                  input_size: Any, batch_size: int, steps: int, seed: int,
                  config: MSQConfig, exports: tuple[str, ...] = (),
                  example_inputs: Tensor | tuple | None = None, offload: bool = False,
                  torch_compile: bool = False) -> None:
    requested = normalize_input_size(input_size, None) if input_size is not None else None
    torch.manual_seed(seed)
    with in_stage(findings, "build", SKIP, "model cannot be built: "):
        built = spec.build(requested) if spec else given
    with in_stage(findings, "build"):
        model, given_inputs = model_and_inputs(built, findings.name)
    generator = torch.Generator().manual_seed(seed)
    inputs = inputs_to_check(findings, spec, model, input_size, batch_size, generator,
                             example_inputs if given_inputs is None else given_inputs)
    targets = random_labels(findings, model, inputs, generator)
    _capture(findings, model, config)
    # A model the spec built is the check's own: prepare it in place, so the largest models
    # need not fit twice. The expected weight names are taken first, from the float model.
    expected = expected_weight_names(model)
    with in_stage(findings, "prepare"):
        qmodel = prepare(model, inputs, config, inplace=spec is not None)
        check_coverage(findings, expected, qmodel)
    findings.fields["table"] = report(qmodel).table()
    del model  # the spec can rebuild it if a failure needs diagnosing
    with in_stage(findings, "train"):
        controller = MSQController(qmodel, config)
    with _saved_activations(findings, offload):
        with findings.timed("train"):
            train_steps(findings, qmodel, controller, inputs, targets, steps,
                        rebuild=(lambda: model_and_inputs(spec.build(requested),
                                                          findings.name)[0])
                        if spec else (lambda: copy.deepcopy(given)))
        with in_stage(findings, "prune"):
            # The Hessian's double backward keeps about three copies of the activations; one
            # sample exercises it as fully as the batch does, at half the memory on the largest.
            first = (first_rows(inputs), None if targets is None else targets[:1])
            records = controller.epoch_end(1, [first], task_loss)
    findings.fields["hessian_method"] = records[0].hessian_method if records else None
    findings.fields["compression"] = round(controller.compression(), 4)
    findings.fields["table"] = report(qmodel).table()  # the widths after the prune
    del controller  # it holds every latent weight, which the conversion is to let go
    fake_quant = eval_outputs(findings, qmodel, inputs)
    if torch_compile:
        check_compiled(findings, qmodel, inputs, fake_quant)
    with in_stage(findings, "convert"):
        # The fake-quant model is not needed any more, and a check that fails midway discards
        # the model anyway: each latent goes as soon as its codes exist.
        int_model = convert(qmodel, inplace=True, one_at_a_time=True)
    findings.fields["table"] = report(int_model).table()
    converted = eval_outputs(findings, int_model, inputs)
    compare(findings, fake_quant, converted)
    for target in exports:
        check_export(findings, target, int_model, inputs, converted)


@contextmanager
def _saved_activations(findings: Findings, offload: bool) -> Iterator[None]:
    """Inside, with ``offload``, saved activations go to disk; records ``offloaded_mib``."""
    if not offload:
        yield
        return
    with offload_saved_tensors() as hooks:
        try:
            yield
        finally:
            findings.fields["offloaded_mib"] = round(hooks.bytes_written / 2**20, 1)


def _capture(findings: Findings, model: nn.Module, config: MSQConfig) -> None:
    """Trace the model as prepare() does and record the graph size and the opaque leaves."""
    from msq_fx.passes.trace import trace

    with in_stage(findings, "trace"):
        captured = trace(model)
    findings.fields.update(graph_nodes=captured.num_nodes, leaves=len(captured.leaves),
                           leaf_reasons=dict(captured.leaves), trace_failure=captured.failure)
