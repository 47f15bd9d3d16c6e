"""Slides: tiled TIFFs and zarr folders read by tiles, masks written by tiles into a pyramidal BigTIFF or an OME-Zarr,
the same labels as the in-memory path (in blocks of columns too), resumed after an interruption without redoing
written rows, glass skipped, and broken slides named in one line. Small generated files: the sizes that matter are
tested by bench.py."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr

import inference
import predictor as predictor_module
import slides
from conftest import TINY_TRAIN_FLAGS, run_in_process
from predictor import Predictor, slide_blocks
from utils import Runtime

SLIDE_FLAGS = ["--max-pixels", "10000", "--precision", "fp32", "--channels-last"]  # 230x300 is a slide here


@pytest.fixture(scope="module")
def crop_run(tiny_demo, tmp_path_factory) -> Path:
    """A model trained on crops (slides are segmented by sliding its tiles), 2 epochs of the tiny demo."""
    import train

    run_dir = tmp_path_factory.mktemp("slides") / "run"
    flags = list(TINY_TRAIN_FLAGS)
    flags[flags.index("--crop-size") + 1] = "32"
    assert train.main(["--data-root", str(tiny_demo), "--epochs", "2", "--run-dir", str(run_dir), *flags]) == 0
    return run_dir / "checkpoints/last.pt"


def slide_pixels(seed: int = 0, size=(230, 300)) -> np.ndarray:
    """Smooth blobs on a textured background: something for the model's labels to change over."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: size[0], : size[1]]
    blobs = sum(np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / 300.0) for y, x in rng.integers(0, min(size), (12, 2)))
    pixels = np.stack([blobs * 200, blobs * 120, 255 - blobs * 150], -1) + rng.normal(0, 10, (*size, 3))
    return pixels.clip(0, 255).astype(np.uint8)


def in_memory(checkpoint: Path, pixels: np.ndarray) -> np.ndarray:
    predictor = Predictor.from_checkpoint(checkpoint, Runtime.from_flags("cpu", "fp32", True))
    labels = predictor.segment([torch.from_numpy(pixels).permute(2, 0, 1)])[0].numpy()
    return predictor.mapping.value_array()[labels]


def test_a_tiled_tiff_is_segmented_by_tiles_into_a_pyramid_the_in_memory_path_agrees_with(
    crop_run, tmp_path, monkeypatch
):
    monkeypatch.setattr(slides, "SLIDE_TILE", 128)  # levels until one fits in a tile: 230x300, 115x150, 58x75
    pixels = slide_pixels()
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in/s.tif", pixels, tile=(64, 64), compression="zlib")
    flags = ["--input_dir", tmp_path / "in", "--checkpoint", crop_run, "--output_dir", tmp_path / "out", *SLIDE_FLAGS]
    result = run_in_process(inference.main, *flags)
    assert result.returncode == 0, result.stderr
    assert "1 slides segmented" in result.stdout
    with tifffile.TiffFile(tmp_path / "out/masks/s.tif") as tif:
        levels = [level.asarray() for level in tif.series[0].levels]
        assert tif.pages[0].is_tiled and [level.shape for level in levels] == [(230, 300), (115, 150), (58, 75)]
    assert (levels[0] == in_memory(crop_run, pixels)).mean() >= 0.999
    assert (levels[1] == levels[0][::2, ::2]).all()  # the pyramid's next level, nearest
    assert (tmp_path / "out/masks/s.overview.png").is_file()
    again = run_in_process(inference.main, *flags)
    assert "0 slides segmented; 1 already done" in again.stdout


@pytest.mark.parametrize("columns", [None, 128], ids=["one block", "blocks of columns"])
def test_an_interrupted_slide_resumes_after_the_rows_written(crop_run, tmp_path, monkeypatch, caplog, columns):
    pixels = slide_pixels(seed=1)
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in/s.tif", pixels, tile=(64, 64))
    flags = ["--input_dir", tmp_path / "in", "--checkpoint", crop_run, "--output_dir", tmp_path / "out", *SLIDE_FLAGS]
    real_mark, marks = slides.SlideOutput.mark, []
    stop_after = 2  # Ctrl-C after the second tile row (of the second block, where there are blocks)
    if columns:
        monkeypatch.setattr(predictor_module, "SLIDE_COLUMNS", columns)  # 300 px wide: blocks of 128, 128 and 44
        predictor = Predictor.from_checkpoint(crop_run, Runtime.from_flags("cpu", "fp32", True))
        stop_after += len(predictor.sampling.tile_grid(230, 300)[0])

    def interrupted(self, key, steps):
        real_mark(self, key, steps)
        marks.append(steps)
        if steps == stop_after:
            raise KeyboardInterrupt

    monkeypatch.setattr(slides.SlideOutput, "mark", interrupted)
    with pytest.raises(KeyboardInterrupt):
        inference.main([str(f) for f in flags])
    assert not (tmp_path / "out/masks/s.tif").exists() and (tmp_path / "out/masks/.s.tif.progress.json").is_file()
    monkeypatch.setattr(slides.SlideOutput, "mark", real_mark)
    caplog.set_level(logging.INFO, logger="inference")
    passes = []
    real_logits = Predictor.batch_logits
    monkeypatch.setattr(
        Predictor, "batch_logits", lambda self, tiles: passes.append(len(tiles)) or real_logits(self, tiles)
    )
    result = run_in_process(inference.main, *flags)
    assert result.returncode == 0 and f"resumed after {stop_after} of" in caplog.text
    resumed_passes = sum(passes)
    labels = tifffile.imread(tmp_path / "out/masks/s.tif")
    assert (labels == in_memory(crop_run, pixels)).mean() >= 0.999
    full = []
    monkeypatch.setattr(
        Predictor, "batch_logits", lambda self, tiles: full.append(len(tiles)) or real_logits(self, tiles)
    )
    run_in_process(inference.main, *flags, "--overwrite")
    assert resumed_passes < sum(full)  # the rows written were not run again (but for one tile row of overlap)


def test_blocks_of_columns_give_the_labels_of_one_pass_over_the_whole_width(crop_run, monkeypatch):
    """Memory flat in a slide's width: its tile rows are taken a block of columns at a time, each block with the
    tiles that reach into it from its neighbours, so every pixel sums the same tiles as one pass over the width."""
    pixels = torch.from_numpy(slide_pixels(seed=3)).permute(2, 0, 1)
    predictor = Predictor.from_checkpoint(crop_run, Runtime.from_flags("cpu", "fp32", True))

    def assembled() -> torch.Tensor:
        labels = torch.full(pixels.shape[-2:], 255, dtype=torch.uint8)  # 255: never written
        for top, left, band in predictor.slide_bands(pixels):
            labels[top : top + band.shape[0], left : left + band.shape[1]] = band
        return labels

    whole = assembled()
    monkeypatch.setattr(predictor_module, "SLIDE_COLUMNS", 70)
    assert slide_blocks(300) == [(0, 70), (70, 140), (140, 210), (210, 280), (280, 300)]
    blocks = assembled()
    assert (whole != 255).all() and (blocks != 255).all()
    assert (blocks == whole).float().mean() >= 0.999  # the same sums; only the network's batches differ
    values = predictor.mapping.value_array()
    assert (values[blocks.numpy()] == in_memory(crop_run, slide_pixels(seed=3))).mean() >= 0.999


def test_an_ome_zarr_slide_in_and_out_with_glass_skipped(crop_run, tmp_path, monkeypatch):
    pixels = slide_pixels(seed=2)
    pixels[:, 150:] = 230  # glass: uniform
    group = zarr.open_group(str(tmp_path / "in/s.zarr"), mode="w")
    for level in range(3):
        step = 2**level
        group.create_array(
            str(level), data=np.ascontiguousarray(np.moveaxis(pixels[::step, ::step], -1, 0)), chunks=(3, 64, 64)
        )
    passes = []
    real_logits = Predictor.batch_logits
    monkeypatch.setattr(
        Predictor, "batch_logits", lambda self, tiles: passes.append(len(tiles)) or real_logits(self, tiles)
    )
    flags = ["--input_dir", tmp_path / "in", "--checkpoint", crop_run, "--output_dir", tmp_path / "out", *SLIDE_FLAGS]
    monkeypatch.setattr(slides, "SLIDE_TILE", 128)  # a pyramid of three levels for 230x300
    result = run_in_process(inference.main, *flags, "--slide-format", "zarr", "--skip-background")
    assert result.returncode == 0, result.stderr
    out = zarr.open_group(str(tmp_path / "out/masks/s.zarr"), mode="r")
    assert out["0"].shape == (230, 300) and out.attrs["multiscales"][0]["datasets"][1]["path"] == "1"
    labels = np.asarray(out["0"][:])
    assert (labels[:, 250:] == 0).all()  # the glass only skipped tiles cover is background, unseen by the network
    skipped_passes = sum(passes)
    passes.clear()
    run_in_process(inference.main, *flags, "--slide-format", "zarr", "--overwrite")
    assert skipped_passes < sum(passes)


@pytest.mark.parametrize(
    "case, fragment",
    [
        ("truncated", "unreadable slide"),
        ("terapixel", "over 20,000,000,000 pixels"),
        ("pyramid_disagrees", "pyramid level 1 is"),
        ("broken_chunk", "unreadable slide"),
    ],
)
def test_a_broken_slide_is_named_in_one_line_and_skipped(case, fragment, crop_run, tmp_path, caplog):
    (tmp_path / "in").mkdir()
    pixels = slide_pixels(seed=3)
    if case == "truncated":
        tifffile.imwrite(tmp_path / "in/s.tif", pixels, tile=(64, 64), compression="zlib")
        data = (tmp_path / "in/s.tif").read_bytes()
        (tmp_path / "in/s.tif").write_bytes(data[: len(data) // 2])
    elif case == "terapixel":
        group = zarr.open_group(str(tmp_path / "in/s.zarr"), mode="w")
        group.create_array("0", shape=(1_000_000, 1_000_000, 3), chunks=(256, 256, 3), dtype=np.uint8)
    elif case == "pyramid_disagrees":
        group = zarr.open_group(str(tmp_path / "in/s.zarr"), mode="w")
        group.create_array("0", data=pixels, chunks=(64, 64, 3))
        group.create_array("1", data=np.concatenate([pixels, pixels]), chunks=(64, 64, 3))
    else:
        group = zarr.open_group(str(tmp_path / "in/s.zarr"), mode="w")
        group.create_array("0", data=pixels, chunks=(64, 64, 3), compressors=zarr.codecs.ZstdCodec())
        chunk = next(p for p in (tmp_path / "in/s.zarr/0").rglob("*") if p.is_file() and p.name != "zarr.json")
        chunk.write_bytes(b"not zstd")
    flags = ["--input_dir", tmp_path / "in", "--checkpoint", crop_run, "--output_dir", tmp_path / "out", *SLIDE_FLAGS]
    result = run_in_process(inference.main, *flags)
    assert "Traceback" not in result.stderr and "0 slides segmented; 0 already done; 1 unreadable" in result.stdout
    assert result.returncode == 1  # nothing could be read
    warning = next(line for line in caplog.text.splitlines() if "skipped:" in line)
    assert fragment in warning and "/in/s." in warning
