"""End to end on images that are not RGB photos: 4-channel 16-bit TIFF stacks and grey images, through train.py,
inference.py, export.py and the Python API; the checkpoint carries how files are read and normalised."""

import re

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

import export
import inference
import train
from checkpoints import load_checkpoint
from conftest import TINY_TRAIN_FLAGS, run_in_process
from listing import list_images
from predictor import Predictor
from utils import Runtime

STACK_FLAGS = [*TINY_TRAIN_FLAGS, "--image-size", "48", "--epochs", "8", "--precision", "fp32"]


def make_stack_data(root, num_train=24, num_val=8, size=48, seed=0):
    """12-bit 4-channel stacks whose label lies in the last channel only (bright ellipses); the first three hold
    bright blobs that have nothing to do with it. Half are written channel-first, half channel-last."""
    rng = np.random.default_rng(seed)
    y, x = np.ogrid[:size, :size]
    for split, count in (("train", num_train), ("val", num_val)):
        for kind in ("images", "masks"):
            (root / kind / split).mkdir(parents=True)
        for k in range(count):
            mask = np.zeros((size, size), np.uint8)
            for _ in range(rng.integers(1, 4)):
                (cy, cx), (ry, rx) = rng.integers(8, size - 8, 2), rng.integers(4, 12, 2)
                mask[((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1] = 1
            stack = rng.normal(2000, 600, (4, size, size))
            for channel in range(3):
                cy, cx = rng.integers(0, size, 2)
                stack[channel][(y - cy) ** 2 + (x - cx) ** 2 < rng.integers(30, 200)] += 1500
            stack[3] = np.where(mask == 1, 2600, 1400) + rng.normal(0, 150, (size, size))
            stack = stack.clip(0, 4095).astype(np.uint16)
            layout = "separate" if k % 2 else "contig"
            array = stack if k % 2 else stack.transpose(1, 2, 0)
            path = root / "images" / split / f"{split}_{k:03d}.tif"
            tifffile.imwrite(path, array, photometric="minisblack", planarconfig=layout)
            Image.fromarray(mask).save(root / "masks" / split / f"{split}_{k:03d}.png")
    return root


@pytest.fixture(scope="module")
def stacks(tmp_path_factory):
    return make_stack_data(tmp_path_factory.mktemp("stacks"))


@pytest.fixture(scope="module")
def four_channel_run(stacks, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "four"
    result = run_in_process(train.main, "--data-root", stacks, "--in-channels", "auto", "--run-dir", run, *STACK_FLAGS)
    assert result.returncode == 0, result.stderr
    assert "4 input channels, dataset normalisation, clipped to the 0.5-99.5 percentiles" in result.stdout
    return run


@pytest.mark.slow
def test_a_label_in_the_fourth_channel_is_learned_with_four_channels_and_not_from_rgb(
    four_channel_run, stacks, tmp_path
):
    assert load_checkpoint(four_channel_run / "checkpoints/best.pt")["best_miou"] > 0.9
    run = tmp_path / "rgb"
    rgb = ["--in-channels", "3", "--convert-channels", "--run-dir", run]  # the first three channels, as RGB
    result = run_in_process(train.main, "--data-root", stacks, *rgb, *STACK_FLAGS)
    assert result.returncode == 0, result.stderr
    assert load_checkpoint(run / "checkpoints/best.pt")["best_miou"] < 0.7


def test_the_checkpoint_carries_the_reading_rule_and_statistics_and_inference_scores_what_validation_logged(
    four_channel_run, stacks, tmp_path
):
    state = load_checkpoint(four_channel_run / "checkpoints/last.pt")
    assert state["model_args"]["in_channels"] == 4
    assert state["reading"] == {"channels": 4, "page": 0, "convert": False}
    normalization = state["normalization"]
    assert normalization["name"] == "dataset" and len(normalization["mean"]) == 4 and normalization["low"]
    config = (four_channel_run / "config.yaml").read_text()
    assert "in_channels: 4\n" in config and "normalize: dataset\n" in config  # auto resolved, replayable
    result = run_in_process(
        inference.main,
        *("--input_dir", stacks / "images/val", "--masks_dir", stacks / "masks/val", "--precision", "fp32"),
        *("--checkpoint", four_channel_run / "checkpoints/last.pt", "--output_dir", tmp_path / "out"),
        *("--display-channel", "3"),
    )
    assert result.returncode == 0, result.stderr
    printed = float(re.search(r"mIoU (\d\.\d+)", result.stdout).group(1))
    assert abs(printed - state["history"][-1]["miou"]) <= 1e-4
    overlay = np.asarray(Image.open(tmp_path / "out/overlays/val_000.png"))[:48, :48]
    background = np.asarray(Image.open(tmp_path / "out/masks/val_000.png")) == 0
    assert background.any() and (overlay[background] == overlay[background][:, :1]).all()  # channel 3 as grey


def test_onnx_export_of_a_four_channel_model_reads_files_as_the_checkpoint(four_channel_run, stacks, tmp_path):
    checkpoint = four_channel_run / "checkpoints/last.pt"
    result = run_in_process(export.main, "--checkpoint", checkpoint, "--output", tmp_path / "four.onnx")
    assert result.returncode == 0, result.stderr
    assert re.search(r"on 4 real images .*labels agree on 100\.0+% of pixels", result.stdout), result.stdout
    onnx = Predictor.from_onnx(tmp_path / "four.onnx")
    torch_predictor = Predictor.from_checkpoint(checkpoint, Runtime(torch.device("cpu")))
    assert onnx.reading == torch_predictor.reading and onnx.normalize == torch_predictor.normalize
    for path in sorted((stacks / "images/val").iterdir())[:3]:
        np.testing.assert_array_equal(onnx.predict(path), torch_predictor.predict(path))
    stack = tifffile.imread(sorted((stacks / "images/val").iterdir())[0])  # channel-last array from Python
    np.testing.assert_array_equal(
        torch_predictor.predict(stack), torch_predictor.predict(stack.astype(np.float32) / 65535)
    )


@pytest.fixture(scope="module")
def grey_run(tiny_demo, tmp_path_factory):
    """A 1-channel model: the tiny demo as 8-bit grey PNGs."""
    root = tmp_path_factory.mktemp("grey")
    for kind in ("images", "masks"):
        for split in ("train", "val"):
            (root / kind / split).mkdir(parents=True)
            for path in list_images(tiny_demo / kind / split):  # not the label-scan cache of earlier tests
                picture = Image.open(path)
                picture = picture.convert("L") if kind == "images" else picture
                picture.save(root / kind / split / f"{path.stem}.png")
    run = root / "run"
    flags = [*TINY_TRAIN_FLAGS, "--epochs", "1", "--in-channels", "auto", "--run-dir", run]
    result = run_in_process(train.main, "--data-root", root, *flags)
    assert result.returncode == 0, result.stderr
    assert "1 input channel, dataset normalisation;" in result.stdout  # 8-bit: no clipping
    return run


def test_a_grey_model_refuses_a_folder_of_colour_photos_in_one_line_unless_told_to_convert(
    grey_run, tiny_demo, tmp_path
):
    checkpoint = grey_run / "checkpoints/last.pt"
    args = ["--input_dir", tiny_demo / "images/val", "--checkpoint", checkpoint, "--output_dir", tmp_path / "out"]
    refused = run_in_process(inference.main, *args)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert re.search(
        r"val_00000\.jpg: 3 channels, the model takes 1; --convert-channels converts colour", refused.stderr
    )
    assert not (tmp_path / "out").exists()
    converted = run_in_process(inference.main, *args, "--convert-channels")
    assert converted.returncode == 0, converted.stderr
    assert len(list((tmp_path / "out/masks").iterdir())) == len(list((tiny_demo / "images/val").iterdir()))


def test_training_a_model_whose_channels_the_images_do_not_have_is_one_line(tiny_demo, tmp_path):
    flags = [*TINY_TRAIN_FLAGS, "--epochs", "1", "--run-dir", tmp_path / "run"]
    result = run_in_process(train.main, "--data-root", tiny_demo, "--in-channels", "4", *flags)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "train_00000.jpg: 3 channels, the model takes 4" in result.stderr
    result = run_in_process(train.main, "--data-root", tiny_demo, "--display-channel", "3", *flags)
    assert result.returncode == 2 and "--display-channel 3: the model's input has channels 0..2" in result.stderr


def test_a_tiff_page_past_every_files_end_is_one_line(stacks, tmp_path):
    flags = [*TINY_TRAIN_FLAGS, "--epochs", "1", "--run-dir", tmp_path / "run", "--in-channels", "4"]
    result = run_in_process(train.main, "--data-root", stacks, "--tiff-page", "3", *flags)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "train_000.tif: holds 1 image; there is no image 3 (--tiff-page)" in result.stderr


def test_imagenet_statistics_for_four_channels_are_one_line(stacks, tmp_path):
    flags = [*TINY_TRAIN_FLAGS, "--epochs", "1", "--run-dir", tmp_path / "run", "--in-channels", "4"]
    result = run_in_process(train.main, "--data-root", stacks, "--normalize", "imagenet", *flags)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "--normalize imagenet: ImageNet statistics exist for 1 or 3 channels, not 4" in result.stderr


def test_resume_keeps_the_checkpoints_statistics_and_refuses_other_channels(
    four_channel_run, stacks, tmp_path, monkeypatch
):
    import intensity

    (stacks / "masks/train" / intensity.STATS_CACHE_NAME).unlink()  # no cache to fall back on

    def recompute(*args, **kwargs):
        raise AssertionError("a resumed run must not recompute its normalisation")

    monkeypatch.setattr(intensity, "compute_statistics", recompute)
    checkpoint = four_channel_run / "checkpoints/epoch_008.pt"
    refused = run_in_process(train.main, "--resume", checkpoint, "--in-channels", "3", "--run-dir", tmp_path / "a")
    assert refused.returncode == 2 and "trained with --in-channels 4, not 3" in refused.stderr
    resumed = run_in_process(train.main, "--resume", checkpoint, "--epochs", "9", "--run-dir", tmp_path / "b")
    assert resumed.returncode == 0, resumed.stderr
    before, after = load_checkpoint(checkpoint), load_checkpoint(tmp_path / "b/checkpoints/last.pt")
    assert after["epoch"] == 9 and after["normalization"] == before["normalization"]
    assert after["reading"] == before["reading"]
