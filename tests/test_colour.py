"""The colour stage run per batch equals torchvision's per-sample colour transforms, drawn from the same seeds."""

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate
from torchvision import tv_tensors
from torchvision.transforms import v2

from colour import AUGMENT_LEVELS, BatchColour
from dataset import SegmentationFolder, SkipBadSamples
from intensity import IMAGENET_MEAN, IMAGENET_STD, Normalization


def torchvision_colour(augment: str) -> v2.Compose:
    """The reference, one sample at a time: torchvision's own classes with the settings --augment names."""
    strong = augment == "strong"
    steps = []
    if augment != "none":
        steps = [
            v2.ColorJitter(0.3, 0.3, 0.3, 0.05 if strong else 0.0),
            *([v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, 2.0))], p=0.3)] if strong else []),
        ]
    to_float = v2.ToDtype(torch.float32, scale=True)
    return v2.Compose([to_float, *steps, v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


@pytest.mark.parametrize("augment", ["none", "basic", "strong"])
def test_a_batch_is_coloured_as_torchvision_colours_each_sample(augment):
    reference, colour = torchvision_colour(augment), BatchColour(AUGMENT_LEVELS[augment], Normalization.imagenet())
    generator = torch.Generator().manual_seed(0)
    batch = 12
    pixels = torch.randint(0, 256, (batch, 3, 24, 32), dtype=torch.uint8, generator=generator)
    expected, draws = [], []
    for index in range(batch):
        torch.manual_seed(index)
        expected.append(reference(tv_tensors.Image(pixels[index])))
        torch.manual_seed(index)
        draws.append(colour.draw(3))
    found = colour(pixels, default_collate(draws))
    assert found.dtype == torch.float32 and found.shape == pixels.shape
    torch.testing.assert_close(found, torch.stack(expected).as_subclass(torch.Tensor), atol=2e-5, rtol=0)
    if augment != "none":  # the check can fail: samples are jittered, each its own way
        plain = Normalization.imagenet()(pixels)
        assert all((found[k] - plain[k]).abs().max() > 0.01 for k in range(batch))
    if augment == "strong":  # some samples blurred, some not, and each turned in its own order
        sigmas = default_collate(draws).blur_sigma
        assert (sigmas > 0).any() and (sigmas == 0).any()
        assert len({tuple(d.order.tolist()) for d in draws}) > 1


@pytest.mark.parametrize("augment", ["basic", "strong"])
def test_other_images_get_brightness_and_contrast_per_channel_and_keep_their_pixels(augment):
    colour = BatchColour(AUGMENT_LEVELS[augment], Normalization.none(4), photo=False)
    generator = torch.Generator().manual_seed(1)
    pixels = torch.rand(5, 4, 16, 16, generator=generator)  # float pixels, as 16-bit images are read
    before = pixels.clone()
    torch.manual_seed(0)
    draws = default_collate([colour.draw(4) for _ in range(5)])
    found = colour(pixels, draws)
    assert torch.equal(pixels, before)  # the loader's tensor is left as it was
    values = before.double().numpy()
    sigmas = draws.blur_sigma
    for k in (k for k in range(5) if sigmas[k] == 0):  # x -> b * (m + c * (x - m)), each channel its own b and c
        brightness = draws.channel_brightness[k].numpy()[:, None, None]
        contrast = draws.channel_contrast[k].numpy()[:, None, None]
        mean = values[k].mean(axis=(1, 2), keepdims=True)
        np.testing.assert_allclose(found[k].numpy(), brightness * (mean + contrast * (values[k] - mean)), atol=1e-5)
    assert draws.channel_brightness.std(1).min() > 0.01  # channels drawn apart


def test_the_training_loader_hands_over_uint8_pixels_that_the_colour_stage_finishes_as_the_dataset_does(tiny_demo):
    data = SegmentationFolder(tiny_demo / "images/train", tiny_demo / "masks/train", image_size=32, augment="basic")
    items = SkipBadSamples(data, before_colour=True)
    for index in range(3):
        pixels, mask, draws, skipped = items[(index, index)]
        assert pixels.dtype == torch.uint8 and pixels.shape == (3, 32, 32) and skipped == ""
        image, expected_mask = SkipBadSamples(data)[(index, index)][:2]  # the same seed: the same sample
        assert torch.equal(mask, expected_mask)
        torch.testing.assert_close(data.transform.colour(pixels[None], draws.one())[0], image)
