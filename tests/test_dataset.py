import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dataset
import demo
import labels
from dataset import SegmentationFolder, SkipBadSamples
from errors import BadSampleError, DataError
from labels import IGNORE_INDEX
from loaders import make_weighted_sampler
from transforms import build_transforms


def write_pair(root: Path, stem: str, mask: np.ndarray, image: np.ndarray | None = None) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    if image is None:
        image = np.random.default_rng(len(stem)).integers(0, 255, (*mask.shape, 3), dtype=np.uint8)
    Image.fromarray(image).save(root / "images" / f"{stem}.png")
    Image.fromarray(mask).save(root / "masks" / f"{stem}.png")


def folder(root: Path, **options) -> SegmentationFolder:
    return SegmentationFolder(root / "images", root / "masks", image_size=options.pop("image_size", 16), **options)


def test_non_contiguous_values_map_to_contiguous_classes_and_255_is_ignored(tmp_path):
    mask = np.zeros((16, 16), np.uint8)
    mask[:4] = 7
    mask[4:8] = 42
    mask[8:10] = 255
    write_pair(tmp_path, "a", mask)
    data = folder(tmp_path)
    assert data.mapping.values == [0, 7, 42]
    _, labels = data[0]
    assert labels.dtype == torch.uint8  # class indices and the ignore label fit; widened on the device
    assert labels[:4].eq(1).all() and labels[4:8].eq(2).all() and labels[8:10].eq(IGNORE_INDEX).all()
    assert labels[10:].eq(0).all()


def test_binary_makes_every_nonzero_value_foreground(tmp_path):
    mask = np.zeros((16, 16), np.uint8)
    mask[:4], mask[4:8], mask[8:10] = 3, 9, 255
    write_pair(tmp_path, "a", mask)
    data = folder(tmp_path, binary=True)
    _, labels = data[0]
    assert data.num_classes == 2
    assert labels[:8].eq(1).all() and labels[8:10].eq(IGNORE_INDEX).all() and labels[10:].eq(0).all()


def test_unpaired_files_are_reported_once_and_zero_pairs_is_an_error(tmp_path, caplog):
    write_pair(tmp_path, "a", np.zeros((8, 8), np.uint8))
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "lonely.jpg")
    Image.new("L", (8, 8)).save(tmp_path / "masks" / "orphan.png")
    with caplog.at_level(logging.WARNING):
        assert len(folder(tmp_path)) == 1
    assert "1 images without a mask (e.g. lonely)" in caplog.text
    assert "1 masks without an image (e.g. orphan)" in caplog.text
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(DataError, match=f"{tmp_path / 'images'}.*{other}"):
        SegmentationFolder(tmp_path / "images", other)


def test_scan_is_cached_and_redone_when_a_mask_changes(tmp_path, monkeypatch):
    for i in range(3):
        write_pair(tmp_path, f"m{i}", np.full((8, 8), i, np.uint8))
    assert folder(tmp_path).mapping.values == [0, 1, 2]

    def no_reading(path):
        raise AssertionError(f"read {path} although the scan was cached")

    monkeypatch.setattr(labels, "read_mask", no_reading)
    monkeypatch.setattr(dataset, "read_mask", no_reading)
    monkeypatch.setattr(dataset, "read_image", no_reading)
    data = folder(tmp_path)
    assert data.mapping.values == [0, 1, 2]
    make_weighted_sampler(data)  # weights come from the cached counts, no file is read
    monkeypatch.undo()
    Image.fromarray(np.full((8, 8), 5, np.uint8)).save(tmp_path / "masks" / "m2.png")
    assert folder(tmp_path).mapping.values == [0, 1, 5]


def test_validation_uses_the_training_mapping_and_refuses_unknown_values(tmp_path):
    train, val = tmp_path / "train", tmp_path / "val"
    write_pair(train, "a", np.array([[0, 3], [3, 3]], np.uint8))
    write_pair(val, "b", np.array([[0, 3], [9, 3]], np.uint8))
    mapping = folder(train).mapping
    with pytest.raises(DataError, match=r"b\.png: mask value 9"):
        folder(val, mapping=mapping)
    _, labels = folder(val, mapping=mapping, unknown_labels="ignore", image_size=2)[0]
    assert labels.tolist() == [[0, 1], [IGNORE_INDEX, 1]]


def test_class_and_sample_weights_follow_the_inverse_frequency_rule(tmp_path):
    common = np.zeros((10, 10), np.uint8)
    common[:5] = 1  # half background, half class 1
    rare = common.copy()
    rare[0, 0] = 2  # one pixel of class 2
    write_pair(tmp_path, "common", common)
    write_pair(tmp_path, "rare", rare)
    data = folder(tmp_path)
    totals = np.array([100, 99, 1], float)
    inverse = totals.sum() / totals
    expected = inverse / inverse.mean()
    np.testing.assert_allclose(data.class_weights.numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(data.sample_weights().numpy(), [expected[:2].mean(), expected.mean()], rtol=1e-6)


def test_weighted_sampler_draws_the_rare_image_several_times_more_often(tmp_path):
    for i in range(20):
        mask = np.zeros((16, 16), np.uint8)
        mask[:8] = 1
        if i == 7:
            mask[0, :4] = 2
        write_pair(tmp_path, f"img{i:02d}", mask)
    data = folder(tmp_path)
    sampler = make_weighted_sampler(data, torch.Generator().manual_seed(0))
    draws = torch.tensor([i for _ in range(500) for i in sampler])
    rare_share = (draws == 7).float().mean().item()
    assert rare_share > 4 * (1 / 20)


@pytest.mark.parametrize("mode", ["P", "L", "RGBA", "CMYK", "I;16", "LA"])
def test_images_of_any_mode_become_rgb(tmp_path, mode):
    write_pair(tmp_path, "a", np.zeros((12, 12), np.uint8))
    rgb = Image.open(tmp_path / "images" / "a.png")
    path = tmp_path / "images" / ("a.jpg" if mode == "CMYK" else "a.png")
    (tmp_path / "images" / "a.png").unlink()
    if mode == "I;16":
        Image.fromarray(np.full((12, 12), 40000, np.uint16)).save(path)
    else:
        rgb.convert(mode).save(path)
    image, mask = folder(tmp_path)[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    assert torch.isfinite(image).all()


def test_exif_rotated_image_and_its_mask_stay_aligned(tmp_path):
    """The stored pixels lie on their side; EXIF says rotate. Masks drawn either way line up."""
    upright = np.zeros((20, 40, 3), np.uint8)
    upright[:, :20] = 255  # left half white when shown upright
    label = np.zeros((20, 40), np.uint8)
    label[:, :20] = 1
    stored = np.rot90(upright, k=1)  # orientation 6 = rotate 90 degrees clockwise to show
    for name, mask in (("drawn_upright", label), ("drawn_on_stored", np.ascontiguousarray(np.rot90(label, k=1)))):
        root = tmp_path / name
        write_pair(root, "a", mask)
        (root / "images" / "a.png").unlink()
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.fromarray(np.ascontiguousarray(stored)).save(root / "images" / "a.jpg", exif=exif, quality=100)
        data = SegmentationFolder(root / "images", root / "masks", image_size=20, augment="none")
        img, labels = data.load(0)
        assert img.shape[-2:] == (20, 40), name
        bright = img.float().mean(0) > 128
        assert (bright == labels.bool()).float().mean() > 0.98, name


def test_bad_samples_are_skipped_and_named_unless_strict(tmp_path):
    for i in range(3):
        write_pair(tmp_path, f"s{i}", np.zeros((8, 8), np.uint8))
    (tmp_path / "images" / "s1.png").write_bytes(b"not an image")
    data = folder(tmp_path)
    _, _, skipped = SkipBadSamples(data)[1]
    assert "s1.png" in skipped
    with pytest.raises(BadSampleError, match="s1.png"):
        SkipBadSamples(data, strict=True)[1]


def test_validation_transform_is_deterministic_and_training_one_is_not(tiny_demo):
    val = SegmentationFolder(tiny_demo / "images/val", tiny_demo / "masks/val", image_size=32)
    first, second = val[0], val[0]
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    train = SegmentationFolder(tiny_demo / "images/train", tiny_demo / "masks/train", image_size=32, augment="basic")
    torch.manual_seed(0)
    assert any(not torch.equal(train[0][0], train[0][0]) for _ in range(3))


def test_unknown_augmentation_is_refused():
    with pytest.raises(ValueError, match="augmentation"):
        build_transforms(32, "extreme")


def object_colours(root: Path) -> dict[int, np.ndarray]:
    """Mean RGB of each class in each demo image, grouped by class."""
    per_class: dict[int, list[np.ndarray]] = {}
    for mask_path in sorted((root / "masks/train").glob("*.png")):
        mask = np.asarray(Image.open(mask_path))
        image = np.asarray(Image.open(root / "images/train" / f"{mask_path.stem}.jpg"), np.float32)
        for kind in np.unique(mask[mask > 0]):
            per_class.setdefault(int(kind), []).append(image[mask == kind].mean(0))
    return {kind: np.array(means) for kind, means in per_class.items()}


def test_texture_demo_gives_the_class_away_by_texture_and_outline_not_by_colour(tmp_path):
    """The colour demo keeps one colour per class; the texture demo spreads every class over all colours."""
    spread = {}
    for style in demo.DEMO_STYLES:
        root = demo.make_demo_data(tmp_path / style, num_train=40, num_val=1, size=32, seed=3, style=style)
        colours = object_colours(root)
        assert set(colours) >= {1, 2, 3}
        spread[style] = np.mean([means.std(0).mean() for kind, means in colours.items() if kind != 4])
    assert spread["colour"] < 15 and spread["texture"] > 25
    with pytest.raises(ValueError, match="unknown demo style 'stripes'"):
        demo.make_demo_data(tmp_path / "other", style="stripes")
