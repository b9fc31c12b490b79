"""The check's entry points: :func:`check_model`, which runs the pipeline on one model (with the
retries of a run that runs out of memory) and returns a CheckResult, :func:`assert_quantizes`,
the same for a test suite, and :func:`check_config`, the MSQConfig a check runs with."""
from __future__ import annotations

import functools
from typing import Any, Sequence

from torch import Tensor, nn

from ..config import MSQConfig
from ..zoo.specs import parse_spec
from .exports import EXPORT_FORMATS
from .inputs import model_and_inputs
from .memory import with_less_memory_retries
from .pipeline import checked_run
from .result import CheckResult

__all__ = ["check_config", "check_model", "assert_quantizes"]


def check_config(seed: int = 0) -> MSQConfig:
    """The MSQConfig a check runs with: prune at the first epoch end, and prune for sure.

    ``prune_threshold=1.0`` makes every group whose LSBs are not all set lose bits at that prune
    (after a few steps no group has beta < the paper's 0.3), so the converted model is checked at
    mixed widths rather than at the initial 8 bits. One Hutchinson probe (training uses up to
    32) runs the same double backward as many and keeps the Hessian affordable on large models;
    the estimate's quality is not what is checked here.
    """
    return MSQConfig(seed=seed, pruning=dict(interval=1, threshold=1.0),
                     hessian=dict(min_samples=1, max_samples=1))


def check_model(spec_or_model: str | nn.Module, *, input_size: int | Sequence[int] | None = None,
                batch_size: int = 2, steps: int = 3, seed: int = 0,
                config: MSQConfig | None = None, exports: Sequence[str] = (),
                example_inputs: Tensor | tuple | None = None,
                offload_activations: bool = False, lean_retry: bool = False,
                torch_compile: bool = False) -> CheckResult:
    """Run prepare -> train -> prune -> convert on one model and compare the converted output.

    Args:
        spec_or_model: a spec string (see msq_fx.zoo.specs) or an nn.Module (used as given;
            prepare works on a copy, but the eager forward checks run it).
        input_size: per-sample input shape (int side, (H, W), (C, H, W), video (C, T, H, W));
            default: the size the model declares (timm's pretrained_cfg; for torchvision see
            msq_fx.zoo.torchvision_tasks.torchvision_input_size).
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
            their backward in files, not in memory (``msq_fx.offload.offload_saved_tensors``):
            for models whose activations at the input size, not their weights, exceed the
            memory. Slower by a write and a read of each; ``offloaded_mib`` says how much went
            to disk. Call ``msq_fx.offload.release_freed_memory()`` once before (``msq-fx
            check`` does), or the memory of the activations read back stays with the process.
        lean_retry: when the batch of 1 runs out of memory in training or in the prune, check
            once more at batch 1 with the options that lower that stage's memory and were not
            in effect (the finite-difference Hessian, activations on disk), instead of only
            naming them in ``note``. Call ``msq_fx.offload.release_freed_memory()`` once
            before, as for ``offload_activations``.
        torch_compile: also run the prepared model, at its mixed widths, through
            ``torch.compile`` (the ``aot_eager`` backend: the graphs of its eval forward, no
            kernels generated); it must give the eager eval outputs, and ``compiled`` records
            its graphs and graph breaks (a break is not a failure).

    Returns:
        A CheckResult: PASS, FAIL (with the stage and the reason) or SKIP (the model itself
        does not build or run eagerly). When the batch asked for runs out of memory, the check
        runs again at batch 1 and returns that result (with ``note`` saying so) if it passes;
        otherwise the first result, whose ``note`` says how the batch of 1 failed. ``seconds``
        and the peak memory then cover every run. Where the batch of 1 ran out of memory in
        training or in the prune, ``note`` also names the options (the finite-difference
        Hessian, activations on disk) not yet in effect that need less there; with
        ``lean_retry`` a third run tries them, and its PASS is the result (``note`` names the
        options, ``hessian_method`` and ``offloaded_mib`` show them).

    Raises:
        SpecError for a spec that names no model, ValueError when the input size is neither
        given nor declared by the model (or given with example inputs), and TypeError for
        example inputs that are not batched tensors. Nothing else raises: a model that fails
        the check gives a FAIL result.

    Example:
        >>> from torch import nn
        >>> import msq_fx
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2))
        >>> result = msq_fx.check_model(model, input_size=8)  # a batch of 2 at 3x8x8
        >>> result.status, result.input_size, result.quantized_weights
        ('PASS', (3, 8, 8), 2)
        >>> result.rel_diff < 1e-5  # the converted model computes what the fake-quant one did
        True
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
    run = functools.partial(checked_run, name, spec, spec_or_model, input_size,
                            steps=steps, seed=seed, config=config,
                            exports=tuple(dict.fromkeys(exports)), example_inputs=example_inputs,
                            offload=offload_activations, torch_compile=torch_compile)
    return with_less_memory_retries(run, batch_size, config, offload_activations, lean_retry)


def assert_quantizes(spec_or_model: str | nn.Module, **options: Any) -> CheckResult:
    """:func:`check_model`, for a test suite: the result on PASS, else AssertionError with the
    status, the reason and the per-layer table.

    Args:
        spec_or_model: a spec string or an nn.Module, as for :func:`check_model`.
        options: keyword arguments of :func:`check_model` (``input_size``, ``example_inputs``,
            ``exports``, ...).

    Returns:
        The CheckResult of a PASS.

    Raises:
        AssertionError: the check did not pass (FAIL or SKIP); the message is the result's
            summary line and the per-layer table. The errors of :func:`check_model` (a bad spec
            or input size) pass through.

    Example:
        In a test suite, ``def test_my_net_quantizes(): msq_fx.assert_quantizes(MyNet(),
        input_size=64)``. Here with a small model, at the input size it takes and at one it
        does not:

        >>> from torch import nn
        >>> import msq_fx
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2))
        >>> msq_fx.assert_quantizes(model, input_size=8).passed
        True
        >>> msq_fx.assert_quantizes(model, input_size=16)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        AssertionError: SKIP Sequential: forward: ... at input (2, 3, 16, 16): RuntimeError: ...
    """
    result = check_model(spec_or_model, **options)
    if not result.passed:
        raise AssertionError(f"{result.summary_line()}\n{result.table}".rstrip())
    return result
