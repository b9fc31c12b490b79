"""prepare() and convert(): the two entry points that run the passes on a private copy."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import torch
from torch import nn

from .config import MSQConfig
from .errors import MSQError
from .modules import LoweredWeight, WeightFakeQuant
from .packed_weights import check_kernels
from .state import PreparedState, attach_state, detach_state
from .utils import copy_module, eval_mode, is_distributed

if TYPE_CHECKING:
    from msq_fx.passes.discover import WeightTarget
    from msq_fx.passes.probe import ProbeResult

__all__ = ["prepare", "convert"]

logger = logging.getLogger("msq_fx")
PREPARED = "the MSQ-prepared model"  # what _run_or_explain names after the rewrite


def prepare(model: nn.Module, example_inputs: Any = None, config: MSQConfig | None = None, *,
            filter_fn: Callable[[nn.Module, str], bool] | None = None,
            leaf_modules: Sequence[str | type] = (),
            concrete_args: Mapping[str, Any] | None = None,
            inplace: bool = False) -> nn.Module:
    """Return an MSQ-quantized copy of ``model`` for quantization-aware training.

    Traces the model (leaf-aware, never failing for a model that runs eagerly), finds every conv,
    depthwise conv, linear and attention weight, and routes each through a RoundClamp quantizer
    at ``config.quantization.init_bits`` (the first and last at ``first_last_bits`` when
    ``first_last="fixed"`` sets it). ``model`` itself is never modified, unless
    ``inplace=True``: then ``model`` is rewritten and returned, without the copy (for a model
    too large to hold twice), and a failure undoes the rewrite before raising. When
    ``example_inputs`` are given, one eager forward on them finds weights used functionally where
    the FX graph cannot see them (inside leaf modules), and calibrates the activation quantizers
    when ``config.quantization.act_bits`` is set. Without them, such uses may be missed; the
    report's notes (and a logged warning) name the Parameters concerned. A found weight whose
    owner module cannot carry a quantizer stays float and is listed in the report with the
    reason (or, with ``config.quantization.on_unquantizable="error"``, raises ``MSQError``).
    A weight to quantize that holds NaN or infinite values raises ``MSQError`` naming it, before
    anything is changed; an empty weight (a dimension of size 0) stays float.

    Args:
        model: the float model.
        example_inputs: optional; a tensor or a tuple of positional inputs that runs ``model``.
        config: the MSQConfig (default ``MSQConfig()``); the prepared model keeps it, and the
            controller and ``save`` read it from there.
        filter_fn: ``filter_fn(module, fqn) -> bool``; False keeps that weight in float.
        leaf_modules: submodules the tracer keeps opaque: classes, or exact qualified names.
        concrete_args: passed to ``torch.fx.Tracer.trace`` (e.g. ``{"flag": False}``).
        inplace: rewrite and return ``model`` itself instead of a copy.

    Returns:
        The prepared model: the same module tree and forward, and every ``state_dict`` key it
        had (each quantizer adds its own: width, p, learned scale), with each quantized weight
        read through a ``WeightFakeQuant`` (msq_fx.modules).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import msq_fx
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> qmodel = msq_fx.prepare(model, torch.randn(3, 4))
        >>> [(row.name, row.bits) for row in msq_fx.report(qmodel).layers]
        [('0.weight', 8), ('2.weight', 8)]
        >>> qmodel[0].weight_quantizer
        WeightFakeQuant(bits=8, p=1, kind=linear, grid=nested, scale=max)
        >>> set(model.state_dict()) <= set(qmodel.state_dict())  # the model's keys are kept
        True
    """
    from msq_fx.passes.rewrite import unrewrite

    config = MSQConfig() if config is None else config
    if not isinstance(config, MSQConfig):
        raise TypeError(f"config must be an msq_fx.MSQConfig, got {type(config).__name__}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"prepare: filter_fn={filter_fn!r} is not callable; pass None or a "
                        f"function filter_fn(module, fqn) -> bool")
    capture = _Capture(filter_fn, tuple(leaf_modules), concrete_args)
    _require_module(model, "prepare")
    if _quantizers(model):
        raise MSQError(f"prepare() was given a model that is already MSQ-prepared or converted "
                       f"({type(model).__name__} holds MSQ quantizers). Pass the original float "
                       f"model, or keep training the prepared one.")
    inputs = _as_tuple(example_inputs)
    if inputs is None and config.quantization.act_bits is not None and is_distributed():
        # Each input quantizer takes its clip from the first tensor it sees; without example
        # inputs that is each rank's own first batch, after DistributedDataParallel has copied
        # rank 0's parameters, so the ranks would train with different clips for good.
        raise MSQError("prepare: under torch.distributed, quantized activations (act_bits="
                       f"{config.quantization.act_bits}) need example_inputs, so the clips are "
                       "set before DistributedDataParallel copies rank 0's to every rank; pass "
                       "example_inputs (a batch of rank 0's data, or any batch of the same kind)")
    if not inplace:
        return _prepare(copy_module(model), inputs, config, capture)
    try:
        return _prepare(model, inputs, config, capture)
    except BaseException:
        unrewrite(model)
        detach_state(model)
        raise


class _Capture(NamedTuple):
    """prepare's arguments that hold callables or classes (a config holds plain data only)."""

    filter_fn: Callable[[nn.Module, str], bool] | None
    leaf_modules: tuple
    concrete_args: Mapping[str, Any] | None


def _prepare(qmodel: nn.Module, inputs: tuple | None, config: MSQConfig,
             capture: _Capture) -> nn.Module:
    """prepare's passes on ``qmodel`` itself (a copy of the user's model unless in place)."""
    from msq_fx.passes.discover import discover
    from msq_fx.passes.group import (assign_groups, build_sensitivity_graph,
                                     groups_across_fixed_widths)
    from msq_fx.passes.rewrite import RewriteError, rewrite, unrewritable
    from msq_fx.passes.trace import trace

    name = type(qmodel).__name__  # before an owner class swap can rename a root layer
    probed = None if inputs is None else _probe_or_explain(qmodel, inputs)
    captured = trace(qmodel, leaf_modules=capture.leaf_modules,
                     concrete_args=capture.concrete_args)
    discovery = discover(qmodel, captured.graph_module, config,
                         probed=None if probed is None else probed.kinds,
                         transformed=None if probed is None else probed.transformed,
                         leaves=captured.leaves, filter_fn=capture.filter_fn)
    refused = unrewritable(qmodel, discovery.targets, config)
    if refused and config.quantization.on_unquantizable == "error":
        raise MSQError("these weights cannot be quantized "
                       "(MSQConfig.quantization.on_unquantizable='error'): "
                       + "; ".join(f"{f.name}: {f.reason}" for f in refused)
                       + ". Exclude them with MSQConfig.quantization.exclude, "
                         "or set on_unquantizable='float' to leave them in float.")
    discovery = discovery.leave_in_float(refused)
    _refuse_non_finite(qmodel, discovery.targets)
    sensitivity_graph = build_sensitivity_graph(discovery.targets, captured.graph_module, config)
    groups = assign_groups(sensitivity_graph)
    mixed = groups_across_fixed_widths(groups, discovery.fixed_width)
    if mixed:
        raise MSQError("MSQConfig.quantization.groups: " + "; ".join(mixed) + ". A group shares "
                       "one width, so the fixed layer would move or its partners never prune; "
                       "leave the fixed layers out of the groups, or set first_last='quantize'.")
    try:
        rewrite(qmodel, discovery, config, groups)
    except RewriteError as error:
        raise MSQError(str(error)) from error
    attach_state(qmodel, PreparedState(config=config.to_dict(),
                                       float_weights=list(discovery.float_weights),
                                       notes=list(discovery.notes),
                                       sensitivity_graph=sensitivity_graph))
    for weight in refused:
        logger.warning("prepare: %s (%s) left in float: %s",
                       weight.name, weight.kind, weight.reason)
    for note in discovery.notes:
        logger.warning("prepare: %s", note)
    logger.info("prepared %s: %d weights quantized, %d left in float, %d graph nodes, %d leaves",
                name, len(discovery.targets), len(discovery.float_weights),
                captured.num_nodes, len(captured.leaves))
    if inputs is not None:
        _run_or_explain(qmodel, inputs, PREPARED)
    return qmodel


def _refuse_non_finite(qmodel: nn.Module, targets: list[WeightTarget]) -> None:
    """MSQError naming every weight to quantize that holds NaN or infinite values (before
    prepare changes anything: their codes would all be meaningless)."""
    from msq_fx.passes.finite import non_finite_weights

    found = non_finite_weights(qmodel, targets)
    if found:
        raise MSQError(
            f"prepare: {len(found)} weight(s) of {type(qmodel).__name__} hold NaN or infinite "
            f"values, which cannot be quantized: "
            + "; ".join(f"{weight.name} ({weight.summary})" for weight in found)
            + ". The model was not changed. Find where they came from: the checkpoint it was "
              "loaded from, or the last optimizer step before it was saved (a learning rate too "
              "large, a loss that overflowed); torch.isfinite(param).all() tells a Parameter "
              "with them. Load a good checkpoint, or re-initialize those layers, then prepare "
              "again.")


def convert(qmodel: nn.Module, *, inplace: bool = False, one_at_a_time: bool = False,
            kernels: str = "dequantize", keep_float: bool | Iterable[str] = False) -> nn.Module:
    """Return a copy of a prepared model whose quantized weights are int8 codes + step + bit width.

    In eval mode its output equals the prepared model's output: both rebuild each weight with the
    same formula from the same codes, whichever ``kernels`` hold them.

    Args:
        qmodel: a model returned by :func:`prepare` (trained or not).
        inplace: lower ``qmodel`` itself and return it (no copy of the latent weights); every
            weight is lowered before any is swapped in, so a weight that cannot be lowered
            raises with ``qmodel`` unchanged.
        one_at_a_time: with ``inplace``, swap each weight in as soon as it is lowered, so its
            latent goes at once: the peak is the model plus one weight's temporaries instead of
            plus every weight's codes. Weights that cannot be lowered are still found before
            anything changes, but running out of memory midway would leave ``qmodel`` partly
            converted: for a model you would discard then (the largest models, converted in
            place where they were trained).
        kernels: ``"dequantize"`` (default): each weight a ``LoweredWeight``, its codes in an
            int8 container, dequantized at every forward. ``"packed"``: each weight a
            ``PackedWeight`` (msq_fx.packed_weights), its codes held at 1, 2, 4 or 8 bits each
            (3 bits in 4, 5-7 in 8), so a model at 4 bits holds an eighth of its float weights'
            bytes instead of a quarter; unpacked and dequantized at every use, to the same
            weights. Saved files are the same either way.
        keep_float: with ``kernels="packed"``, the kinds of weight (``"conv"``,
            ``"depthwise"``, ``"linear"``, ``"attention"``, or True for all) whose float weight
            is computed once and kept: as fast as float layers, for a float copy of them.

    Returns:
        The converted model: each quantized weight a ``LoweredWeight`` (msq_fx.modules) of
        integer codes, its latent Parameter gone; ready for :func:`msq_fx.save` and
        :func:`msq_fx.export_onnx`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import msq_fx
        >>> x = torch.randn(3, 4)
        >>> qmodel = msq_fx.prepare(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), x)
        >>> int_model = msq_fx.convert(qmodel.eval())
        >>> torch.equal(int_model(x), qmodel(x))
        True
        >>> int_model[0].weight_quantizer
        LoweredWeight(bits=8, shape=(8, 4), kind=linear)
    """
    from msq_fx.passes.lower import LowerError, lower

    _require_module(qmodel, "convert")
    kinds = {type(q) for q in _quantizers(qmodel)}
    if WeightFakeQuant not in kinds:
        detail = ("it is already converted" if LoweredWeight in kinds
                  else "it holds no MSQ quantizer")
        raise MSQError(f"convert() expects a model returned by msq_fx.prepare(), but "
                       f"{type(qmodel).__name__}: {detail}. Call msq_fx.prepare(model, "
                       f"example_inputs) and train it first.")
    check_kernels(kernels, keep_float)
    int_model = qmodel if inplace else copy_module(qmodel)
    try:
        lower(int_model, one_at_a_time=one_at_a_time, kernels=kernels, keep_float=keep_float)
    except LowerError as error:
        raise MSQError(str(error)) from error
    return int_model


def _quantizers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (WeightFakeQuant, LoweredWeight))]


def _require_module(model: Any, caller: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}() expects a torch.nn.Module, got {type(model).__name__}")


def _as_tuple(example_inputs: Any) -> tuple | None:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError(f"example_inputs must be a tensor or a tuple of positional inputs, "
                    f"got {type(example_inputs).__name__}")


def _probe_or_explain(model: nn.Module, inputs: tuple) -> ProbeResult | None:
    """The probe pass's ``ProbeResult`` for ``model``; MSQError when ``inputs`` do not run it.

    When only the probe fails (the model runs without it), warn and return None: functional uses
    are then looked for in the FX graph only, and discover notes what that may miss.
    """
    from msq_fx.passes.probe import ProbeError, probe

    try:
        return probe(model, inputs)
    except ProbeError as error:
        _run_or_explain(model, inputs, "the model given to prepare()")
        logger.warning("prepare: the eager probe failed although the model runs (%s); functional "
                       "weight uses are looked for in the FX graph only", error)
        return None


def _module_stack_hooks(model: nn.Module, entered: list[str]) -> list:
    """Hooks that keep ``entered`` as the names of the modules a forward is inside (a module
    that takes no hooks, as a scripted one, is left out)."""
    def leave(*_) -> None:  # a forward hook returning a value would replace the output
        entered.pop()

    hooks = []
    for name, module in model.named_modules():
        try:
            hooks.append(module.register_forward_pre_hook(
                lambda *_, name=name: entered.append(name)))
            hooks.append(module.register_forward_hook(leave))
        except RuntimeError:
            while len(hooks) % 2:  # not half of a pair: the pop would have no push
                hooks.pop().remove()
    return hooks


def _run_or_explain(model: nn.Module, inputs: tuple, what: str) -> None:
    """Run ``model(*inputs)`` without changing it (eval mode, no grad), or raise a clear error."""
    entered: list[str] = []  # the modules the forward is inside, outermost first
    hooks = _module_stack_hooks(model, entered)
    try:
        with torch.no_grad(), eval_mode(model):
            model(*inputs)
    except Exception as error:  # any failure of user code is reported, then re-raised as MSQError
        shapes = ", ".join(str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__
                           for x in inputs)
        inside = next((name for name in reversed(entered) if name), None)
        where = f" in module '{inside}'" if inside else ""
        if what == PREPARED:
            # The float model ran these inputs a moment before (the probe), so the rewrite
            # is what fails, not the inputs.
            raise MSQError(f"the float model runs example_inputs, but {what} "
                           f"({type(model).__name__}) fails on them{where}: "
                           f"{type(error).__name__}: {error}. Keep that module's weights in "
                           f"float (prepare's filter_fn, or MSQConfig.quantization.exclude) and "
                           f"prepare again.") from error
        raise MSQError(f"example_inputs do not run {what} ({type(model).__name__}){where}: "
                       f"{type(error).__name__}: {error}. Inputs were ({shapes}); pass a tuple of "
                       f"the positional inputs model(*example_inputs) accepts.") from error
    finally:
        for handle in hooks:
            handle.remove()
