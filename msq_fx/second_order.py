"""Make a model's forward twice differentiable for Hessian-vector products.

A few CPU kernels have a backward with no derivative of its own, so the double backward of a
Hessian-vector product fails on them: the fused scaled-dot-product-attention kernels (what
``nn.MultiheadAttention`` and most vision transformers run) and ``hardsigmoid`` (MobileNetV3's
squeeze-excitation gates). Inside ``twice_differentiable()`` attention runs on the math backend
and ``hardsigmoid`` on an equivalent clamp; both give the same values and first derivatives, and
build graphs of ops whose own derivatives exist.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

__all__ = ["twice_differentiable", "hardsigmoid_by_clamp", "FrozenKinks"]


def hardsigmoid_by_clamp(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``relu6(x + 3) / 6`` with clamp, whose backward is itself differentiable.

    Always out of place: an in-place write would break the graph being differentiated, and
    callers use the returned tensor.
    """
    return torch.clamp(x + 3.0, 0.0, 6.0) / 6.0


class _TwiceDifferentiableOps(TorchFunctionMode):
    """Routes the functions whose backward has no derivative to equivalent composites."""

    _REPLACEMENTS = {F.hardsigmoid: hardsigmoid_by_clamp}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        replacement = self._REPLACEMENTS.get(func)
        if replacement is not None:
            return replacement(*args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def twice_differentiable() -> Iterator[None]:
    """Run the forward inside this context when its graph will be differentiated twice."""
    with sdpa_kernel([SDPBackend.MATH]), _TwiceDifferentiableOps():
        yield


# --------------------------------------------------------------------------- frozen kinks

class FrozenKinks:
    """Which side of its kink every unit of a piecewise-linear op is on, recorded once and replayed.

    A finite difference of gradients across a ReLU's kink measures the jump of the gradient
    there, while the double backward, to which a ReLU has zero second derivative, does not see
    it; on ReLU networks that made the two differ severalfold. Replaying the pattern recorded at
    the undisplaced point makes each displaced forward the network with its activation pattern
    held fixed: the same value and gradient at the point, and the second derivative the double
    backward computes. Covered: relu (every spelling), hardtanh / relu6, leaky_relu, threshold,
    hardswish, hardsigmoid, and max pooling, adaptive or not (the argmax positions); other ops
    run as they are. ``torch.clamp`` is left out on purpose: models use it on norms'
    denominators, where the kink is never reached, and the quantizers use it on weight-sized
    tensors, where a pattern would cost a quarter of a weight copy per call.

    Usage: ``with kinks.recording(key): loss_fn()`` once at the point, then
    ``with kinks.replaying(key): loss_fn()`` at displaced points; ``key`` names one loss
    (a piece of a split loss has its own pattern).
    """

    def __init__(self) -> None:
        self._patterns: dict[object, list] = {}

    @contextlib.contextmanager
    def recording(self, key: object) -> Iterator[None]:
        patterns: list = []
        with _KinkMode(patterns, record=True):
            yield
        self._patterns[key] = patterns

    @contextlib.contextmanager
    def replaying(self, key: object) -> Iterator[None]:
        patterns = self._patterns[key]
        mode = _KinkMode(patterns, record=False)
        with mode:
            yield
        if mode.position != len(patterns):
            raise RuntimeError(
                f"the forward made {mode.position} piecewise-linear calls where the recorded pass "
                f"made {len(patterns)}: its control flow depends on the weights' values, so the "
                f"activation pattern cannot be held fixed for the finite difference")


class _KinkMode(TorchFunctionMode):
    def __init__(self, patterns: list, record: bool) -> None:
        super().__init__()
        self.patterns = patterns
        self.record = record
        self.position = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rule = _KINK_RULES.get(func)
        if rule is None:
            return func(*args, **kwargs)
        if self.record:
            output, pattern = rule.record(func, args, kwargs)
            self.patterns.append(pattern)
            return output
        if self.position >= len(self.patterns):
            raise RuntimeError(
                f"{getattr(func, '__name__', func)}: more piecewise-linear calls than the recorded "
                f"pass made ({len(self.patterns)}); the activation pattern cannot be replayed")
        pattern = self.patterns[self.position]
        self.position += 1
        return rule.replay(func, args, kwargs, pattern)


def _arguments(func, args, kwargs) -> dict:
    """``func``'s arguments by name, defaults filled in, the input first."""
    bound = inspect.signature(func).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _input(arguments: dict) -> torch.Tensor:
    return next(iter(arguments.values()))


def _checked(func, pattern: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if pattern.shape != x.shape:
        raise RuntimeError(
            f"{getattr(func, '__name__', func)}: input of shape {tuple(x.shape)} where the "
            f"recorded pass had {tuple(pattern.shape)}; the activation pattern cannot be replayed")
    return pattern


def _applied(formula, x: torch.Tensor, inplace: bool, *options) -> torch.Tensor:
    """``formula(x, *options)``, written into ``x`` for an in-place op.

    The formula reads a copy then: its backward needs the input, which the write overwrites.
    """
    if not inplace:
        return formula(x, *options)
    return x.copy_(formula(x.clone(), *options))


class _Relu:
    """relu in all its spellings: the pattern is x > 0."""

    inplace_funcs = (torch.relu_, torch.Tensor.relu_)

    def record(self, func, args, kwargs):
        x = args[0]
        pattern = x.detach() > 0
        return func(*args, **kwargs), pattern

    def replay(self, func, args, kwargs, pattern):
        x = args[0]
        inplace = func in self.inplace_funcs or bool(kwargs.get("inplace", False)) or (
            len(args) > 1 and bool(args[1]))
        pattern = _checked(func, pattern, x)
        return x.mul_(pattern) if inplace else x * pattern


class _Regions:
    """Ops that are smooth between breakpoints: region 0 below, 1 between, 2 above."""

    def __init__(self, bounds, formula) -> None:
        self.bounds = bounds  # (bound arguments) -> (low, high)
        self.formula = formula  # (x, region, low, high) -> output

    def record(self, func, args, kwargs):
        arguments = _arguments(func, args, kwargs)
        low, high = self.bounds(arguments)
        detached = _input(arguments).detach()
        region = (detached > low).to(torch.int8) + (detached >= high).to(torch.int8)
        return func(*args, **kwargs), region

    def replay(self, func, args, kwargs, region):
        arguments = _arguments(func, args, kwargs)
        low, high = self.bounds(arguments)
        x = _input(arguments)
        region = _checked(func, region, x)
        return _applied(self.formula, x, arguments["inplace"], region, low, high)


def _hardtanh_bounds(arguments):
    return float(arguments["min_val"]), float(arguments["max_val"])


def _hardtanh(x, region, low, high):
    return torch.where(region == 1, x, torch.where(region == 0, x * 0 + low, x * 0 + high))


def _hardswish(x, region, low, high):
    return torch.where(region == 1, x * (x + 3.0) / 6.0, torch.where(region == 0, x * 0, x))


def _hardsigmoid(x, region, low, high):
    return torch.where(region == 1, (x + 3.0) / 6.0, torch.where(region == 0, x * 0, x * 0 + 1.0))


class _LeakyRelu:
    def record(self, func, args, kwargs):
        pattern = _input(_arguments(func, args, kwargs)).detach() > 0
        return func(*args, **kwargs), pattern

    def replay(self, func, args, kwargs, pattern):
        arguments = _arguments(func, args, kwargs)
        x = _input(arguments)
        pattern = _checked(func, pattern, x)
        return _applied(_leaky, x, arguments["inplace"], pattern,
                        float(arguments["negative_slope"]))


def _leaky(x, pattern, slope):
    return torch.where(pattern, x, x * slope)


class _Threshold:
    """``F.threshold``: x where x > threshold, else a constant; the pattern is x > threshold."""

    def record(self, func, args, kwargs):
        arguments = _arguments(func, args, kwargs)
        pattern = _input(arguments).detach() > float(arguments["threshold"])
        return func(*args, **kwargs), pattern

    def replay(self, func, args, kwargs, pattern):
        arguments = _arguments(func, args, kwargs)
        x = _input(arguments)
        pattern = _checked(func, pattern, x)
        return _applied(_thresholded, x, arguments["inplace"], pattern, float(arguments["value"]))


def _thresholded(x, pattern, value):
    return torch.where(pattern, x, x * 0 + value)


class _MaxPool:
    """Max pooling, adaptive or not: the pattern is the argmax of every window."""

    def __init__(self, with_indices, spatial_dims: int) -> None:
        self.with_indices = with_indices
        self.spatial_dims = spatial_dims

    def record(self, func, args, kwargs):
        arguments = _arguments(self.with_indices, args, kwargs)
        wanted = bool(arguments.pop("return_indices"))
        output, indices = self.with_indices(**arguments, return_indices=True)
        return ((output, indices) if wanted else output), indices

    def replay(self, func, args, kwargs, indices):
        arguments = _arguments(self.with_indices, args, kwargs)
        x = arguments["input"]
        leading = x.dim() - self.spatial_dims  # (N, C) or, unbatched, (C,)
        if x.shape[:leading] != indices.shape[:leading]:
            _checked(func, indices, x)  # raises with both shapes
        # indices number the positions of each flattened spatial plane.
        output = x.flatten(leading).gather(leading, indices.flatten(leading)).view(indices.shape)
        return (output, indices) if arguments["return_indices"] else output


_RELU = _Relu()
_KINK_RULES = {
    F.relu: _RELU, torch.relu: _RELU, torch.relu_: _RELU, torch.Tensor.relu: _RELU,
    torch.Tensor.relu_: _RELU,
    F.hardtanh: _Regions(_hardtanh_bounds, _hardtanh),
    F.relu6: _Regions(lambda arguments: (0.0, 6.0), _hardtanh),
    F.hardswish: _Regions(lambda arguments: (-3.0, 3.0), _hardswish),
    F.hardsigmoid: _Regions(lambda arguments: (-3.0, 3.0), _hardsigmoid),
    F.leaky_relu: _LeakyRelu(),
    F.threshold: _Threshold(),
}
for _dims, _pool, _with_indices in ((1, F.max_pool1d, F.max_pool1d_with_indices),
                                    (2, F.max_pool2d, F.max_pool2d_with_indices),
                                    (3, F.max_pool3d, F.max_pool3d_with_indices)):
    _KINK_RULES[_pool] = _KINK_RULES[_with_indices] = _MaxPool(_with_indices, _dims)
for _dims, _pool, _with_indices in (
        (1, F.adaptive_max_pool1d, F.adaptive_max_pool1d_with_indices),
        (2, F.adaptive_max_pool2d, F.adaptive_max_pool2d_with_indices),
        (3, F.adaptive_max_pool3d, F.adaptive_max_pool3d_with_indices)):
    _KINK_RULES[_pool] = _KINK_RULES[_with_indices] = _MaxPool(_with_indices, _dims)
