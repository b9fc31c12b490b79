"""MSQConfig: every knob of MSQ quantization and training, grouped by concern and validated on
construction.

    MSQConfig(target_compression=8.0,
              quantization=QuantizationConfig(init_bits=8, min_bits=2),
              pruning=PruningConfig(interval=10),
              hessian=HessianConfig(batches=1))

A sub-config may also be given as a dict of its fields (``quantization={"init_bits": 4}``), and
``config.replace(pruning={"interval": 1})`` changes only the named fields of a sub-config.
Settings that hold callables or classes (``filter_fn``, ``leaf_modules``, ``concrete_args``) are
arguments of :func:`msq_fx.prepare`, not fields: a config is plain data that a saved file holds
whole. ``from_dict`` reads both this nested form and the flat form older files hold.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from .quant import BINARY_GRADIENTS, GRIDS, PENALTY_UNITS, SCALE_MODES

__all__ = ["MSQConfig", "QuantizationConfig", "PruningConfig", "HessianConfig",
           "FIRST_LAST_POLICIES", "PRUNE_STEP_POLICIES", "INTERVAL_UNITS", "HESSIAN_METHODS",
           "HESSIAN_MODEL_MODES", "HESSIAN_CURVATURES", "UNQUANTIZABLE_POLICIES"]

FIRST_LAST_POLICIES = ("quantize", "fixed", "float")
PRUNE_STEP_POLICIES = ("hessian", "fixed")
INTERVAL_UNITS = ("epoch", "step")
SCALE_AFTER_PRUNE = ("keep", "refit")
LAST_PRUNE = ("fit", "full", "cheapest", "measured")
DROP_ORDERS = ("beta", "omega")
OMEGA_SCALES = ("total", "per_weight")
SCHEDULES = ("gradual", "one_shot")
PENALTY_SCOPES = ("all", "planned")
HESSIAN_METHODS = ("auto", "autograd", "finite_difference")
HESSIAN_MODEL_MODES = ("eval", "train")
HESSIAN_CURVATURES = ("hessian", "fisher")
UNQUANTIZABLE_POLICIES = ("float", "error")


class _SubConfig:
    """Shared behaviour of the frozen sub-configs: validation on construction, replace, to_dict."""

    _prefix = ""

    def __post_init__(self) -> None:
        self._normalize()
        self._validate()

    def _normalize(self) -> None:
        pass

    def _validate(self) -> None:
        raise NotImplementedError

    def _require(self, ok: bool, name: str, expected: str) -> None:
        if not ok:
            raise ValueError(f"MSQConfig.{self._prefix}.{name}={getattr(self, name)!r} is "
                             f"invalid: expected {expected}.")

    def replace(self, **changes: Any):
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"MSQConfig.{cls._prefix}: unknown field(s) {unknown}; known: "
                             f"{sorted(known)}")
        return cls(**dict(data))


@dataclass(frozen=True)
class QuantizationConfig(_SubConfig):
    """How weights (and optionally activations) are quantized.

    init_bits: width every quantized weight starts at (paper: 8).
    min_bits: floor no prune crosses (a 2-LSB prune is clipped to it).
    act_bits: width of layer-input activations; None keeps them float (paper: FP on ImageNet CNNs).
    grid: "nested" (default; grids nest, signed integers) or "literal" (paper Eq. 4 as printed).
    scale: the scale S of each weight (the n-bit step is S / 2^(n-1)). "max": S = max|w| at
        every step (no parameter; the paper's reading). "tensor": one learned S per weight
        tensor; "channel": one learned S per output channel (dim 0). Learned scales start at
        the clip that minimises the quantization error at init_bits and are trained with an
        LSQ gradient; weights past the clip clamp. The nesting stays exact either way.
    binary_gradient: how a binary layer (1 bit on the literal grid, S * sign(w)) with a learned
        scale passes the gradient. "inside_clip" (default): LSQ's rule as at every other width,
        a latent past twice the scale gets none (its sign stays); "every_weight": every latent
        gets it (the forward reads only the sign), the scale its exact derivative sign(w).
        Measured fine-tuning ResNet-20 to 18.5x (two binary layer3 convs): 0.3-0.6 points
        worse than "inside_clip" (docs/fidelity.md).
    binary_gradient_gain: what the gradient a binary layer passes to its latents is multiplied
        by (1.0, the default: as every other width). Binary layers made by a prune train more
        slowly than 2-bit ones in a short fine-tuning; a gain above 1 gives their latents (not
        their scale) a larger step, as a larger learning rate for those layers alone would.
        The Hessian's trace of a binary layer scales alike; a binary layer is at the width
        floor, so no prune decision reads it. Measured fine-tuning ResNet-20 to 18.5x (seed 0):
        0.32 points worse at 3 and 0.53 at 1/3 than at 1, the training loss higher both ways
        (docs/fidelity.md).
    first_last: "quantize" the first and last quantized layer like any other, keep them "fixed"
        at ``first_last_bits`` (never pruned), or leave them "float".
    first_last_bits: the width "fixed" holds the first and last layer at; None (default):
        init_bits. Higher precision at a network's edges is the oldest mixed-precision
        heuristic; with a start near the target's width (``MSQConfig.fine_tuning``) it is the
        one way those two layers get more bits than the rest, since a prune only lowers widths.
        Only read under ``first_last="fixed"``; any other policy with it set is an error.
    exclude: regular expressions; a weight whose FQN matches any (re.search) stays float.
    groups: each entry a tuple of FQN regexes; matching weights share one precision decision.
    on_unquantizable: what prepare() does with a found weight whose owner module cannot carry a
        quantizer (a container owning a Parameter directly, an attribute defined as a property,
        ...): "float" leaves it in float and lists it in the report with the reason; "error"
        raises MSQError naming every such weight.
    recompute_quantized_weights: True (default) lets a conv / linear / attention op save how to
        recompute its quantized weight for the backward pass instead of a copy of it, so training
        holds one weight-sized tensor less per layer for one more fake quantization per weight
        in the backward. Covers the uses inside the weight's own module and, through forward
        hooks on the prepared model (removed by convert), a parent's functional use
        (``F.linear(x, self.qkv.weight)``).
    """

    _prefix = "quantization"

    init_bits: int = 8
    min_bits: int = 2
    act_bits: int | None = None
    grid: str = "nested"
    scale: str = "max"
    binary_gradient: str = "inside_clip"
    binary_gradient_gain: float = 1.0
    first_last: str = "quantize"
    first_last_bits: int | None = None
    exclude: tuple[str, ...] = ()
    groups: tuple[tuple[str, ...], ...] = ()
    on_unquantizable: str = "float"
    recompute_quantized_weights: bool = True

    def _normalize(self) -> None:
        # Sequences become tuples so the frozen config compares by value.
        object.__setattr__(self, "exclude", tuple(self.exclude))
        object.__setattr__(self, "groups", tuple(tuple(g) for g in self.groups))

    def _validate(self) -> None:
        self._require(_is_int(self.init_bits) and 2 <= self.init_bits <= 8, "init_bits",
                      "an integer in 2..8 (weights are stored in int8 containers)")
        self._require(_is_int(self.min_bits) and 1 <= self.min_bits <= self.init_bits,
                      "min_bits", f"an integer in 1..init_bits ({self.init_bits})")
        self._require(self.act_bits is None or (_is_int(self.act_bits)
                                                and 2 <= self.act_bits <= 16),
                      "act_bits", "None (float activations) or an integer in 2..16")
        self._require(self.grid in GRIDS, "grid", f"one of {GRIDS}")
        self._require(self.scale in SCALE_MODES, "scale", f"one of {SCALE_MODES}")
        self._require(self.binary_gradient in BINARY_GRADIENTS, "binary_gradient",
                      f"one of {BINARY_GRADIENTS}")
        self._require(isinstance(self.binary_gradient_gain, (int, float))
                      and not isinstance(self.binary_gradient_gain, bool)
                      and math.isfinite(self.binary_gradient_gain)
                      and self.binary_gradient_gain > 0, "binary_gradient_gain",
                      "a finite number > 0")
        self._require(self.first_last in FIRST_LAST_POLICIES, "first_last",
                      f"one of {FIRST_LAST_POLICIES}")
        self._require(self.first_last_bits is None or (_is_int(self.first_last_bits)
                                                       and 1 <= self.first_last_bits <= 8),
                      "first_last_bits", "None (init_bits) or an integer in 1..8")
        self._require(self.first_last_bits is None or self.first_last == "fixed",
                      "first_last_bits", f"None unless first_last='fixed' (it is "
                      f"{self.first_last!r}): only 'fixed' holds the edges at a width")
        self._require(self.on_unquantizable in UNQUANTIZABLE_POLICIES, "on_unquantizable",
                      f"one of {UNQUANTIZABLE_POLICIES}")
        self._require(all(isinstance(p, str) and _compiles(p) for p in self.exclude), "exclude",
                      "a tuple of valid regular expressions (str)")
        self._require(all(len(g) >= 1 and all(isinstance(p, str) and _compiles(p) for p in g)
                          for g in self.groups),
                      "groups", "a tuple of non-empty tuples of valid FQN regexes (str)")
        self._require(isinstance(self.recompute_quantized_weights, bool),
                      "recompute_quantized_weights", "True or False")


@dataclass(frozen=True)
class PruningConfig(_SubConfig):
    """Algorithm 1's schedule: the LSB penalty, when and how much to prune.

    reg_strength: lambda, L1 strength on the LSBs (summed over weights, in ``penalty_units``).
    penalty_units: what one unit of |B_k| is. "code" (default; the paper's Eq. 5): one n-bit
        step, so a weight's pull is lambda / step: 2x stronger per bit of width and stronger
        where the scale is small; fine-tuning at a few epochs' learning rate, the LSBs stop
        emptying around 5 bits (MNIST example: stuck at 6.33x of a target of 8x).
        "weight": the residual in the weight's own units (|B_k| x step), so every weight is
        pulled with lambda whatever its width and scale; lambda then needs to be about
        1e-3 to 1e-2 rather than 1e-5 (MNIST example: 8x at epoch 2 of 4 with 1e-2).
    penalty_scope: which groups the LSB penalty pulls. "all" (default; Algorithm 1): every group
        still above ``min_bits``. "planned": the same until the prune that will reach the target
        is in sight; from then (after a prune, when dropping p LSBs from every group still
        pruning would carry the compression past the target) only the groups that prune would
        take, by the same rules (``drop_order``, ``last_prune``), with the ordering of the
        prune that made the plan; it holds until a prune changes a width. Why: in the last
        interval the penalty otherwise drags every layer's weights onto the next coarser grid
        while the prune lowers only a few of them; the rest keep their width but start the
        plain QAT from weights a bit width coarser than it.
        Only the planned groups can be pruned while a plan holds: the others were not pulled,
        so a beta under alpha would be chance, not emptied LSBs.
    threshold: alpha; a group whose LSB non-zero rate beta is below it loses p LSBs.
    interval: I; pruning runs after every I-th epoch (``epoch_end``) or every I-th optimizer step
        (``step_end``), as ``interval_unit`` says.
    interval_unit: "epoch" (the paper's) or "step": with a budget of a few epochs, prunes every
        few hundred steps reach the target early and leave most of the budget to plain QAT.
    step_policy: "hessian" (p = 2 where Omega < mean Omega, else 1) or "fixed" (p = 1).
    scale_after_prune: what a prune does to the learned scale of each group it pruned.
        "refit" (default): S is re-set to the error-minimising clip at the new width, as a
        calibration at that width would set it (values move). "keep": S stays, so a prune whose
        dropped LSBs were all zero moves no value, but a clip chosen at 8 bits is far too wide
        at 2-3 bits and the LSQ gradient takes many steps to shrink it. Measured fine-tuning
        ResNet-20 to 10.67x (docs/fidelity.md): 78.53% refit against 76.18% keep; MNIST from
        scratch: 93.78% against 93.65%. No effect with ``quantization.scale="max"``.
    bn_recalibration_batches: after a prune that changed any width, re-estimate the running
        statistics of every BatchNorm on this many of the batches given to the prune (0: off).
        A prune shifts each pruned layer's output distribution; the running statistics would
        otherwise take hundreds of steps to follow. Default 4: on the MNIST example (8x, pruning
        every epoch) the accuracy right after each prune rose from 72.9 / 91.1 / 94.2 / 91.9 /
        94.7% to 89.2 / 94.8 / 95.5 / 95.6 / 95.8%, the final one unchanged (docs/fidelity.md).
    last_prune: "fit" (default): a group whose p-LSB drop would carry the compression past the
        target drops only as many LSBs as reaching the target takes. "full": it drops all p, as
        a literal reading of Algorithm 1 does, and can overshoot the target by up to one bit of
        the largest group (MNIST example: 8.90x for a target of 8x). "cheapest": as "fit", and
        once a single group's drop would reach the target, the prune takes, of the groups that
        can, the one whose drop adds the least Omega (Omega with ``omega_scale``; per weight,
        the added Omega times the weight count) rather than the next in ``drop_order``, which
        can be a large layer whose drop overshoots the target where a small one would have
        closed the gap; needs Hessian traces, taken at every prune even with
        ``step_policy="fixed"``. "measured": the prune that would reach the target (dropping
        p LSBs from every group under alpha would) tries each drop instead: every group still
        above ``min_bits``, under alpha or not, 1 to p LSBs narrower, its scale re-fitted and
        the BatchNorm statistics re-estimated as the prune would leave them, the loss taken on
        the prune's batches against the loss at the current widths with the statistics
        re-estimated alike; the prune then takes the set of drops whose loss increases, each
        clipped at zero, sum least among those that reach the target, of those the one saving
        the fewest bits (msq_fx.finish): a drop measured to lower the loss is free but does not
        carry the compression past the target. Each prune record holds the
        increase it measured (``drop_loss_increase``). Why: the estimates the other rules read
        decide the final widths, and one layer's Hutchinson trace can be far off, even below
        zero; and the layers whose LSBs resist the pull (ResNet-20's first conv and fc, 1,072
        weights at 16x) cannot be lowered under alpha, so a whole larger layer goes to 1 bit
        in their place. Costs one forward over the prune's batches per candidate drop, plus
        the BatchNorm re-estimation, in that prune only. Not with ``penalty_scope="planned"``,
        whose plan is made by the estimates. Measured on ResNet-20 (docs/fidelity.md, seeds
        0-3): the target hit more closely (16.04x at three seeds of four against 16.25-17.14x;
        18.14-18.51x against 18.51-18.88x), the accuracy no better than "cheapest" (-0.13 ±
        0.11 points at 16x, +0.03 ± 0.11 at 18x): the loss right after a drop ranks the small
        early layers cheapest, and they recover less in the training that follows.
    drop_order: the order in which the groups under alpha lose their LSBs in the prune that
        reaches the target (earlier prunes drop every such group, so the order decides only
        this one). "beta" (default; the paper's ascending beta): the groups whose LSBs emptied
        most; on ResNet-20 these are the small early layers, which then end one bit under the
        rest. "omega": ascending Omega growth per weight and bit saved, Tr(H) x (||W_q - W||^2
        at the width after the drop - at the current width) / (weights x LSBs dropped), the
        rule of the one-shot allocation (msq_fx.allocation); needs Hessian traces, taken at
        every prune even with ``step_policy="fixed"``.
    omega_scale: what Omega, against which p is chosen (p = 2 below the mean), measures.
        "total" (default; Eq. 9 as printed): Tr(H_l) x ||W_q - W||^2, which grows with the
        square of a layer's weight count at equal per-weight curvature and error, so the large
        layers get p = 1 and the small ones p = 2; on ResNet-20 the small early layers then end
        at 1-2 bits and the large late ones at 3-4. "per_weight": the same divided by the
        group's weight count squared, (Tr(H_l) / n) x (||W_q - W||^2 / n), the mean diagonal
        curvature (HAWQ-V2's average trace, which the paper says it follows) times the mean
        squared quantization error: a layer is not judged more sensitive for being larger.
        The recorded Omega is the one compared. The scale applies as well to the "omega" drop
        order and to the one-shot allocation: per weight, their growth per bit saved is divided
        once more by the weight count (the average trace times the error added, per bit saved).
    schedule: "gradual" (default; Algorithm 1): the LSB penalty empties LSBs and every due
        prune drops p of them until the target. "one_shot": no LSB penalty; the first due prune
        chooses every width at once, lowering one bit at a time wherever Omega grows least per
        bit saved until the target (``msq_fx.allocation``, the HAWQ-V3 / AIMET practice), and
        training is plain QAT from there. Measured fine-tuning ResNet-20 for 3 epochs
        (docs/fidelity.md), with ``omega_scale="per_weight"``: 81.61% at 8.2x and 81.67% at
        10.9x, against 81.34% and 81.19% for uniform 4- and 3-bit QAT.
    """

    _prefix = "pruning"

    reg_strength: float = 5e-5
    threshold: float = 0.3
    interval: int = 10
    interval_unit: str = "epoch"
    step_policy: str = "hessian"
    scale_after_prune: str = "refit"
    bn_recalibration_batches: int = 4
    last_prune: str = "fit"
    penalty_units: str = "code"
    drop_order: str = "beta"
    omega_scale: str = "total"
    schedule: str = "gradual"
    penalty_scope: str = "all"

    def _validate(self) -> None:
        self._require(_is_number(self.reg_strength) and self.reg_strength >= 0, "reg_strength",
                      "a number >= 0 (lambda)")
        self._require(_is_number(self.threshold) and 0 < self.threshold <= 1, "threshold",
                      "a number in (0, 1] (alpha)")
        self._require(_is_int(self.interval) and self.interval >= 1, "interval",
                      "an integer >= 1 (epochs or steps between prunes)")
        self._require(self.interval_unit in INTERVAL_UNITS, "interval_unit",
                      f"one of {INTERVAL_UNITS}")
        self._require(self.scale_after_prune in SCALE_AFTER_PRUNE, "scale_after_prune",
                      f"one of {SCALE_AFTER_PRUNE}")
        self._require(_is_int(self.bn_recalibration_batches)
                      and self.bn_recalibration_batches >= 0, "bn_recalibration_batches",
                      "an integer >= 0 (0: off)")
        self._require(self.step_policy in PRUNE_STEP_POLICIES, "step_policy",
                      f"one of {PRUNE_STEP_POLICIES}")
        self._require(self.last_prune in LAST_PRUNE, "last_prune", f"one of {LAST_PRUNE}")
        self._require(self.penalty_units in PENALTY_UNITS, "penalty_units",
                      f"one of {PENALTY_UNITS}")
        self._require(self.drop_order in DROP_ORDERS, "drop_order", f"one of {DROP_ORDERS}")
        self._require(self.omega_scale in OMEGA_SCALES, "omega_scale", f"one of {OMEGA_SCALES}")
        self._require(self.schedule in SCHEDULES, "schedule", f"one of {SCHEDULES}")
        self._require(self.penalty_scope in PENALTY_SCOPES, "penalty_scope",
                      f"one of {PENALTY_SCOPES}")
        self._require(not (self.penalty_scope == "planned" and self.last_prune == "measured"),
                      "penalty_scope", "'all' with last_prune='measured': a plan is made "
                      "before the prune from the estimates, which 'measured' does not use; "
                      "use one or the other")


@dataclass(frozen=True)
class HessianConfig(_SubConfig):
    """How each prune estimates Tr(H) per group (docs/hessian.md).

    max_samples / min_samples / tol: Hutchinson estimator limits.
    batches: batches of the given iterable used for the Hessian at each prune.
    method: how H v is computed. "autograd": double backward (exact; about 2.5 times a training
        step's memory on ResNet-20). "finite_difference": central difference of two first-order
        gradients with the quantized weights displaced (two backwards per probe, a training
        step's memory; error O(step^2)). "auto" (default): autograd, and finite differences when
        autograd runs out of memory or meets an op that has no second derivative (logged as a
        warning; the prune records which method ran). Under torch.distributed "auto" does not
        fall back (ranks could not agree midway); an out-of-memory there raises an error that
        says what to set instead.
    chunk_size: None (default) differentiates the Hessian batches as one loss; an integer n splits
        each batch along its first dimension into chunks of at most n samples whose losses,
        weighted by their share of the batch, are differentiated one at a time: the same traces
        (up to rounding) when ``loss_fn`` averages per-sample losses, in a fraction of the memory.
    relative_step: finite-difference step, relative to the RMS of the weights.
    frozen_kinks: finite differences replay the activation pattern of ReLU-like ops and max
        pooling recorded at the undisplaced point (default), giving the curvature the double
        backward sees; False lets the step cross kinks.
    model_mode: the mode the model runs in for the Hessian's loss. "eval" (default): running BN
        statistics, no dropout, so the loss is a function of the weights alone. "train": for
        models whose loss exists only in train mode (torchvision detectors); batches are then
        ``((inputs, targets), None)`` pairs fed as ``model(inputs, targets)``.
    trace_margin: standard errors added to each layer's Hutchinson mean before any decision
        reads it (Omega, p, the drop order, the cheapest finish). 0 (default) uses the mean, as
        the paper does. The probes stop once the total trace settles, so one layer's own
        estimate can be far off, even below zero, which makes that layer the cheapest to drop
        (a 36,864-weight ResNet-20 conv made binary at 16x, docs/fidelity.md); with a margin of
        2 a layer counts as cheap only when its trace is small beyond the estimate's noise.
        Measured at 16x over six seeds: the target hit more exactly (16.04-16.25x), the
        accuracy not better (80.79% against 80.93% with the mean), hence the default. Either
        way, a prune that lowers a layer on a negative trace logs a warning naming it.
    curvature: what stands for Tr(H_l). "hessian" (default, the paper's Eq. 9): Hutchinson's
        estimate of the loss Hessian's trace, by ``method``. "fisher": the trace of the Fisher
        information of the model's own softmax over dim 1 of its output, which is the
        Gauss-Newton part of the cross-entropy Hessian (msq_fx.fisher). It is never negative
        and each layer's estimate comes from its own gradient block alone (no cross-layer noise),
        from first-order backwards only (about a training step's memory, any op); it reads the
        model's class scores and labels drawn from them, not ``loss_fn``, so it suits
        classifiers and segmenters trained with cross-entropy. ``method``, ``relative_step``
        and ``frozen_kinks`` apply to "hessian" only. Measured beside the fine-tuning preset in
        one environment (CIFAR-10 ResNet-20, four seeds): level at 16x (+0.00 +- 0.16 points)
        and 18x (-0.06 +- 0.14), with steadier choices and a quarter of the prune's time, hence
        an option; the default stays the paper's Hessian.
    """

    _prefix = "hessian"

    max_samples: int = 32
    min_samples: int = 4
    tol: float = 1e-2
    batches: int = 1
    method: str = "auto"
    chunk_size: int | None = None
    relative_step: float = 1e-3
    frozen_kinks: bool = True
    model_mode: str = "eval"
    trace_margin: float = 0.0
    curvature: str = "hessian"

    def _validate(self) -> None:
        self._require(_is_int(self.min_samples) and self.min_samples >= 1, "min_samples",
                      "an integer >= 1")
        self._require(_is_int(self.max_samples) and self.max_samples >= self.min_samples,
                      "max_samples", f"an integer >= min_samples ({self.min_samples})")
        self._require(_is_number(self.tol) and self.tol > 0, "tol", "a number > 0")
        self._require(_is_int(self.batches) and self.batches >= 1, "batches", "an integer >= 1")
        self._require(self.method in HESSIAN_METHODS, "method", f"one of {HESSIAN_METHODS}")
        self._require(self.chunk_size is None or (_is_int(self.chunk_size)
                                                  and self.chunk_size >= 1),
                      "chunk_size", "None (whole batches) or an integer >= 1 (samples per chunk)")
        self._require(_is_number(self.relative_step) and 0 < self.relative_step < 1,
                      "relative_step", "a number in (0, 1)")
        self._require(isinstance(self.frozen_kinks, bool), "frozen_kinks", "True or False")
        self._require(self.model_mode in HESSIAN_MODEL_MODES, "model_mode",
                      f"one of {HESSIAN_MODEL_MODES}")
        self._require(_is_number(self.trace_margin) and 0 <= self.trace_margin < math.inf,
                      "trace_margin", "a finite number >= 0 (standard errors; 0 uses the mean)")
        self._require(self.curvature in HESSIAN_CURVATURES, "curvature",
                      f"one of {HESSIAN_CURVATURES}")
        self._require(self.curvature != "fisher" or self.model_mode == "eval", "curvature",
                      "'hessian' when model_mode is 'train' (the Fisher reads class scores, and "
                      "a model that needs train mode for its loss returns the loss instead)")


_SECTIONS = {"quantization": QuantizationConfig, "pruning": PruningConfig,
             "hessian": HessianConfig}


@dataclass(frozen=True)
class MSQConfig:
    """Configuration of MSQ quantization and training (defaults: the paper's CNN settings,
    supplement Table 2).

    target_compression: Gamma, 32 / average bits over the quantized weights; pruning and
        regularization stop once it is reached.
    quantization: :class:`QuantizationConfig` (widths, grid, which weights).
    pruning: :class:`PruningConfig` (Algorithm 1's penalty and schedule).
    hessian: :class:`HessianConfig` (the sensitivity estimate behind each prune).
    seed: seeds the Rademacher vectors, so decisions are reproducible and resumable.

    Example:
        >>> config = MSQConfig(target_compression=10.0, pruning={"interval": 2})
        >>> config.pruning.interval, config.quantization.init_bits
        (2, 8)
        >>> config.replace(quantization={"init_bits": 6}).quantization.init_bits
        6
    """

    target_compression: float = 8.0
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    hessian: HessianConfig = field(default_factory=HessianConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        for name, section in _SECTIONS.items():
            value = getattr(self, name)
            if isinstance(value, Mapping):
                object.__setattr__(self, name, section.from_dict(value))
            elif not isinstance(value, section):
                raise ValueError(f"MSQConfig.{name}={value!r} is invalid: expected a "
                                 f"{section.__name__} or a dict of its fields.")
        min_bits = self.quantization.min_bits
        _require(_is_number(self.target_compression) and self.target_compression > 1,
                 "target_compression", self.target_compression,
                 f"a number > 1 (32 / average bits; at most {32 / min_bits:g} with min_bits="
                 f"{min_bits})")
        _require(self.target_compression <= 32 / min_bits, "target_compression",
                 self.target_compression,
                 f"reachable: at most 32/min_bits = {32 / min_bits:g}; lower "
                 f"quantization.min_bits or the target")
        _require(_is_int(self.seed), "seed", self.seed, "an integer")

    @classmethod
    def fine_tuning(cls, target_compression: float = 8.0, **changes: Any) -> "MSQConfig":
        """The settings measured best for quantizing a trained network in a few epochs.

        The defaults are the paper's, for training of hundreds of epochs (a prune every 10
        epochs, the LSB penalty in n-bit steps, S = max|w|, a start from 8 bits); fine-tuning a
        trained model they do not reach the target (the LSBs stop emptying around 5 bits), and
        a road of many prunes costs accuracy the short budget does not win back (the LSB
        penalty pulling the latents for 100-125 steps: 79.84% with it, 81.25% without, at
        10.67x). This preset keeps the road to one or two prunes:

        * it starts one bit above the uniform width the target needs (``init_bits`` =
          ceil(32 / target) + 1, at most 8: 5 bits for 8x, 4 for 10.67x, 3 for 16x);
        * prunes every 25 optimizer steps (call ``MSQController.step_end`` after each step),
          the LSBs pulled in weight units with lambda 1e-2;
        * learns one scale per output channel, re-fitted at each pruned layer's new width;
        * takes the prune that reaches the target in ascending Omega growth per bit, and closes
          the last gap with the single drop that adds the least Omega (``last_prune=
          "cheapest"``);
        * under 16x, once that prune is in sight, pulls only the groups it will take
          (``penalty_scope="planned"``): pulling every layer toward a width only one of them
          gets left the others' weights a bit coarser than their width (10.67x: training loss
          0.137-0.139 against 0.074-0.079 planned, 0.087-0.088 uniform 3-bit). From 16x it
          pulls every layer (``"all"``), the last drop is to a binary layer, and the layers
          whose LSBs resist the pull (fc) stay off it; planned, the cheapest by Omega was fc
          at three seeds of four (80.94% mean against 80.99% pulling every layer: a binary fc
          averaged 80.82%, a binary layer1.1 conv 81.05%);
        * from 16x on, allows binary 1-bit layers (``min_bits=1`` on the symmetric literal
          grid): at 32 / min_bits = 16x with 2-bit floors only uniform widths reach the target.

        Measured (docs/fidelity.md, CIFAR-10 ResNet-20, 81.61% float, 3 epochs, three to six
        seeds, against uniform QAT at the same size and seeds): see the table of targets there.
        ``changes`` are applied as :meth:`replace` applies them (a dict for a section changes
        only the fields it names).

        Example:
            >>> config = MSQConfig.fine_tuning(10.0, pruning={"interval": 50})
            >>> config.pruning.interval, config.pruning.interval_unit, config.quantization.scale
            (50, 'step', 'channel')
            >>> [MSQConfig.fine_tuning(t).quantization.init_bits for t in (4.0, 8.0, 32 / 3, 16.0)]
            [8, 5, 4, 3]
        """
        below_two_bits = target_compression >= 16
        preset = cls(target_compression=target_compression,
                     quantization={"scale": "channel",
                                   "init_bits": fine_tuning_start_bits(target_compression),
                                   "min_bits": 1 if below_two_bits else 2,
                                   "grid": "literal" if below_two_bits else "nested"},
                     pruning={"interval": 25, "interval_unit": "step",
                              "penalty_units": "weight", "reg_strength": 1e-2,
                              "scale_after_prune": "refit", "drop_order": "omega",
                              "last_prune": "cheapest",
                              "penalty_scope": "all" if below_two_bits else "planned"})
        return preset.replace(**changes) if changes else preset

    def replace(self, **changes: Any) -> "MSQConfig":
        """A copy with ``changes`` applied (validated again); a dict given for a sub-config
        changes only the fields it names."""
        for name, value in changes.items():
            if name in _SECTIONS and isinstance(value, Mapping):
                changes[name] = getattr(self, name).replace(**value)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain, nested data (JSON-able)."""
        return {"target_compression": self.target_compression,
                **{name: getattr(self, name).to_dict() for name in _SECTIONS},
                "seed": self.seed}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MSQConfig":
        """The config ``to_dict`` wrote; a flat dict of the older form is migrated."""
        data = dict(data)
        if not any(isinstance(data.get(name), Mapping) for name in _SECTIONS):
            data = _migrated_flat(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"MSQConfig.from_dict: unknown field(s) {unknown}; known: "
                             f"{sorted(known)}")
        return cls(**data)


#: The flat field names of older saved configs, by section and new name.
_FLAT_NAMES = {
    **{name: ("quantization", name) for name in (
        "init_bits", "min_bits", "act_bits", "grid", "first_last", "exclude", "groups",
        "on_unquantizable", "recompute_quantized_weights")},
    "reg_strength": ("pruning", "reg_strength"), "prune_threshold": ("pruning", "threshold"),
    "prune_interval": ("pruning", "interval"), "prune_step_policy": ("pruning", "step_policy"),
    **{f"hessian_{name}": ("hessian", name) for name in (
        "max_samples", "min_samples", "tol", "batches", "method", "chunk_size", "relative_step",
        "frozen_kinks", "model_mode")},
}


def _migrated_flat(flat: dict[str, Any]) -> dict[str, Any]:
    """A flat (older) config dict in the nested form; unknown names stay for the caller to
    report."""
    nested: dict[str, Any] = {name: {} for name in _SECTIONS}
    for name, value in flat.items():
        if name in _FLAT_NAMES:
            section, new_name = _FLAT_NAMES[name]
            nested[section][new_name] = value
        else:
            nested[name] = value
    # Files of the flat form were trained with S = max|w| and full last prunes, whatever the
    # defaults are now.
    nested["quantization"].setdefault("scale", "max")
    nested["pruning"].setdefault("last_prune", "full")
    return nested


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _compiles(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True


def fine_tuning_start_bits(target_compression: float) -> int:
    """One bit above the narrowest uniform width whose compression reaches the target, at most 8:
    the start that reaches the target in one or two prunes."""
    uniform_bits = math.ceil(32 / target_compression - 1e-9)  # 32 / (32 / 3) is not exactly 3
    return min(8, uniform_bits + 1)


def _require(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise ValueError(f"MSQConfig.{name}={value!r} is invalid: expected {expected}.")
