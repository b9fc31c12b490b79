"""Specification of msq_fx.data's batch augmentation (random crop with padding, mirror)."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from msq_fx.data import random_crop_flip


def images(count: int = 8, channels: int = 3, size: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, channels, size, size, generator=torch.Generator().manual_seed(seed))


def windows(image: torch.Tensor, padding: int) -> list[torch.Tensor]:
    """Every crop of ``image``'s zero-padded copy, and its mirror image."""
    size = image.shape[-1]
    padded = torch.nn.functional.pad(image, (padding,) * 4)
    crops = [padded[:, top:top + size, left:left + size]
             for top in range(2 * padding + 1) for left in range(2 * padding + 1)]
    return crops + [crop.flip(-1) for crop in crops]


@settings(max_examples=30, deadline=None)
@given(padding=st.integers(0, 3), seed=st.integers(0, 2**31 - 1))
def test_each_output_is_a_window_of_the_padded_image_or_its_mirror(padding, seed):
    batch = images(count=4, seed=seed % 1000)
    out = random_crop_flip(batch, torch.Generator().manual_seed(seed), padding=padding)
    assert out.shape == batch.shape
    for image, crop in zip(batch, out):
        assert any(torch.equal(crop, window) for window in windows(image, padding))


def test_without_padding_an_image_is_kept_or_mirrored():
    batch = images(count=64)
    out = random_crop_flip(batch, torch.Generator().manual_seed(1), padding=0)
    mirrored = [torch.equal(crop, image.flip(-1)) for image, crop in zip(batch, out)]
    kept = [torch.equal(crop, image) for image, crop in zip(batch, out)]
    assert all(m or k for m, k in zip(mirrored, kept))
    assert 16 < sum(mirrored) < 48


def test_the_same_generator_seed_gives_the_same_batch():
    batch = images()
    first = random_crop_flip(batch, torch.Generator().manual_seed(5))
    second = random_crop_flip(batch, torch.Generator().manual_seed(5))
    assert torch.equal(first, second)


def test_the_input_batch_is_left_unchanged():
    batch = images()
    before = batch.clone()
    random_crop_flip(batch, torch.Generator().manual_seed(5))
    assert torch.equal(batch, before)
