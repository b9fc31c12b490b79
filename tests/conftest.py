"""Shared test fixtures and helpers."""
from __future__ import annotations

import torch
from torch import nn

import msq_fx


def expected_weight_names(model: nn.Module) -> set[str]:
    """Every conv / linear / attention weight FQN, found independently of msq_fx's discover pass."""
    names = set()
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            names.add(prefix + "weight")
        if isinstance(module, nn.MultiheadAttention):
            for attr in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
                if getattr(module, attr, None) is not None:
                    names.add(prefix + attr)
    return names


def reported_names(model: nn.Module) -> set[str]:
    rows = msq_fx.report(model).layers
    return {row.name for row in rows} | {n for row in rows for n in row.shared_with}


def eval_output(model: nn.Module, inputs) -> torch.Tensor:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
    model.train(was_training)
    return out
