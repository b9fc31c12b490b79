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
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode


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
