"""Specification: an 8-bit prepared model, before any quantization-aware training, classifies as
the float model does.

A small CNN is trained here (seeded, a few seconds) on generated images whose class is the
argmax of fixed smooth random projections of the image. Prepared at 8 bits on every grid and
with every kind of scale, and evaluated without training, its accuracy on a held-out generated
set is within 0.3 percentage points of the float model's.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import msq_fx
from msq_fx import quant

CLASSES = 6
SIDE = 12
TRAIN_SAMPLES = 4000
TEST_SAMPLES = 4000
TOLERANCE_POINTS = 0.3


class ConvNet(nn.Module):
    """Conv-BN-ReLU-pool x2 and a linear head on the flattened 3x3 maps."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten())
        self.head = nn.Linear(16 * 3 * 3, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def generated(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise images labelled by the largest of CLASSES fixed smooth projections (the same
    projections for every set)."""
    patterns = F.interpolate(torch.randn(CLASSES, 1, 3, 3,
                                         generator=torch.Generator().manual_seed(0)),
                             size=(SIDE, SIDE), mode="bilinear", align_corners=False)
    images = torch.randn(count, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))
    labels = (images.flatten(1) @ patterns.flatten(1).T).argmax(1)
    return images, labels


def accuracy(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Percentage of correct predictions, in eval mode."""
    images, labels = data
    model.eval()
    with torch.no_grad():
        predictions = torch.cat([model(chunk).argmax(1) for chunk in images.split(1000)])
    return 100.0 * float((predictions == labels).double().mean())


@pytest.fixture(scope="module")
def trained(one_torch_thread):
    """(float model, held-out set, its float accuracy): trained to well above chance."""
    torch.manual_seed(0)
    model = ConvNet()
    images, labels = generated(TRAIN_SAMPLES, seed=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    order = torch.Generator().manual_seed(2)
    model.train()
    for _ in range(8):
        for batch in torch.randperm(TRAIN_SAMPLES, generator=order).split(64):
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    held_out = generated(TEST_SAMPLES, seed=3)
    return model.eval(), held_out, accuracy(model, held_out)


def test_the_float_model_is_clearly_above_chance(trained):
    _, _, float_accuracy = trained
    assert float_accuracy > 2 * 100.0 / CLASSES, f"float accuracy {float_accuracy:.2f}%"


@pytest.mark.parametrize("scale", quant.SCALE_MODES)
@pytest.mark.parametrize("grid", quant.GRIDS)
def test_8_bit_prepared_model_without_training_matches_float_accuracy(trained, grid, scale):
    model, held_out, float_accuracy = trained
    qmodel = msq_fx.prepare(copy.deepcopy(model), held_out[0][:2], msq_fx.MSQConfig(
        quantization={"init_bits": 8, "grid": grid, "scale": scale}))
    quantized_accuracy = accuracy(qmodel, held_out)
    assert abs(quantized_accuracy - float_accuracy) <= TOLERANCE_POINTS, (
        f"grid={grid}, scale={scale}: 8-bit {quantized_accuracy:.2f}% vs float "
        f"{float_accuracy:.2f}% on {TEST_SAMPLES} held-out samples")
