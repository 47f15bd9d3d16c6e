"""intensity: normalisation against torchvision's, dataset statistics against NumPy on every pixel, their cache, the
display stretch."""

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from torchvision.transforms import v2

import intensity
from errors import DataError
from image_io import ImageReading
from intensity import Normalization, build_normalization, display_rgb


def test_imagenet_normalisation_equals_torchvision_on_uint8_batches():
    batch = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    reference = v2.Compose(
        [v2.ToDtype(torch.float32, scale=True), v2.Normalize(intensity.IMAGENET_MEAN, intensity.IMAGENET_STD)]
    )
    torch.testing.assert_close(Normalization.imagenet()(batch), reference(batch))
    torch.testing.assert_close(Normalization.imagenet()(batch.float() / 255), reference(batch))  # float: as read
    grey = Normalization.imagenet(1)
    assert grey.mean == (pytest.approx(0.449),) and grey.std == (pytest.approx(0.226),)
    with pytest.raises(DataError, match="--normalize imagenet: ImageNet statistics exist for 1 or 3 channels, not 4"):
        Normalization.imagenet(4)


def write_16_bit_set(folder, count=3):
    rng = np.random.default_rng(0)
    stacks = []
    for k in range(count):
        stack = rng.normal([[[800]], [[3000]]], [[[100]], [[700]]], (2, 30, 40)).clip(0, 65535).astype(np.uint16)
        stack[0, 0, :5] = 65535  # hot pixels that percentile clipping keeps from setting the scale
        tifffile.imwrite(folder / f"{k}.tif", stack, photometric="minisblack", planarconfig="separate")
        stacks.append(stack)
    return sorted(folder.glob("*.tif")), stacks


def test_dataset_statistics_of_16_bit_data_equal_numpy_on_every_pixel(tmp_path):
    paths, stacks = write_16_bit_set(tmp_path)
    found = build_normalization("dataset", paths, ImageReading(2), cache_folder=tmp_path)
    values = np.concatenate([s.reshape(2, -1) for s in stacks], axis=1).T / 65535  # every pixel, (N, 2)
    low, high = np.percentile(values, (0.5, 99.5), axis=0)
    clipped = values.clip(low, high)
    assert found.name == "dataset"
    np.testing.assert_allclose(found.low, low, rtol=1e-5)
    np.testing.assert_allclose(found.high, high, rtol=1e-5)
    np.testing.assert_allclose(found.mean, clipped.mean(0), rtol=1e-4)
    np.testing.assert_allclose(found.std, clipped.std(0), rtol=1e-4)
    normalised = found(torch.from_numpy(values.T.reshape(2, 3 * 30, 40).astype(np.float32)))
    torch.testing.assert_close(normalised.mean((1, 2)), torch.zeros(2), atol=1e-3, rtol=0)  # what it is for
    assert normalised.max() <= (high - clipped.mean(0)).max() / clipped.std(0).min() + 1e-3  # hot pixels clipped


def test_dataset_statistics_of_8_bit_images_are_not_clipped(tmp_path):
    grey = np.random.default_rng(1).integers(0, 256, (20, 30), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "g.png")
    found = build_normalization("dataset", [tmp_path / "g.png"], ImageReading(1), cache_folder=tmp_path)
    assert found.low is None and found.high is None
    np.testing.assert_allclose(found.mean, [grey.mean() / 255], rtol=1e-5)
    np.testing.assert_allclose(found.std, [grey.std() / 255], rtol=1e-4)


def test_statistics_are_cached_until_an_image_changes(tmp_path, monkeypatch):
    paths, _ = write_16_bit_set(tmp_path)
    first = build_normalization("dataset", paths, ImageReading(2), cache_folder=tmp_path)
    assert (tmp_path / intensity.STATS_CACHE_NAME).is_file()
    calls = []
    real = intensity.compute_statistics
    monkeypatch.setattr(intensity, "compute_statistics", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert build_normalization("dataset", paths, ImageReading(2), cache_folder=tmp_path) == first and not calls
    tifffile.imwrite(paths[0], np.zeros((2, 30, 40), np.uint16), photometric="minisblack", planarconfig="separate")
    assert build_normalization("dataset", paths, ImageReading(2), cache_folder=tmp_path) != first and calls == [1]


def test_normalisation_round_trips_through_a_dict():
    dataset = Normalization("dataset", (0.1, 0.2), (0.3, 0.4), (0.0, 0.01), (0.9, 0.99))
    assert Normalization.from_dict(dataset.to_dict()) == dataset
    assert Normalization.from_dict(Normalization.imagenet().to_dict()) == Normalization.imagenet()


def test_display_shows_8_bit_photos_as_they_are_and_stretches_everything_else():
    photo = torch.randint(0, 256, (3, 6, 8), dtype=torch.uint8)
    np.testing.assert_array_equal(display_rgb(photo), photo.permute(1, 2, 0).numpy())
    stack = torch.linspace(0, 0.01, 4 * 100 * 100).reshape(4, 100, 100)  # dim 16-bit data: 1% of the range
    shown = display_rgb(stack)
    assert shown.shape == (100, 100, 3) and shown.dtype == np.uint8
    assert shown.min() == 0 and shown.max() == 255  # stretched over the whole display range
    grey = display_rgb(stack, channel=3)
    assert (grey[..., 0] == grey[..., 2]).all() and grey[..., 0].max() == 255
    two = display_rgb(stack[:2])
    assert two[..., 2].max() == 0 and two[..., 1].max() == 255  # two channels: red and green
    with pytest.raises(DataError, match="--display-channel 4: the model's input has channels 0..3"):
        display_rgb(stack, channel=4)
