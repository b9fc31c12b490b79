"""Specification of msq_fx.training's helpers (the loop shared by the demo and the examples)."""

from __future__ import annotations

import torch

import msq_fx
import msq_fx.owners
from conftest import count_calls
from msq_fx.training import accuracy

X = torch.randn(12, 1, 16, 16, generator=torch.Generator().manual_seed(3))
Y = torch.randint(0, 10, (12,), generator=torch.Generator().manual_seed(4))


def prepared_cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    model = msq_fx.SmallCNN(in_channels=1, width=8)
    return msq_fx.prepare(model, X[:2])


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(X[i:i + 4], Y[i:i + 4]) for i in range(0, 12, 4)]


def test_accuracy_is_the_percentage_of_correct_top1_predictions_in_eval_mode():
    qmodel = prepared_cnn()
    with torch.no_grad():
        predictions = qmodel.eval()(X).argmax(1)
    qmodel.train()
    assert accuracy(qmodel, batches()) == 100.0 * float((predictions == Y).sum()) / 12


def test_accuracy_restores_the_training_mode():
    qmodel = prepared_cnn().train()
    accuracy(qmodel, batches())
    assert qmodel.training


def test_accuracy_quantizes_each_weight_once_for_all_batches(monkeypatch):
    qmodel = prepared_cnn()
    weights = len(list(msq_fx.owners.iter_quantized_weights(qmodel)))
    calls = count_calls(monkeypatch, "fake_quantize")
    accuracy(qmodel, batches())
    assert calls[0] == weights
