"""Whole images of any size -> labels and probabilities, in bands: resize and slide modes."""

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import inference
import predictor as predictor_module
import sampling as sampling_module
from conftest import ROOT, run_in_process
from errors import BadSampleError
from labels import LabelMapping
from predictor import Predictor
from sampling import RowResampler, Sampling, tile_spans
from utils import Runtime

MAPPING = LabelMapping([0, 1, 2, 3], ["background", "a", "b", "c"], 255, False)
CPU = Runtime(torch.device("cpu"))


def pointwise_model(seed=0):
    """Translation-equivariant with no constant term and no spatial context: a tile sees what the image sees."""
    torch.manual_seed(seed)
    return torch.nn.Conv2d(3, 4, 1, bias=False)


def random_image(height, width, seed=0):
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def segment_with_probs(predictor, image):
    probs = torch.full((MAPPING.num_classes, *image.shape[-2:]), float("nan"))

    def keep(index, top, band):
        probs[:, top : top + band.shape[1]] = band

    labels = predictor.segment([image], on_band=keep)[0]
    return labels, probs


@pytest.mark.parametrize(
    ("source", "target"), [((7, 9), (23, 31)), ((7, 9), (3, 4)), ((5, 5), (50, 2)), ((4, 6), (4, 6))]
)
def test_rows_resampled_in_bands_equal_f_interpolate_of_the_whole(source, target):
    rows = torch.randn(5, *source, generator=torch.Generator().manual_seed(1))
    reference = F.interpolate(rows[None], size=target, mode="bilinear", align_corners=False)[0]
    results = []
    for band, chunk in ((1, 1), (3, 2), (target[0], source[0])):
        resampler, out = RowResampler(source, target, band), torch.full((5, *target), float("nan"))
        for piece in rows.split(chunk, 1):
            for top, values in resampler.push(piece):
                out[:, top : top + values.shape[1]] = values
        results.append(out)
        torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)
    assert all(torch.equal(r, results[-1]) for r in results)  # bands of any height: bit for bit the same


@pytest.mark.parametrize("mode", ["resize", "slide"])
def test_a_band_wise_result_equals_the_whole_image_result_exactly(monkeypatch, mode):
    image = random_image(37, 53)
    predictor = Predictor(pointwise_model(), MAPPING, Sampling(mode, image_size=16, tile=16), CPU)
    whole_labels, whole_probs = segment_with_probs(predictor, image)
    monkeypatch.setattr(predictor_module, "BAND_BYTES", 1)  # one row per band
    assert predictor_module.band_rows(4, 53) == 1
    band_labels, band_probs = segment_with_probs(predictor, image)
    assert torch.equal(band_labels, whole_labels) and torch.equal(band_probs, whole_probs)
    assert torch.equal(whole_labels.long(), whole_probs.argmax(0))


@pytest.mark.parametrize(
    ("height", "tile", "overlap"), [(16, 16, 1 / 3), (24, 24, 0.5), (20, 20, 0.0), (16, 16, 0.75), (8, 32, 0.25)]
)
def test_slide_equals_the_whole_image_prediction_of_a_translation_equivariant_model(height, tile, overlap):
    image = random_image(45, 70, seed=3)
    sampling = Sampling("slide", image_size=height, tile=tile, overlap=overlap)
    predictor = Predictor(pointwise_model(), MAPPING, sampling, CPU, batch_size=3)
    labels, probs = segment_with_probs(predictor, image)
    whole = F.softmax(predictor.batch_logits(image[None])[0], 0)
    torch.testing.assert_close(probs, whole, rtol=0, atol=1e-6)
    assert torch.equal(labels.long(), whole.argmax(0))


def test_a_slide_pass_holds_as_many_pixels_as_the_batch_of_training_crops():
    passes, model = [], pointwise_model()

    def counting(images: torch.Tensor) -> torch.Tensor:
        passes.append(images.shape[0])
        return model(images)

    sampling = Sampling("slide", image_size=16, tile=32, overlap=0)
    Predictor(counting, MAPPING, sampling, CPU, batch_size=6).segment([random_image(32, 160)])
    assert passes == [3, 2, 3, 2]  # 6 crops of 16x16 hold the pixels of 3 tiles 16 high and 32 wide; 2 x 5 tiles


@pytest.mark.parametrize(("device", "expected"), [("cpu", 2), ("cuda", 8)])
def test_a_pass_holds_the_device_default_unless_a_batch_size_is_given(device, expected):
    runtime = Runtime(torch.device(device))
    assert Predictor(pointwise_model(), MAPPING, Sampling(), runtime).pass_size == expected
    assert Predictor(pointwise_model(), MAPPING, Sampling(), runtime, batch_size=5).pass_size == 5


def test_the_in_place_softmax_equals_torch_softmax_and_uses_no_second_buffer():
    band = torch.randn(7, 5, 6, generator=torch.Generator().manual_seed(2)) * 30  # classes, rows, width
    reference = F.softmax(band, 0)
    address = band.data_ptr()
    probs = predictor_module.softmax_(band)
    torch.testing.assert_close(probs, reference, rtol=1e-6, atol=1e-7)
    assert probs.data_ptr() == address


@pytest.mark.parametrize("mode", ["resize", "slide"])
def test_labels_alone_take_no_softmax_and_probabilities_are_the_softmax_of_the_combined_logits(monkeypatch, mode):
    """Tiles and flips combine logits: the labels are their argmax, so a caller that wants labels only (inference.py
    without --save-probs) skips the softmax over every class of every pixel."""
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 4, 3, padding=1)
    image = random_image(40, 64, seed=4)
    predictor = Predictor(model, MAPPING, Sampling(mode, image_size=16, tile=16), CPU, tta=True)
    labels, probs = segment_with_probs(predictor, image)
    torch.testing.assert_close(probs.sum(0), torch.ones(40, 64))
    assert torch.equal(labels.long(), probs.argmax(0))

    def no_softmax(*args, **kwargs):
        raise AssertionError("softmax computed for labels alone")

    monkeypatch.setattr(predictor_module, "softmax_", no_softmax)
    assert torch.equal(predictor.segment([image])[0], labels)


def test_slide_differs_from_resize_where_the_model_sees_context():
    """The check above can fail: a 3x3 model sees other pixels squashed to a square than at native size."""
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
    image = random_image(40, 64, seed=4)
    slide = Predictor(model, MAPPING, Sampling("slide", tile=16), CPU).segment([image])[0]
    resize = Predictor(model, MAPPING, Sampling("resize", image_size=16), CPU).segment([image])[0]
    assert (slide != resize).float().mean() > 0.1


def test_slide_weights_tile_centres_over_their_borders():
    weights = predictor_module.gaussian_weights(16, 16, torch.device("cpu"))
    assert weights[7:9, 7:9].min() > 0.9 and weights[0, 0] < 1e-3 and weights.min() > 0
    torch.testing.assert_close(weights, weights.flip(0).flip(1))


@pytest.mark.parametrize(
    ("length", "tile", "overlap", "multiple"),
    [(100, 32, 1 / 3, 1), (32, 32, 0.5, 1), (33, 32, 0.25, 1), (5, 5, 0, 1), (6000, 512, 1 / 16, 16), (400, 50, 0, 8)],
)
def test_tiles_cover_every_pixel_share_the_overlap_and_end_flush(length, tile, overlap, multiple):
    starts, size = tile_spans(length, tile, overlap, multiple)
    covered = np.zeros(length, int)
    for start in starts:
        covered[start : start + size] += 1
    assert covered.min() == 1 and starts[0] == 0 and starts[-1] == length - size and size <= tile
    shared = [a + size - b for a, b in zip(starts, starts[1:], strict=False)]
    assert all(s >= round(tile * overlap) for s in shared) and max(shared, default=0) - min(shared, default=0) <= 1
    fewer = len(starts) - 1  # one tile fewer, however sized and placed, would not cover the length with that overlap
    assert fewer * tile - (fewer - 1) * round(tile * overlap) < length or len(starts) == 1


def test_tiles_are_shrunk_to_the_models_stride():
    starts, size = tile_spans(6000, 512, 1 / 16, multiple=16)
    assert size % 16 == 0 and len(starts) * size < 6000 * 1.08  # 13 tiles of 496, not 13 of 512


@pytest.mark.parametrize("mode", ["resize", "slide"])
@pytest.mark.parametrize("size", [(1, 5000), (5, 7), (300, 1)])
def test_images_smaller_than_a_tile_or_one_pixel_high_work(mode, size):
    predictor = Predictor(pointwise_model(), MAPPING, Sampling(mode, image_size=16, tile=32), CPU, tta=True)
    labels, probs = segment_with_probs(predictor, random_image(*size))
    assert labels.shape == size and labels.dtype == torch.uint8
    torch.testing.assert_close(probs.sum(0), torch.ones(size))


def test_a_batch_of_images_of_different_sizes_gives_each_its_own_size():
    images = [random_image(20, 30), random_image(64, 16, seed=1), random_image(33, 33, seed=2)]
    for mode in ("resize", "slide"):
        labels = Predictor(pointwise_model(), MAPPING, Sampling(mode, image_size=16, tile=16), CPU).segment(images)
        assert [tuple(x.shape) for x in labels] == [(20, 30), (64, 16), (33, 33)]


def test_8_bit_and_16_bit_images_in_one_batch_see_the_same_values():
    """A folder may mix 8-bit and 16-bit files: the batch holds both as 0..1, so equal pictures give equal labels."""
    eight = random_image(16, 16)  # at the working size: no resize to round one of them
    sixteen = eight.float() / 255  # what image_io makes of the same picture stored in 16 bits (x 257 / 65535)
    predictor = Predictor(pointwise_model(), MAPPING, Sampling("resize", image_size=16), CPU)
    labels = predictor.segment([eight, sixteen])
    assert torch.equal(labels[0], labels[1])


def test_slide_scale_and_base_size_set_the_working_resolution():
    assert Sampling("slide", scale=0.5).working_size(100, 60) == (50, 30)
    assert Sampling("slide", base_size=30).working_size(100, 60) == (50, 30)
    assert Sampling("resize", image_size=16).working_size(100, 60) == (16, 16)
    scaled = Predictor(pointwise_model(), MAPPING, Sampling("slide", tile=16, scale=0.5), CPU)
    assert scaled.segment([random_image(40, 50)])[0].shape == (40, 50)


def test_the_checkpoint_flags_choose_the_mode():
    assert Sampling.from_training_flags({"image_size": 96}) == Sampling("resize", 96, tile=96)
    crop = Sampling.from_training_flags({"image_size": 256, "crop_size": 64, "base_size": 128})
    assert (crop.mode, crop.image_size, crop.base_size) == ("slide", 64, 128)
    assert crop.tile == sampling_module.TILE_FACTOR * 64  # tiles larger than the crop: fewer pixels computed twice


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--crop-size", "0", "--base-size", "64"], "--base-size applies to --crop-size training only"),
        (["--crop-size", "32", "--scale-range", "2", "1"], "--scale-range 2 1: LOW must not exceed HIGH"),
    ],
)
def test_crop_flags_that_contradict_each_other_are_one_line_errors(tiny_demo, tmp_path, flags, message):
    import train

    result = run_in_process(train.main, "--data-root", tiny_demo, "--run-dir", tmp_path / "run", *flags)
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_predict_takes_a_path_pil_image_or_array_and_gives_what_inference_writes(trained_run, tiny_demo, tmp_path):
    checkpoint = trained_run / "checkpoints/best.pt"
    image_path = sorted((tiny_demo / "images/val").iterdir())[0]
    folder = tmp_path / "one"
    folder.mkdir()
    (folder / image_path.name).write_bytes(image_path.read_bytes())
    args = ["--input_dir", folder, "--checkpoint", checkpoint, "--output_dir", tmp_path / "out", "--precision", "fp32"]
    assert run_in_process(inference.main, *args).returncode == 0
    written = np.asarray(Image.open(tmp_path / "out/masks" / f"{image_path.stem}.png"))

    predictor = Predictor.from_checkpoint(checkpoint, CPU)
    pixels = Image.open(image_path).convert("RGB")
    for image in (image_path, str(image_path), pixels, np.asarray(pixels), np.asarray(pixels.convert("RGBA"))):
        labels = predictor.predict(image)
        assert labels.shape == written.shape and labels.dtype == written.dtype
        np.testing.assert_array_equal(labels, written)
    probs = predictor.predict_proba(pixels)
    assert probs.shape == (predictor.mapping.num_classes, *written.shape) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(0), 1, atol=1e-5)
    np.testing.assert_array_equal(predictor.mapping.value_array()[probs.argmax(0)], written)
    grey = np.asarray(pixels.convert("L"))
    np.testing.assert_array_equal(predictor.predict(grey), predictor.predict(pixels.convert("L").convert("RGB")))


@pytest.mark.parametrize(
    "image, error",
    [
        (np.zeros((4, 4, 2), np.uint8), "<ndarray>: 2 channels, the model takes 3$"),
        (np.zeros((4, 4), np.complex64), "expected"),
        (np.zeros((4, 4, 3, 1), np.uint8), "expected"),
        ([[0, 1]], "expected"),
    ],
)
def test_predict_names_what_it_cannot_take(image, error):
    predictor = Predictor(pointwise_model(), MAPPING, Sampling("resize", 8), CPU)
    with pytest.raises((ValueError, TypeError, BadSampleError), match=error):
        predictor.predict(image)


def test_the_readme_python_example_runs(trained_run, tiny_demo, tmp_path):
    """The README's Python API block, run as written from a folder laid out like the repository after the demo."""
    readme = (ROOT / "README.md").read_text()
    example = re.search(r"From Python.*?```python\n(.*?)```", readme, re.S)[1]
    (tmp_path / "runs/demo/checkpoints").mkdir(parents=True)
    shutil.copy(trained_run / "checkpoints/best.pt", tmp_path / "runs/demo/checkpoints")
    shutil.copytree(tiny_demo / "images", tmp_path / "data/demo/images")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "(48, 48)" in result.stdout and "(5, 48, 48)" in result.stdout
