"""Training from images larger than memory: crops read by windows from tiled TIFF slides and their masks, never the
whole slide; the label scan and the statistics by windows; validation leaves slides out."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

import dataset as dataset_module
from conftest import TINY_TRAIN_FLAGS, run_in_process
from dataset import SegmentationFolder, choose_reading
from errors import BadSampleError, DataError
from intensity import compute_statistics
from transforms import Crop

SLIDE = (600, 500)  # (H, W): 300,000 pixels, a slide under --max-pixels 10000
MAX_PIXELS = 10_000


def squares(size=SLIDE, spacing: int = 40) -> np.ndarray:
    """Object ids: 20x20 squares on a grid."""
    ids = np.zeros(size, np.uint16)
    corners = [(top, left) for top in range(5, size[0] - 25, spacing) for left in range(5, size[1] - 25, spacing)]
    for n, (top, left) in enumerate(corners):
        ids[top : top + 20, left : left + 20] = n + 1
    return ids


def write_slide_set(root: Path, ids: np.ndarray, mask_size=None) -> Path:
    """A training folder holding one tiled slide: its pixels show its mask (channel 0 is 200 on objects), its mask
    (0/1) and instance mask as tiled TIFFs too; and one ordinary small image."""
    for folder in ("images/train", "masks/train", "masks_instance/train"):
        (root / folder).mkdir(parents=True)
    mask = (ids > 0).astype(np.uint8)
    pixels = np.stack([mask * 200, np.full_like(mask, 60), np.full_like(mask, 90)], -1)
    tifffile.imwrite(root / "images/train/slide.tif", pixels, tile=(64, 64), compression="zlib")
    written = mask if mask_size is None else np.zeros(mask_size, np.uint8)
    tifffile.imwrite(root / "masks/train/slide.tif", written, tile=(64, 64), compression="zlib")
    tifffile.imwrite(root / "masks_instance/train/slide.tif", ids, tile=(64, 64), compression="zlib")
    small = squares((60, 60))
    tifffile.imwrite(root / "images/train/small.tif", np.repeat(((small > 0) * 200).astype(np.uint8)[..., None], 3, -1))
    tifffile.imwrite(root / "masks/train/small.tif", (small > 0).astype(np.uint8))
    tifffile.imwrite(root / "masks_instance/train/small.tif", small)
    return root


def folder(root: Path, **options) -> SegmentationFolder:
    return SegmentationFolder(
        root / "images/train",
        root / "masks/train",
        **{"image_size": 48, "crop": Crop(48, (1.0, 1.0)), "max_pixels": MAX_PIXELS, "scan_workers": 1} | options,
    )


def test_a_slide_trains_from_windows_never_read_whole(tmp_path, monkeypatch):
    ids = squares()
    root = write_slide_set(tmp_path, ids)
    real_read = dataset_module.read_image

    def small_only(path, *args, **kwargs):
        assert path.name != "slide.tif", "the slide was read whole"
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(dataset_module, "read_image", small_only)
    data = folder(root, instances_dir=root / "masks_instance/train", separation="boundary")
    assert len(data) == round(600 * 500 / 48**2) + 1  # a slide counts once per crop's worth of its pixels
    counts = np.bincount((ids > 0).ravel(), minlength=2) + np.bincount((squares((60, 60)) > 0).ravel())
    assert np.allclose(data.class_counts.sum(0), counts)  # the scan counted the slide by windows
    assert data.pairs[-1][0].name == "small.tif"
    for index in range(3):  # three of the slide's entries, listed first by name
        assert data.pairs[index][0].name == "slide.tif"
        image, target = data[index]
        mask, separation = target[0], target[1]
        assert image.shape == (3, 48, 48) and mask.shape == separation.shape == (48, 48)
        inside = mask != 255
        assert inside.all()  # a window larger than the crop: no padding
        assert ((image[0] > image[1]) == (mask == 1)).all()  # pixels and mask from the same window
        assert (separation[mask == 0] == 0).all() and separation.max() > 0  # its objects' boundaries


def test_the_statistics_of_a_slide_come_from_windows(tmp_path):
    root = write_slide_set(tmp_path, squares())
    slide = root / "images/train/slide.tif"
    stats = compute_statistics([slide], dataset_module.RGB, max_pixels=MAX_PIXELS, workers=1)
    assert stats.mean[1] == pytest.approx(60 / 255) and stats.mean[2] == pytest.approx(90 / 255)
    assert 0 < stats.mean[0] < 200 / 255


def test_validation_leaves_a_slide_out_and_a_mask_of_another_size_is_named(tmp_path, caplog):
    root = write_slide_set(tmp_path / "a", squares())
    with caplog.at_level(logging.WARNING):
        validation = folder(root, image_size=None, crop=None)
    assert [image.name for image, _ in validation.pairs] == ["small.tif"]
    assert "slides left out (1): slide.tif (read whole)" in caplog.text
    other = write_slide_set(tmp_path / "b", squares(), mask_size=(600, 400))
    with caplog.at_level(logging.WARNING):
        assert [image.name for image, _ in folder(other).pairs] == ["small.tif"]
    assert "slide.tif (its mask is not its size)" in caplog.text


def test_a_slide_with_base_size_is_refused_in_one_line(tmp_path):
    root = write_slide_set(tmp_path, squares())
    with pytest.raises(DataError, match="slide.tif: a slide \\(500x600\\) trains from crops at its own resolution"):
        folder(root, crop=Crop(48, (1.0, 1.0), base_size=64))


@pytest.mark.slow
def test_train_py_learns_objects_from_a_slide(tmp_path):
    import train

    root = write_slide_set(tmp_path / "data", squares())
    (root / "images/val").mkdir()
    (root / "masks/val").mkdir()
    (root / "masks_instance/val").mkdir()
    for folder_name in ("images", "masks", "masks_instance"):
        (root / folder_name / "val/small.tif").write_bytes((root / folder_name / "train/small.tif").read_bytes())
    flags = list(TINY_TRAIN_FLAGS)
    flags[flags.index("--crop-size") + 1] = "32"
    run = tmp_path / "run"
    result = run_in_process(
        train.main, "--data-root", root, "--epochs", "1", "--run-dir", run, "--max-pixels", MAX_PIXELS, *flags
    )
    assert result.returncode == 0, result.stderr
    assert "instances" in result.stdout and (run / "checkpoints/last.pt").is_file()


@pytest.mark.parametrize("broken", ["image", "mask"])
def test_a_slide_with_broken_tiles_is_named_never_a_traceback(broken, tmp_path, caplog):
    """Half of the file cut off: a broken mask is left out by the label scan, named; a broken image is a bad
    sample, named when a window of it is read (SkipBadSamples counts it)."""
    root = write_slide_set(tmp_path, squares())
    path = root / ("images/train/slide.tif" if broken == "image" else "masks/train/slide.tif")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with caplog.at_level(logging.WARNING):
        data = folder(root)
    if broken == "mask":
        assert [image.name for image, _ in data.pairs] == ["small.tif"] and "slide.tif" in caplog.text
        return
    with pytest.raises(BadSampleError, match="slide.tif"):
        for index in range(len(data)):  # every window of it: some fall on the half that is gone
            data[index]


def test_an_instance_mask_smaller_than_its_slide_is_a_named_bad_sample(tmp_path):
    root = write_slide_set(tmp_path, squares())
    tifffile.imwrite(root / "masks_instance/train/slide.tif", squares((50, 50)), tile=(16, 16))
    data = folder(root, instances_dir=root / "masks_instance/train", separation="boundary")
    with pytest.raises(BadSampleError, match="slide.tif: the instance mask ends before its slide"):
        data[0]


def write_zarr_set(root: Path, ids: np.ndarray) -> Path:
    """write_slide_set's slide as zarr folders instead (an OME-Zarr-style group for the image, a plain array for
    the mask), at a size read whole by any other reader: zarr folders are read by windows whatever their size."""
    for folder_name in ("images/train", "masks/train", "masks_instance/train"):
        (root / folder_name).mkdir(parents=True)
    mask = (ids > 0).astype(np.uint8)
    pixels = np.stack([mask * 200, np.full_like(mask, 60), np.full_like(mask, 90)], -1)
    zarr.open_group(str(root / "images/train/slide.zarr"), mode="w").create_array("0", data=pixels, chunks=(64, 64, 3))
    zarr.create_array(str(root / "masks/train/slide.zarr"), data=mask, chunks=(64, 64))
    zarr.create_array(str(root / "masks_instance/train/slide.zarr"), data=ids, chunks=(64, 64))
    return root


def test_a_zarr_folder_trains_from_windows_and_sets_the_reading(tmp_path):
    ids = squares((200, 160))
    root = write_zarr_set(tmp_path, ids)
    assert choose_reading(root / "images/train", "auto", "auto") == (dataset_module.RGB, "imagenet")
    instances = dict(instances_dir=root / "masks_instance/train", separation="boundary")
    data = folder(root, max_pixels=dataset_module.DEFAULT_MAX_PIXELS, **instances)  # under --max-pixels: a zarr still
    assert len(data) == round(200 * 160 / 48**2) and data.slides == {root / "images/train/slide.zarr": (200, 160)}
    assert np.allclose(data.class_counts.sum(0), np.bincount((ids > 0).ravel()))  # the scan read the zarr mask
    for index in range(3):
        image, (mask, separation) = data[index]
        assert image.shape == (3, 48, 48) and ((image[0] > image[1]) == (mask == 1)).all()
        assert (separation[mask == 0] == 0).all() and separation.max() > 0  # the zarr instance mask's boundaries


def test_a_broken_zarr_folder_is_left_out_named(tmp_path, caplog):
    root = write_zarr_set(tmp_path, squares((200, 160)))
    (root / "images/train/empty.zarr").mkdir()
    zarr.create_array(str(root / "masks/train/empty.zarr"), data=np.zeros((50, 50), np.uint8), chunks=(64, 64))
    with caplog.at_level(logging.WARNING):
        data = folder(root)
    assert {image.name for image, _ in data.pairs} == {"slide.zarr"}
    assert "slides left out (1): empty.zarr (" in caplog.text and "unreadable slide" in caplog.text


def test_the_label_scan_cache_sees_a_zarr_mask_rewritten_in_place(tmp_path):
    from files import files_key

    mask = tmp_path / "m.zarr"
    zarr.create_array(str(mask), data=np.zeros((64, 64), np.uint8), chunks=(32, 32))
    before = files_key([mask])
    zarr.open_array(str(mask), mode="r+")[:32, :32] = 1  # one chunk rewritten: the folder's own times stay
    assert files_key([mask]) != before


def test_training_windows_open_a_slide_once_per_process(tmp_path, monkeypatch):
    """A crop's window reads from the slide opened once in this process; a forked loader worker opens its own file
    handle (never its parent's) and reads the same pixels."""
    import multiprocessing

    import slide_io

    slide = write_slide_set(tmp_path, squares()) / "images/train/slide.tif"
    opened, real_open = [], slide_io.open_slide
    monkeypatch.setattr(slide_io, "open_slide", lambda path, *args: opened.append(path) or real_open(path, *args))
    slide_io._slide_for_windows.cache_clear()
    corners = [(slide, dataset_module.RGB, 64 * i, 32 * i, 48) for i in range(3)]
    here = [slide_io.image_window(*corner) for corner in corners]
    assert opened == [slide]
    with multiprocessing.get_context("fork").Pool(1) as pool:
        forked = pool.starmap(slide_io.image_window, corners)
    assert all(np.array_equal(a, b) for a, b in zip(here, forked, strict=True))
    assert np.array_equal(here[1][..., 0] > 100, squares()[64:112, 32:80] > 0)
