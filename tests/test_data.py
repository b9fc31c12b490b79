"""Specification of msq_fx.data's batch augmentation (random crop with padding, mirror;
random erasing)."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pytest

from msq_fx.data import random_crop_flip, random_erase


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


def erased_pixels(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """(N, H, W): where any channel changed."""
    return (before != after).any(dim=1)


@settings(max_examples=40, deadline=None)
@given(size=st.integers(4, 12), seed=st.integers(0, 2**31 - 1))
def test_an_erased_image_differs_in_one_zeroed_rectangle_and_nowhere_else(size, seed):
    batch = images(count=6, size=size, seed=seed % 1000)
    out = random_erase(batch, torch.Generator().manual_seed(seed), probability=1.0)
    for image, changed, result in zip(batch, erased_pixels(batch, out), out):
        rows = changed.any(dim=1).nonzero().flatten()
        columns = changed.any(dim=0).nonzero().flatten()
        box = (slice(rows.min(), rows.max() + 1), slice(columns.min(), columns.max() + 1))
        assert changed[box].all()
        assert changed.sum() == changed[box].numel()
        assert (result[:, box[0], box[1]] == 0).all()


def test_the_rectangles_cover_the_area_range_asked_for():
    batch = images(count=2000, size=32)
    out = random_erase(batch, torch.Generator().manual_seed(2), probability=1.0,
                       area=(0.1, 0.2))
    covered = erased_pixels(batch, out).flatten(1).float().mean(dim=1)
    # Sides are whole pixels, so a fraction misses its draw by at most about a row and a column.
    assert covered.min() > 0.1 - 2 * 32 / 32**2 and covered.max() < 0.2 + 2 * 32 / 32**2
    assert covered.mean() == pytest.approx(0.15, abs=0.01)


def test_about_the_probability_asked_for_of_the_images_is_erased():
    batch = images(count=2000, size=8)
    out = random_erase(batch, torch.Generator().manual_seed(3), probability=0.25)
    erased = erased_pixels(batch, out).flatten(1).any(dim=1).float().mean()
    assert 0.2 < erased < 0.3


def test_erasing_with_the_same_generator_seed_gives_the_same_batch_and_keeps_the_input():
    batch = images()
    before = batch.clone()
    first = random_erase(batch, torch.Generator().manual_seed(5), probability=1.0)
    second = random_erase(batch, torch.Generator().manual_seed(5), probability=1.0)
    assert torch.equal(first, second)
    assert torch.equal(batch, before)


@pytest.mark.parametrize("settings_given", [dict(probability=1.5), dict(area=(0.5, 0.2)),
                                            dict(aspect=(0.0, 1.0))])
def test_erasing_settings_out_of_range_are_refused_by_name(settings_given):
    with pytest.raises(ValueError, match="random_erase"):
        random_erase(images(), **settings_given)
