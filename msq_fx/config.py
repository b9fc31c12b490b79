"""MSQConfig: every knob of prepare() and of the MSQ training algorithm, validated on construction."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from .quant import GRIDS

FIRST_LAST_POLICIES = ("quantize", "fixed", "float")
PRUNE_STEP_POLICIES = ("hessian", "fixed")
HESSIAN_METHODS = ("auto", "autograd", "finite_difference")
HESSIAN_MODEL_MODES = ("eval", "train")
UNQUANTIZABLE_POLICIES = ("float", "error")

#: A prepared model keeps ``config.to_dict()`` under this attribute; the controller defaults to it.
CONFIG_ATTR = "_msq_config"

#: Fields that hold callables or classes; they do not round-trip through to_dict/from_dict.
_RUNTIME_ONLY = ("filter_fn", "leaf_modules", "concrete_args")


@dataclass(frozen=True)
class MSQConfig:
    """Configuration of MSQ quantization and training (defaults: paper's CNN settings, Table 2).

    Quantization
        init_bits: width every quantized weight starts at (paper: 8).
        min_bits: floor no prune crosses (a 2-LSB prune is clipped to it).
        act_bits: width of layer-input activations; None keeps them float (paper: FP on ImageNet CNNs).
        grid: "nested" (default; grids nest, signed integers) or "literal" (paper Eq. 4 as printed).
        first_last: "quantize" the first and last layer like any other, keep them "fixed" at
            init_bits (never pruned), or leave them "float".
        exclude: regular expressions; a weight whose FQN matches any (re.search) stays float.
        filter_fn: optional ``filter_fn(module, fqn) -> bool``; False keeps that weight float.
        groups: each entry a tuple of FQN regexes; matching weights share one precision decision.
        on_unquantizable: what prepare() does with a found weight whose owner module cannot carry
            a quantizer (a container owning a Parameter directly, an attribute defined as a
            property, ...): "float" leaves it in float and lists it in the report with the
            reason; "error" raises MSQError naming every such weight.
        recompute_quantized_weights: True (default) lets a conv / linear / attention op save
            how to recompute its quantized weight for the backward pass instead of a copy of
            it, so training holds one weight-sized tensor less per layer for one more fake
            quantization per weight in the backward. Covers the uses inside the weight's own
            module and, through forward hooks on the prepared model (removed by convert), a
            parent's functional use (``F.linear(x, self.qkv.weight)``).
    Capture
        leaf_modules: FQNs, class names or classes the tracer keeps opaque.
        concrete_args: passed to the tracer (e.g. ``{"flag": False}``).
    Training (Algorithm 1)
        reg_strength: lambda, L1 strength on the LSBs (in n-bit step units, summed over weights).
        prune_threshold: alpha; a group whose LSB non-zero rate beta is below it loses p LSBs.
        prune_interval: I; pruning runs at the end of every I-th epoch.
        target_compression: Gamma; pruning and regularization stop once it is reached.
        prune_step_policy: "hessian" (p = 2 where Omega < mean Omega, else 1) or "fixed" (p = 1).
        hessian_max_samples / hessian_min_samples / hessian_tol: Hutchinson estimator limits.
        hessian_batches: batches of the given iterable used for the Hessian at each prune.
        hessian_method: how H v is computed. "autograd": double backward (exact; about 2.5
            times a training step's memory on ResNet-20). "finite_difference": central difference
            of two first-order gradients with the quantized weights displaced (two backwards per
            probe, a training step's memory; error O(step^2)). "auto" (default): autograd, and
            finite differences when autograd runs out of memory or meets an op that has no
            second derivative (logged as a warning; the prune records which method ran). Under
            torch.distributed "auto" does not fall back (ranks could not agree midway); an
            out-of-memory there raises an error that says what to set instead.
        hessian_chunk_size: None (default) differentiates the Hessian batches as one loss; an
            integer n splits each batch along its first dimension into chunks of at most n
            samples whose losses, weighted by their share of the batch, are differentiated one
            at a time: the same traces (up to rounding) when ``loss_fn`` averages per-sample
            losses, as F.cross_entropy does by default, in a fraction of the memory, for more
            time when several probes are drawn.
        hessian_relative_step: finite-difference step, relative to the RMS of the weights (see
            msq_fx.hessian.finite_difference_traces for the measured trade-off).
        hessian_frozen_kinks: finite differences replay the activation pattern of ReLU-like ops
            and max pooling recorded at the undisplaced point (default), giving the curvature
            the double backward sees; False lets the step cross kinks and adds the gradient's
            jumps there, which on ReLU networks dominates the traces.
        hessian_model_mode: the mode the model runs in for the Hessian's loss. "eval" (default):
            running BN statistics, no dropout, so the loss is a function of the weights alone.
            "train": for models whose loss exists only in train mode (torchvision detectors
            return their losses in train mode and detections in eval mode); batches are then
            ``((inputs, targets), None)`` pairs fed as ``model(inputs, targets)``. Keep that
            loss deterministic (fixed sampler seeds, no dropout): finite differences compare
            gradients from several forwards.
        seed: seeds the Rademacher vectors, so decisions are reproducible and resumable.
    """

    init_bits: int = 8
    min_bits: int = 2
    act_bits: int | None = None
    grid: str = "nested"
    first_last: str = "quantize"
    exclude: tuple[str, ...] = ()
    filter_fn: Callable[[Any, str], bool] | None = field(default=None, compare=False)
    groups: tuple[tuple[str, ...], ...] = ()
    on_unquantizable: str = "float"
    recompute_quantized_weights: bool = True
    leaf_modules: tuple[Any, ...] = ()
    concrete_args: Mapping[str, Any] | None = field(default=None, compare=False)
    reg_strength: float = 5e-5
    prune_threshold: float = 0.3
    prune_interval: int = 10
    target_compression: float = 8.0
    prune_step_policy: str = "hessian"
    hessian_max_samples: int = 32
    hessian_min_samples: int = 4
    hessian_tol: float = 1e-2
    hessian_batches: int = 1
    hessian_method: str = "auto"
    hessian_chunk_size: int | None = None
    hessian_relative_step: float = 1e-3
    hessian_frozen_kinks: bool = True
    hessian_model_mode: str = "eval"
    seed: int = 0

    def __post_init__(self) -> None:
        # Normalise sequences to tuples so the frozen config is hashable-ish and compares by value.
        object.__setattr__(self, "exclude", tuple(self.exclude))
        object.__setattr__(self, "groups", tuple(tuple(g) for g in self.groups))
        object.__setattr__(self, "leaf_modules", tuple(self.leaf_modules))
        self._validate()

    def _validate(self) -> None:
        _require(_is_int(self.init_bits) and 2 <= self.init_bits <= 8, "init_bits", self.init_bits,
                 "an integer in 2..8 (weights are stored in int8 containers)")
        _require(_is_int(self.min_bits) and 1 <= self.min_bits <= self.init_bits, "min_bits",
                 self.min_bits, f"an integer in 1..init_bits ({self.init_bits})")
        _require(self.act_bits is None or (_is_int(self.act_bits) and 2 <= self.act_bits <= 16),
                 "act_bits", self.act_bits, "None (float activations) or an integer in 2..16")
        _require(self.grid in GRIDS, "grid", self.grid, f"one of {GRIDS}")
        _require(self.first_last in FIRST_LAST_POLICIES, "first_last", self.first_last,
                 f"one of {FIRST_LAST_POLICIES}")
        _require(self.on_unquantizable in UNQUANTIZABLE_POLICIES, "on_unquantizable",
                 self.on_unquantizable, f"one of {UNQUANTIZABLE_POLICIES}")
        for pattern in self.exclude + tuple(p for g in self.groups for p in g):
            _require(isinstance(pattern, str) and _compiles(pattern), "exclude/groups", pattern,
                     "valid regular expressions (str)")
        _require(all(len(g) >= 1 for g in self.groups), "groups", self.groups,
                 "a tuple of non-empty tuples of FQN regexes")
        _require(self.filter_fn is None or callable(self.filter_fn), "filter_fn", self.filter_fn,
                 "None or a callable filter_fn(module, fqn) -> bool")
        _require(_is_number(self.reg_strength) and self.reg_strength >= 0, "reg_strength",
                 self.reg_strength, "a number >= 0 (lambda)")
        _require(_is_number(self.prune_threshold) and 0 < self.prune_threshold <= 1,
                 "prune_threshold", self.prune_threshold, "a number in (0, 1] (alpha)")
        _require(_is_int(self.prune_interval) and self.prune_interval >= 1, "prune_interval",
                 self.prune_interval, "an integer >= 1 (epochs between prunes)")
        _require(_is_number(self.target_compression) and self.target_compression > 1,
                 "target_compression", self.target_compression,
                 f"a number > 1 (32 / average bits; at most {32 / self.min_bits:g} with min_bits="
                 f"{self.min_bits})")
        _require(self.target_compression <= 32 / self.min_bits, "target_compression",
                 self.target_compression,
                 f"reachable: at most 32/min_bits = {32 / self.min_bits:g}; lower min_bits or the target")
        _require(self.prune_step_policy in PRUNE_STEP_POLICIES, "prune_step_policy",
                 self.prune_step_policy, f"one of {PRUNE_STEP_POLICIES}")
        _require(_is_int(self.hessian_min_samples) and self.hessian_min_samples >= 1,
                 "hessian_min_samples", self.hessian_min_samples, "an integer >= 1")
        _require(_is_int(self.hessian_max_samples)
                 and self.hessian_max_samples >= self.hessian_min_samples,
                 "hessian_max_samples", self.hessian_max_samples,
                 f"an integer >= hessian_min_samples ({self.hessian_min_samples})")
        _require(_is_number(self.hessian_tol) and self.hessian_tol > 0, "hessian_tol",
                 self.hessian_tol, "a number > 0")
        _require(_is_int(self.hessian_batches) and self.hessian_batches >= 1, "hessian_batches",
                 self.hessian_batches, "an integer >= 1")
        _require(self.hessian_method in HESSIAN_METHODS, "hessian_method", self.hessian_method,
                 f"one of {HESSIAN_METHODS}")
        _require(self.hessian_chunk_size is None
                 or (_is_int(self.hessian_chunk_size) and self.hessian_chunk_size >= 1),
                 "hessian_chunk_size", self.hessian_chunk_size,
                 "None (whole batches) or an integer >= 1 (samples per chunk)")
        _require(_is_number(self.hessian_relative_step) and 0 < self.hessian_relative_step < 1,
                 "hessian_relative_step", self.hessian_relative_step, "a number in (0, 1)")
        _require(isinstance(self.recompute_quantized_weights, bool),
                 "recompute_quantized_weights", self.recompute_quantized_weights, "True or False")
        _require(isinstance(self.hessian_frozen_kinks, bool), "hessian_frozen_kinks",
                 self.hessian_frozen_kinks, "True or False")
        _require(self.hessian_model_mode in HESSIAN_MODEL_MODES, "hessian_model_mode",
                 self.hessian_model_mode, f"one of {HESSIAN_MODEL_MODES}")
        _require(_is_int(self.seed), "seed", self.seed, "an integer")

    def replace(self, **changes: Any) -> "MSQConfig":
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-able); callables and classes are left out."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)
                if f.name not in _RUNTIME_ONLY}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MSQConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"MSQConfig.from_dict: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(data))


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


def _require(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise ValueError(f"MSQConfig.{name}={value!r} is invalid: expected {expected}.")
