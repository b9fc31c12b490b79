"""The bit-split baseline of ``--peers``: every conv and linear weight held as ``n`` trainable bit
planes and a trainable scale, the representation of BSQ (Yang et al., ICLR 2021) and CSQ (Xiao
et al., ICCV 2023) that MSQ's one latent weight per tensor replaces.

A weight of shape ``s`` becomes a Parameter ``weight_planes`` of shape ``(n, *s)``, each plane
continuous in [0, 1] where it is used, and a scalar Parameter ``weight_scale``. The forward
builds the weight as

    code = sum_i 2^i * round(clamp(plane_i, 0, 1))        (rounding straight-through)
    w    = scale * (code - 2^(n-1)) / 2^(n-1)

(the signed two's-complement grid MSQ's nested grid uses), so the model trains ``n`` times the
weights' parameters, with ``n`` times their gradients and optimizer state. The planes start at
the bits of the float weight's ``n``-bit code and the scale at max|w|. The bit-level group lasso
of BSQ (lambda times the sum over layers and planes of the plane's L2 norm) is the step's
regularizer.

A cost baseline for the benchmark, not part of msq_fx's API.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ..modules import _RoundSTE  # round in the forward, the gradient passed straight through

__all__ = ["PLANES", "REG_STRENGTH", "bit_split", "bit_split_layers", "group_lasso"]

#: Bit planes per weight (BSQ and CSQ start from 8-bit weights).
PLANES = 8
#: The group lasso's strength: MSQ's default LSB-penalty strength.
REG_STRENGTH = 5e-5


class _BitSplitWeight:
    """The forward pre-hook that builds ``module.weight`` from its planes and scale."""

    def __init__(self, planes: int) -> None:
        powers = torch.pow(2.0, torch.arange(planes, dtype=torch.float64))
        self.powers = powers.float()
        self.half = float(2 ** (planes - 1))

    def __call__(self, module: nn.Module, _inputs: tuple) -> None:
        planes = module.weight_planes
        bits = _RoundSTE.apply(planes.clamp(0.0, 1.0))
        powers = self.powers.to(planes.device, planes.dtype)
        code = torch.tensordot(powers, bits, dims=1)
        module.weight = (code - self.half) * (module.weight_scale / self.half)


def _split(module: nn.Module, planes: int) -> None:
    weight = module._parameters.pop("weight").detach()
    scale = weight.abs().max().clamp_min(torch.finfo(weight.dtype).tiny)
    half = float(2 ** (planes - 1))
    code = torch.round(weight / scale * half + half).clamp_(0, 2**planes - 1).to(torch.int64)
    bits = torch.stack([(code >> i) & 1 for i in range(planes)]).to(weight.dtype)
    module.weight_planes = nn.Parameter(bits)
    module.weight_scale = nn.Parameter(scale)
    # ``weight`` exists only during the module's forward (the graph keeps what backward needs).
    module.register_forward_pre_hook(_BitSplitWeight(planes))
    module.register_forward_hook(_drop_weight, always_call=True)


def _drop_weight(module: nn.Module, _inputs: tuple, _output: object) -> None:
    module.__dict__.pop("weight", None)


def bit_split(model: nn.Module, planes: int = PLANES) -> nn.Module:
    """A copy of ``model`` with every ``nn.Conv2d`` / ``nn.Linear`` weight split into bit
    planes (the module docstring); everything else as it was."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            _split(module, planes)
    return model


def bit_split_layers(model: nn.Module) -> list[nn.Module]:
    """The modules of a :func:`bit_split` model whose weight is split."""
    return [m for m in model.modules() if "weight_planes" in m._parameters]


def group_lasso(layers: list[nn.Module], strength: float = REG_STRENGTH) -> Tensor:
    """BSQ's bit-level group lasso: ``strength`` times the sum of every plane's L2 norm."""
    norms = [torch.linalg.vector_norm(m.weight_planes.flatten(1), dim=1).sum() for m in layers]
    return strength * torch.stack(norms).sum()
