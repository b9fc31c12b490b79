"""The peers of ``--peers``: other ways to train the same model with quantized weights, built from
the same float weights and timed and measured in the same run as float and MSQ (same batch,
same SGD with momentum, same task loss).

- :data:`TORCH_AO_QAT`: ``torch.ao.quantization.quantize_fx.prepare_qat_fx`` with
  ``get_default_qat_qconfig_mapping("x86")``: conv-batchnorm(-relu) fused into QAT modules,
  per-channel int8 fake-quantized weights and fake-quantized activations with moving-average
  observers.
- :data:`TORCH_AO_W4`: the same FX preparation with a weight-only 4-bit qconfig: a
  ``FakeQuantize`` on every weight (per-tensor symmetric, quant_min -8, quant_max 7) and
  activations left in float (a float ``PlaceholderObserver``, which inserts nothing).
- :data:`BREVITAS_W4`: every ``nn.Conv2d`` / ``nn.Linear`` swapped for Brevitas'
  ``QuantConv2d`` / ``QuantLinear`` with 4-bit weights (its default per-tensor float scale from
  the weights' statistics, straight-through rounding) and float activations, weights copied.
- :data:`BIT_SPLIT`: :mod:`.bit_split`, 8 trainable bit planes and a scale per weight (BSQ /
  CSQ), with BSQ's group lasso as the step's regularizer.

A peer that cannot take the model (FX cannot trace it, say) is left out of the run and reported
with the reason.
"""
from __future__ import annotations

import copy
import functools
import warnings
from typing import Callable

import torch
from torch import Tensor, nn

from .bit_split import PLANES, bit_split, bit_split_layers, group_lasso
from .contenders import Contender, sgd

__all__ = ["TORCH_AO_QAT", "TORCH_AO_W4", "BREVITAS_W4", "BIT_SPLIT", "PEERS", "WEIGHT_BITS",
           "build_peers", "torch_ao_qat", "weight_only_qconfig_mapping", "brevitas_weight_only"]

TORCH_AO_QAT = "torch.ao QAT (x86)"
TORCH_AO_W4 = "torch.ao 4-bit weights"
BREVITAS_W4 = "Brevitas 4-bit weights"
BIT_SPLIT = f"bit-split, {PLANES} planes"
PEERS = (TORCH_AO_QAT, TORCH_AO_W4, BREVITAS_W4, BIT_SPLIT)
#: The weight width of the weight-only peers.
WEIGHT_BITS = 4


def weight_only_qconfig_mapping(bits: int = WEIGHT_BITS):
    """A QConfigMapping that fake-quantizes every weight to ``bits`` bits (per-tensor,
    symmetric) and leaves activations in float."""
    from torch.ao.quantization import (FakeQuantize, MovingAverageMinMaxObserver,
                                       PlaceholderObserver, QConfig, QConfigMapping)

    weight = FakeQuantize.with_args(observer=MovingAverageMinMaxObserver,
                                    quant_min=-(2 ** (bits - 1)), quant_max=2 ** (bits - 1) - 1,
                                    dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
    activation = PlaceholderObserver.with_args(dtype=torch.float)
    return QConfigMapping().set_global(QConfig(activation=activation, weight=weight))


def torch_ao_qat(model: nn.Module, example: Tensor, qconfig_mapping=None) -> nn.Module:
    """``prepare_qat_fx`` on a copy of ``model`` in train mode; ``qconfig_mapping`` defaults to
    ``get_default_qat_qconfig_mapping("x86")``."""
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    if qconfig_mapping is None:
        qconfig_mapping = get_default_qat_qconfig_mapping("x86")
    with warnings.catch_warnings():
        # torch.ao.quantization announces its move to torchao on every call.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*reduce_range will be deprecated.*")
        return prepare_qat_fx(copy.deepcopy(model).train(), qconfig_mapping, (example,))


def brevitas_weight_only(model: nn.Module, bits: int = WEIGHT_BITS) -> nn.Module:
    """A copy of ``model`` with every ``nn.Conv2d`` / ``nn.Linear`` replaced by Brevitas'
    ``QuantConv2d`` / ``QuantLinear`` with ``bits``-bit weights and float activations."""
    from brevitas.nn import QuantConv2d, QuantLinear

    def quantized(layer: nn.Module) -> nn.Module | None:
        if type(layer) is nn.Conv2d:
            return QuantConv2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                               stride=layer.stride, padding=layer.padding,
                               dilation=layer.dilation, groups=layer.groups,
                               padding_mode=layer.padding_mode, bias=layer.bias is not None,
                               weight_bit_width=bits)
        if type(layer) is nn.Linear:
            return QuantLinear(layer.in_features, layer.out_features,
                               bias=layer.bias is not None, weight_bit_width=bits)
        return None

    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            swapped = quantized(child)
            if swapped is None:
                continue
            with torch.no_grad():
                swapped.weight.copy_(child.weight)
                if child.bias is not None:
                    swapped.bias.copy_(child.bias)
            setattr(parent, name, swapped.to(child.weight.device).train(child.training))
    return model


def _bit_split_contender(name: str, model: nn.Module, autocast) -> Contender:
    split = bit_split(model)
    return Contender(name, split, sgd(split),
                     functools.partial(group_lasso, bit_split_layers(split)), autocast)


def build_peers(float_model: nn.Module, example: Tensor,
                autocast: torch.dtype | None = None) -> tuple[list[Contender], dict[str, str]]:
    """The peers built from ``float_model`` (not changed), each with its own SGD, and the
    ones that could not be built, with the reason."""
    builders: dict[str, Callable[[], nn.Module]] = {
        TORCH_AO_QAT: lambda: torch_ao_qat(float_model, example[:2]),
        TORCH_AO_W4: lambda: torch_ao_qat(float_model, example[:2],
                                          weight_only_qconfig_mapping()),
        BREVITAS_W4: lambda: brevitas_weight_only(float_model),
    }
    peers, skipped = [], {}
    for name, build in builders.items():
        try:
            model = build().train()
        except Exception as error:  # a model FX cannot trace, a layer a peer refuses
            skipped[name] = f"{type(error).__name__}: {error}".splitlines()[0]
            continue
        peers.append(Contender(name, model, sgd(model), autocast=autocast))
    peers.append(_bit_split_contender(BIT_SPLIT, float_model, autocast))
    return peers, skipped
