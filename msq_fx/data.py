"""Small in-memory datasets: the npz archives of ../shared/data and a generated default."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

__all__ = ["TensorDataset", "random_crop_flip", "random_erase", "load_npz",
           "synthetic_patterns"]


@dataclass(frozen=True)
class TensorDataset:
    """Images (N, C, H, W) float32, normalized, and int64 labels (N,)."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, count: int) -> "TensorDataset":
        return TensorDataset(self.images[:count], self.labels[:count])

    def split(self, count: int) -> tuple["TensorDataset", "TensorDataset"]:
        """The first ``count`` samples and the rest."""
        return (TensorDataset(self.images[:count], self.labels[:count]),
                TensorDataset(self.images[count:], self.labels[count:]))

    def batches(self, batch_size: int, shuffle: bool = False,
                generator: torch.Generator | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        order = (torch.randperm(len(self), generator=generator) if shuffle
                 else torch.arange(len(self)))
        for start in range(0, len(self), batch_size):
            index = order[start:start + batch_size]
            yield self.images[index], self.labels[index]


def random_crop_flip(images: Tensor, generator: torch.Generator | None = None,
                     padding: int = 4) -> Tensor:
    """The standard CIFAR augmentation, on a whole batch at once: zero-pad by ``padding``,
    crop back to the original size at a random offset, and mirror half the images.

    ``images`` is (N, C, H, W); the result is a new tensor of the same shape. Zero is the
    dataset mean after ``load_npz``'s standardization, so the padding adds no bright border.
    """
    count, _, height, width = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    top = torch.randint(2 * padding + 1, (count, 1), generator=generator)
    left = torch.randint(2 * padding + 1, (count, 1), generator=generator)
    flip = torch.rand(count, 1, generator=generator) < 0.5
    columns = torch.arange(width).expand(count, width)
    columns = left + torch.where(flip, width - 1 - columns, columns)
    rows = top + torch.arange(height)
    samples = torch.arange(count)[:, None, None]
    # Advanced indexing puts the sample, row and column axes first and the channels last.
    crops = padded.permute(0, 2, 3, 1)[samples, rows[:, :, None], columns[:, None, :]]
    return crops.permute(0, 3, 1, 2).contiguous()


def random_erase(images: Tensor, generator: torch.Generator | None = None,
                 probability: float = 0.5, area: tuple[float, float] = (0.02, 0.4),
                 aspect: tuple[float, float] = (0.3, 1 / 0.3)) -> Tensor:
    """Random erasing (Zhong et al., 2020) on a whole batch at once: each image, with
    ``probability``, has one rectangle set to zero, the dataset mean after ``load_npz``'s
    standardization (the paper also fills with noise; the mean keeps the image statistics).

    The rectangle covers a fraction of the image drawn uniformly from ``area``, with a height to
    width ratio drawn log-uniformly from ``aspect``; a side longer than the image is cut to the
    image (the paper draws again), so a rectangle never leaves the image. ``images`` is
    (N, C, H, W); the result is a new tensor of the same shape.
    """
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"random_erase: probability must be in [0, 1], got {probability}")
    if not 0.0 < area[0] <= area[1] <= 1.0 or not 0.0 < aspect[0] <= aspect[1]:
        raise ValueError(f"random_erase: area must satisfy 0 < low <= high <= 1 and aspect "
                         f"0 < low <= high; got area {area}, aspect {aspect}")
    count, _, height, width = images.shape
    erased = torch.rand(count, generator=generator) < probability
    fraction = area[0] + (area[1] - area[0]) * torch.rand(count, generator=generator)
    log_low, log_high = torch.tensor(aspect).log()
    ratio = (log_low + (log_high - log_low) * torch.rand(count, generator=generator)).exp()
    pixels = fraction * height * width
    box_height = (pixels * ratio).sqrt().round().clamp(1, height).long()
    box_width = (pixels / ratio).sqrt().round().clamp(1, width).long()
    top = (torch.rand(count, generator=generator) * (height - box_height + 1)).long()
    left = (torch.rand(count, generator=generator) * (width - box_width + 1)).long()
    rows = torch.arange(height)[None, :]
    columns = torch.arange(width)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < (top + box_height)[:, None])
    in_columns = (columns >= left[:, None]) & (columns < (left + box_width)[:, None])
    mask = in_rows[:, :, None] & in_columns[:, None, :] & erased[:, None, None]
    return images.masked_fill(mask[:, None], 0.0)


def load_npz(path: str | Path, split: str = "train") -> TensorDataset:
    """Load ``x_<split>``/``y_<split>`` from an npz of uint8 HWC (or HW) images, standardized."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such dataset file (see ../shared/data/README.md)")
    with np.load(path) as archive:
        images = archive[f"x_{split}"].astype(np.float32) / 255.0
        labels = archive[f"y_{split}"].astype(np.int64)
    if images.ndim == 3:
        images = images[:, None]
    else:
        images = images.transpose(0, 3, 1, 2)
    mean = images.mean(axis=(0, 2, 3), keepdims=True)
    std = images.std(axis=(0, 2, 3), keepdims=True)
    return TensorDataset(torch.from_numpy((images - mean) / std), torch.from_numpy(labels))


def synthetic_patterns(count: int, classes: int = 10, size: int = 16, seed: int = 0,
                       noise: float = 0.6) -> TensorDataset:
    """A generated image classification task needing no download.

    Each class is a fixed random smooth template (a sum of oriented sinusoids); a sample is its
    class template, randomly shifted by up to 2 pixels, plus Gaussian noise. Small CNNs learn it
    to high accuracy in a few epochs, so it exercises MSQ end to end in seconds.
    """
    generator = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(torch.arange(size), torch.arange(size),
                                      indexing="ij")).float()
    templates = []
    for _ in range(classes):
        freq = torch.rand(3, 2, generator=generator) * 0.8 + 0.2
        phase = torch.rand(3, generator=generator) * 6.283
        waves = torch.sin(torch.einsum("kd,dhw->khw", freq, grid) + phase[:, None, None])
        templates.append(waves.sum(0) / 3)
    templates = torch.stack(templates)
    labels = torch.randint(classes, (count,), generator=generator)
    shifts = torch.randint(-2, 3, (count, 2), generator=generator)
    images = torch.stack([torch.roll(templates[c], tuple(s.tolist()), dims=(0, 1))
                          for c, s in zip(labels, shifts)])
    images = images + noise * torch.randn(images.shape, generator=generator)
    return TensorDataset(images[:, None].contiguous(), labels)
