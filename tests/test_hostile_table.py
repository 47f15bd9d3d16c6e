"""One rule that keeps old holes closed: every hostile file runs through every entry point that reads that kind
of file (training, inference, export's self-check, the Python API for images; training, score_masks.py and
prepare_masks.py for masks and COCO names), so a new reader cannot reopen a case an old one handles.

Each case says what its file is: "read" (a usable file under an awkward name: used like any other), "bad"
(named in one line, skipped where a folder is read, raised as a standard exception type by the API) or "no file"
(an entry named like an image that is no file: a link loop, a dangling link, a folder, a FIFO, a device; left out of
a folder's listing with one warning that names it, never opened, raised as a bad file by the API). Every test runs
under a timer, so an entry that blocks a reader (a FIFO opened for reading waits for ever) fails it instead of
hanging the suite.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

import export
import inference
import prepare_masks
import score_masks
import train
from conftest import TINY_TRAIN_FLAGS, add_instance_masks, run_in_process
from errors import one_line
from files import printable
from predictor import Predictor
from test_hostile_inputs import png_claiming
from utils import Runtime


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def tiff_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array)
    return buffer.getvalue()


PHOTO = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
MASK = np.zeros((48, 48), np.uint8)
MASK[10:30, 12:40] = 1


def symlink_loop(path: Path) -> None:
    path.symlink_to(path.name)


def dangling_link(path: Path) -> None:
    path.symlink_to("nothing-here")


def link_to_folder(path: Path) -> None:
    (path.parent / "a-folder").mkdir(exist_ok=True)
    path.symlink_to("a-folder")


def fifo(path: Path) -> None:
    os.mkfifo(path)


def link_to_a_device(path: Path) -> None:
    path.symlink_to("/dev/zero")  # a reader that opened it would read zeros for ever


# Entries that are no files, made by a function of their path.
NO_FILES = {
    "symlink_loop": (b"zz_loop.png", symlink_loop, "no file"),
    "dangling_link": (b"zz_dangling.png", dangling_link, "no file"),
    "link_to_a_folder": (b"zz_dirlink.png", link_to_folder, "no file"),
    "fifo": (b"zz_fifo.png", fifo, "no file"),
    "link_to_a_device": (b"zz_zero.png", link_to_a_device, "no file"),
}

# name on disk (bytes: not every name is valid UTF-8) -> (the file's bytes, None for a folder, or a function that
# makes the entry; what it is)
HOSTILE_IMAGES = {
    "latin1_name": (b"caf\xe9.png", png_bytes(PHOTO), "read"),
    "invalid_utf8_name": (b"bad\xff_y.jpg", jpeg_bytes(PHOTO), "read"),
    "leading_dash_name": (b"-dash.png", png_bytes(PHOTO), "read"),
    "newline_name": (b"new\nline.jpg", jpeg_bytes(PHOTO), "read"),
    "broken_under_latin1_name": (b"bro\xefken.jpg", b"not a jpeg", "bad"),
    "broken_under_newline_name": (b"bro\nken.jpg", b"not a jpeg", "bad"),
    "empty_file": (b"zz_empty.png", b"", "bad"),
    "truncated_jpeg": (b"zz_cut.jpg", jpeg_bytes(PHOTO)[:300], "bad"),
    "text_named_png": (b"zz_text.png", b"hello, world\n", "bad"),
    "decompression_bomb": (b"zz_bomb.png", png_claiming(20000, 20000), "bad"),
    "nan_only_tiff": (b"zz_nan.tif", tiff_bytes(np.full((48, 48), np.nan, np.float32)), "bad"),
    "seven_channels": (b"zz_seven.tif", tiff_bytes(np.zeros((48, 48, 7), np.uint8)), "bad"),
    "folder_named_png": (b"zz_folder.png", None, "no file"),
    **NO_FILES,
}
HOSTILE_MASKS = {
    "latin1_name": (b"caf\xe9.png", png_bytes(MASK), "read"),
    "invalid_utf8_name": (b"bad\xff_y.png", png_bytes(MASK), "read"),
    "leading_dash_name": (b"-dash.png", png_bytes(MASK), "read"),
    "newline_name": (b"new\nline.png", png_bytes(MASK), "read"),
    "broken_under_latin1_name": (b"bro\xefken.png", b"not a png", "bad"),
    "broken_under_newline_name": (b"bro\nken.png", b"not a png", "bad"),
    "empty_file": (b"zz_empty.png", b"", "bad"),
    "colour_mask": (b"zz_colour.png", png_bytes(PHOTO), "bad"),
    "values_past_16_bits": (b"zz_wide.tif", tiff_bytes(np.full((48, 48), 2_000_000_000, np.int32)), "bad"),
    "decompression_bomb": (b"zz_bomb.png", png_claiming(20000, 20000), "bad"),
    **NO_FILES,
}


class Blocked(BaseException):
    """Raised by the timer: a BaseException, so no handler of the code under test turns it into an error line."""


@pytest.fixture(autouse=True)
def never_blocks():
    """Every test here fails, instead of hanging, if a reader blocks (a FIFO) or never ends (/dev/zero)."""

    def blocked(signum, frame):
        raise Blocked("a reader blocked on a hostile entry")

    previous = signal.signal(signal.SIGALRM, blocked)
    signal.setitimer(signal.ITIMER_REAL, 120)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


def place(folder: Path, name: bytes, content: bytes | Callable | None) -> Path:
    """Makes the hostile entry in folder and returns its path (a str path holding the name's raw bytes)."""
    path = Path(os.fsdecode(os.fsencode(folder) + b"/" + name))
    if content is None:
        path.mkdir()
    elif callable(content):
        content(path)
    else:
        path.write_bytes(content)
    return path


def named(path: Path, text: str) -> bool:
    """Whether text names the file as a console shows it: what cannot be printed as U+FFFD, control characters (a
    newline in the name) escaped, so the message stays one line."""
    return one_line(printable(path.name)) in printable(text)


@pytest.fixture
def demo_copy(tiny_demo, tmp_path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(tiny_demo, root)
    return root


def train_on(root: Path, tmp_path: Path) -> tuple[int, str]:
    """As `python train.py` runs it: through run_cli, whose output streams show what cannot be printed as U+FFFD."""
    flags = ["--data-root", root, "--epochs", "1", "--sampler", "uniform", "--run-dir", tmp_path / "run"]
    result = run_in_process(train.main, *flags, *TINY_TRAIN_FLAGS)
    assert "Traceback" not in result.stderr
    return result.returncode, result.stdout


@pytest.mark.parametrize("case", HOSTILE_IMAGES)
def test_hostile_image_through_training(case, demo_copy, tmp_path, caplog):
    name, content, kind = HOSTILE_IMAGES[case]
    path = place(demo_copy / "images/train", name, content)
    (demo_copy / "masks/train" / f"{path.stem}.png").write_bytes(png_bytes(MASK))
    code, out = train_on(demo_copy, tmp_path)
    assert code == 0
    summary = next(line for line in out.splitlines() if line.startswith("epoch 1/1"))
    if kind == "read":
        assert "25 training" in out and "skipped" not in summary
    elif kind == "no file":  # not listed (one warning names it); its mask has no image
        assert "24 training" in out and "skipped" not in summary
        assert "1 entries named like images are no files" in caplog.text and named(path, caplog.text)
    else:
        assert "train skipped 1 bad samples" in summary and named(path, summary)


@pytest.mark.parametrize("case", HOSTILE_IMAGES)
def test_hostile_image_through_inference(case, trained_run, tiny_demo, tmp_path, caplog):
    name, content, kind = HOSTILE_IMAGES[case]
    folder = tmp_path / "inputs"
    folder.mkdir()
    shutil.copy(sorted((tiny_demo / "images/val").iterdir())[0], folder / "good.jpg")
    path = place(folder, name, content)
    checkpoint = trained_run / "checkpoints/best.pt"
    result = run_in_process(
        inference.main, "--input_dir", folder, "--checkpoint", checkpoint, "--output_dir", tmp_path / "o"
    )
    assert result.returncode == 0 and "Traceback" not in result.stderr
    mask = Path(os.fsdecode(os.fsencode(tmp_path / "o" / "masks") + b"/" + os.fsencode(path.stem) + b".png"))
    if kind == "read":
        assert "2 images segmented" in result.stdout and mask.is_file()
        assert np.asarray(Image.open(mask)).shape == (48, 48)
    elif kind == "no file":
        assert "1 images segmented" in result.stdout and "0 unreadable" in result.stdout
        assert named(path, caplog.text) and not mask.exists()
    else:
        assert "1 images segmented" in result.stdout and "1 unreadable" in result.stdout
        assert named(path, caplog.text) and not mask.exists()


@pytest.mark.parametrize("case", HOSTILE_IMAGES)
def test_hostile_image_through_export_self_check(case, trained_run, tiny_demo, tmp_path):
    name, content, kind = HOSTILE_IMAGES[case]
    folder = tmp_path / "checks"
    folder.mkdir()
    shutil.copy(sorted((tiny_demo / "images/val").iterdir())[0], folder / "good.jpg")
    place(folder, name, content)
    checkpoint = trained_run / "checkpoints/best.pt"
    flags = ("--checkpoint", checkpoint, "--output", tmp_path / "m.onnx", "--images", folder, "--check-count", 4)
    result = run_in_process(export.main, *flags)
    assert result.returncode == 0 and "Traceback" not in result.stderr
    used = 2 if kind == "read" else 1
    assert f"on {used} real images" in result.stdout and (tmp_path / "m.onnx").is_file()


@pytest.fixture(scope="module")
def predictor(trained_run) -> Predictor:
    return Predictor.from_checkpoint(trained_run / "checkpoints/best.pt", Runtime.from_flags("cpu", "fp32", False))


@pytest.mark.parametrize("case", HOSTILE_IMAGES)
def test_hostile_image_through_the_python_api(case, predictor, tmp_path):
    name, content, kind = HOSTILE_IMAGES[case]
    path = place(tmp_path, name, content)
    if kind == "read":
        assert predictor.predict(path).shape == (48, 48)
        assert predictor.predict(str(path)).shape == (48, 48)
        return
    with pytest.raises((ValueError, OSError)) as raised:
        predictor.predict(path)
    message = str(raised.value)
    assert len(message.splitlines()) == 1 and one_line(str(path)) in message


@pytest.mark.parametrize("case", HOSTILE_MASKS)
def test_hostile_mask_through_training(case, demo_copy, tmp_path, caplog):
    name, content, kind = HOSTILE_MASKS[case]
    mask = place(demo_copy / "masks/train", name, content)
    image = Path(os.fsdecode(os.fsencode(demo_copy / "images/train") + b"/" + os.fsencode(mask.stem) + b".jpg"))
    image.write_bytes(jpeg_bytes(PHOTO))
    code, out = train_on(demo_copy, tmp_path)
    assert code == 0
    if kind == "read":
        assert "25 training" in out and "bad masks left out" not in caplog.text
    elif kind == "no file":  # not listed (one warning names it); its image has no mask
        assert "24 training" in out and "1 entries named like images are no files" in caplog.text
        assert named(mask, caplog.text)
    else:
        assert "24 training" in out and "1 bad masks left out" in caplog.text and named(mask, caplog.text)


@pytest.mark.parametrize("case", HOSTILE_MASKS)
@pytest.mark.parametrize("side", ["--pred", "--truth"])
def test_hostile_mask_through_score_masks(case, side, tmp_path):
    name, content, kind = HOSTILE_MASKS[case]
    folders = {"--pred": tmp_path / "pred", "--truth": tmp_path / "truth"}
    for folder in folders.values():
        folder.mkdir()
        (folder / "good.png").write_bytes(png_bytes(MASK))
    path = place(folders[side], name, content)
    other = "--truth" if side == "--pred" else "--pred"
    (Path(os.fsdecode(os.fsencode(folders[other]) + b"/" + name))).write_bytes(png_bytes(MASK))
    result = run_in_process(score_masks.main, "--pred", folders["--pred"], "--truth", folders["--truth"])
    assert "Traceback" not in result.stderr
    if kind == "read":
        assert result.returncode == 0 and "2 images: mIoU 1.0000" in result.stdout
        return
    last = result.stderr.splitlines()[-1]  # a no-file prediction is also named in the listing's warning
    assert result.returncode == 2 and last.startswith("error: ") and named(path, last)
    if kind == "bad":
        assert len(result.stderr.splitlines()) == 1


@pytest.mark.parametrize("case", HOSTILE_IMAGES)
def test_hostile_image_named_in_coco_through_prepare_masks(case, tmp_path):
    """COCO files are JSON text: Python's json writes a name that is not UTF-8 as escaped surrogates, and a
    reader that decodes it gets the file's name back."""
    name, content, kind = HOSTILE_IMAGES[case]
    images = tmp_path / "images"
    images.mkdir()
    path = place(images, name, content)
    coco = {
        "images": [{"id": 1, "file_name": path.name, "height": 48, "width": 48}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "bbox": [5, 5, 20, 20],
                "area": 400,
                "segmentation": [[5, 5, 25, 5, 25, 25, 5, 25]],
                "iscrowd": 0,
            }
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (tmp_path / "a.json").write_text(json.dumps(coco))
    out = tmp_path / "masks"
    result = run_in_process(
        prepare_masks.main,
        "--images_dir",
        images,
        "--annotations_file",
        tmp_path / "a.json",
        "--output_dir",
        out,
        "--workers",
        0,
    )
    assert result.returncode == 0 and "Traceback" not in result.stderr
    mask = Path(os.fsdecode(os.fsencode(out) + b"/" + os.fsencode(path.stem) + b".png"))
    readable = kind == "read" or case in ("seven_channels", "nan_only_tiff", "decompression_bomb")
    if readable:  # prepare_masks reads headers only: a header that opens is an image to draw a mask for
        assert "1 masks written" in result.stdout and mask.is_file()
        assert np.asarray(Image.open(mask))[10, 10] == 1
    else:
        assert "0 masks written" in result.stdout and not mask.exists()


OBJECTS = np.zeros((48, 48), np.int32)
OBJECTS[10:30, 12:25], OBJECTS[10:30, 25:40] = 7, 9  # two objects that touch
PIECES = np.zeros((48, 48), np.uint16)
PIECES[5:15, 5:15], PIECES[30:40, 30:40] = 5, 5  # one id, two pieces apart
SPECKS = np.zeros((48, 48), np.uint16)
SPECKS[::7, ::7] = np.arange(1, 50).reshape(7, 7)  # 49 objects of one pixel each
# Instance masks (training's separation target, score_masks.py --instances): "read" or "bad" as above
HOSTILE_INSTANCE_MASKS = {
    "ids_past_65535": (b"zz_wide.tif", tiff_bytes(np.where(OBJECTS > 0, OBJECTS + 100_000, 0)), "read"),
    "one_id_in_two_pieces": (b"zz_pieces.png", png_bytes(PIECES), "read"),
    "objects_of_one_pixel": (b"zz_specks.png", png_bytes(SPECKS), "read"),
    "negative_ids": (b"zz_negative.tif", tiff_bytes(np.where(OBJECTS > 0, -OBJECTS, 0)), "bad"),
    "fractional_ids": (b"zz_float.tif", tiff_bytes(OBJECTS.astype(np.float32) + 0.5), "bad"),
    "size_of_another_image": (b"zz_size.png", png_bytes(np.zeros((30, 48), np.uint16)), "bad"),
    "broken_file": (b"zz_broken.png", b"not a png", "bad"),
    **NO_FILES,
}


@pytest.fixture
def instance_demo(tiny_demo, tmp_path) -> Path:
    return add_instance_masks(Path(shutil.copytree(tiny_demo, tmp_path / "data")))


@pytest.mark.parametrize("case", HOSTILE_INSTANCE_MASKS)
def test_hostile_instance_mask_through_training(case, instance_demo, tmp_path, caplog):
    name, content, kind = HOSTILE_INSTANCE_MASKS[case]
    path = place(instance_demo / "masks_instance/train", name, content)
    stem = path.stem
    (instance_demo / "images/train" / f"{stem}.jpg").write_bytes(jpeg_bytes(PHOTO))
    (instance_demo / "masks/train" / f"{stem}.png").write_bytes(png_bytes(MASK))
    code, out = train_on(instance_demo, tmp_path)
    assert code == 0 and "instances: separate objects learnt" in out
    summary = next(line for line in out.splitlines() if line.startswith("epoch 1/1"))
    if kind == "read":
        assert "25 training" in out and "skipped" not in summary
    elif kind == "no file":  # not listed (one warning names it): the image has no instance mask, named once
        assert "25 training" in out and "skipped" not in summary and named(path, caplog.text)
        assert "1 of 25 images have no instance mask" in caplog.text
    else:
        assert "train skipped 1 bad samples" in summary and named(path, summary)


@pytest.mark.parametrize("case", HOSTILE_INSTANCE_MASKS)
@pytest.mark.parametrize("side", ["--pred", "--truth"])
def test_hostile_instance_mask_through_score_masks(case, side, tmp_path):
    name, content, kind = HOSTILE_INSTANCE_MASKS[case]
    folders = {"--pred": tmp_path / "pred", "--truth": tmp_path / "truth"}
    for folder in folders.values():
        folder.mkdir()
        (folder / "good.png").write_bytes(png_bytes(OBJECTS.astype(np.uint16)))
    path = place(folders[side], name, content)
    other = "--truth" if side == "--pred" else "--pred"
    (Path(os.fsdecode(os.fsencode(folders[other]) + b"/" + name))).write_bytes(png_bytes(OBJECTS.astype(np.uint16)))
    result = run_in_process(score_masks.main, "--instances", "--pred", folders["--pred"], "--truth", folders["--truth"])
    assert "Traceback" not in result.stderr
    if kind == "read":
        assert result.returncode == 0 and "2 images" in result.stdout
        return
    last = result.stderr.splitlines()[-1]
    assert result.returncode == 2 and last.startswith("error: ") and named(path, last)


# Arrays and objects reach only the Python API: each raises the standard type a caller catches.
HOSTILE_ARRAYS = {
    "empty": (np.zeros((0, 40, 3), np.uint8), ValueError, "empty image (0x40x3)"),
    "zero_width": (np.zeros((40, 0), np.float32), ValueError, "empty image (40x0x1)"),
    "nan_only": (np.full((8, 8, 3), np.nan, np.float32), ValueError, "every pixel is NaN or infinite"),
    "infinite_only": (np.full((8, 8), np.inf, np.float64), ValueError, "every pixel is NaN or infinite"),
    "seven_channels": (np.zeros((8, 8, 7), np.uint8), ValueError, "7 channels, the model takes 3"),
    "four_dimensions": (np.zeros((1, 8, 8, 3), np.uint8), ValueError, "expected (H, W) or (H, W, C) numbers"),
    "complex": (np.zeros((8, 8), np.complex64), ValueError, "expected (H, W) or (H, W, C) numbers"),
    "not_an_image": ({"pixels": 1}, TypeError, "not dict"),
}


@pytest.mark.parametrize("case", HOSTILE_ARRAYS)
@pytest.mark.parametrize("call", ["predict", "predict_proba"])
def test_hostile_array_through_the_python_api(case, call, predictor):
    value, expected, fragment = HOSTILE_ARRAYS[case]
    with pytest.raises(expected, match=re.escape(fragment)) as raised:
        getattr(predictor, call)(value)
    assert len(str(raised.value).splitlines()) == 1


def test_the_python_api_raises_file_not_found_for_missing_paths(predictor, trained_run, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.png: no such image file"):
        predictor.predict(tmp_path / "nothing.png")
    with pytest.raises(FileNotFoundError, match="nothing.tif: no such image file"):
        predictor.predict(str(tmp_path / "nothing.tif"))
    with pytest.raises(FileNotFoundError, match="missing.pt: no such checkpoint file"):
        Predictor.from_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match="missing.onnx: no such ONNX file"):
        Predictor.from_onnx(tmp_path / "missing.onnx")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.pt: not a loadable checkpoint"):
        Predictor.from_checkpoint(tmp_path / "junk.pt")
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.onnx: not a loadable ONNX model"):
        Predictor.from_onnx(tmp_path / "junk.onnx")


def test_a_data_root_whose_name_is_not_utf8_trains_logs_and_replays(tiny_demo, tmp_path, monkeypatch):
    """The folder name reaches the run folder's name, TensorBoard's hyperparameters and config.yaml."""
    root = Path(os.fsdecode(os.fsencode(tmp_path) + b"/d\xe9mo"))
    shutil.copytree(tiny_demo, root)
    monkeypatch.chdir(tmp_path)
    result = run_in_process(train.main, "--data-root", root, "--epochs", "1", *TINY_TRAIN_FLAGS)
    assert result.returncode == 0 and "Traceback" not in result.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("d\ufffdmo-")  # a UTF-8 name TensorBoard can write under
    assert list(run_dir.glob("events.out.tfevents.*")) and (run_dir / "hparams").is_dir()
    replay = run_in_process(train.main, "--config", run_dir / "config.yaml", "--run-dir", tmp_path / "replay")
    assert replay.returncode == 0 and "24 training and 8 validation images" in replay.stdout
    bad_run_dir = Path(os.fsdecode(os.fsencode(tmp_path) + b"/run\xff"))
    refused = run_in_process(train.main, "--data-root", root, "--run-dir", bad_run_dir, *TINY_TRAIN_FLAGS)
    assert refused.returncode == 2 and "not a UTF-8 name, which TensorBoard's event files need" in refused.stderr
    assert not os.path.exists(bad_run_dir)
