"""Round two of bad input: huge files, odd names, impossible flags, a full disk, foreign checkpoints.

Each gets the documented behaviour: a bad file is skipped, named and counted; a bad flag or file is one
`error:` line and a non-zero exit before any work; nothing already written is lost.
"""

import os
import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import bench
import export
import files
import inference
import prepare_masks
import train
from checkpoints import load_checkpoint
from conftest import ROOT, TINY_TRAIN_FLAGS, run_in_process
from predictor import Predictor
from test_robustness import assert_user_error


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header says width x height (grey) but whose data is one empty row: cheap to make, and a
    decompression bomb to any reader that trusts the header."""
    chunk = lambda kind, data: (  # noqa: E731
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


@pytest.fixture
def demo_copy(tiny_demo, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_demo, root)
    return root


def test_a_400_megapixel_training_image_and_mask_are_skipped_and_named(demo_copy, tmp_path, capsys, caplog):
    (demo_copy / "images/train/huge.png").write_bytes(png_claiming(20000, 20000))
    shutil.copy(demo_copy / "masks/train/train_00000.png", demo_copy / "masks/train/huge.png")
    (demo_copy / "images/train/huge_mask.jpg").write_bytes((demo_copy / "images/train/train_00001.jpg").read_bytes())
    (demo_copy / "masks/train/huge_mask.png").write_bytes(png_claiming(20000, 20000))
    flags = ["--data-root", demo_copy, "--epochs", "1", "--sampler", "uniform", "--run-dir", tmp_path / "run"]
    assert train.main([str(f) for f in (*flags, *TINY_TRAIN_FLAGS)]) == 0
    assert "huge_mask.png: 20000x20000 mask has 400,000,000 pixels, over the limit" in caplog.text  # the scan
    summary = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch 1/1"))
    assert "train skipped 1 bad samples" in summary and "huge.png: 20000x20000 image" in summary


def test_max_pixels_sets_the_limit_for_inference_and_prepare_masks(trained_run, tiny_demo, tmp_path, caplog):
    folder = tmp_path / "inputs"
    shutil.copytree(tiny_demo / "images/val", folder)
    (folder / "bomb.png").write_bytes(png_claiming(30000, 30000))
    checkpoint = trained_run / "checkpoints/best.pt"
    result = run_in_process(
        inference.main, "--input_dir", folder, "--checkpoint", checkpoint, "--output_dir", tmp_path / "o"
    )
    assert result.returncode == 0 and "8 images segmented" in result.stdout and "1 unreadable" in result.stdout
    assert "bomb.png: 30000x30000 image" in caplog.text
    small = run_in_process(
        inference.main,
        "--input_dir",
        folder,
        "--checkpoint",
        checkpoint,
        "--output_dir",
        tmp_path / "o2",
        "--max-pixels",
        48 * 48 - 1,
    )
    assert small.returncode == 1 and "9 unreadable" in small.stdout  # 48x48 demo images are over 2303 pixels
    rendered = run_in_process(
        prepare_masks.main,
        "--images_dir",
        tiny_demo / "images/val",
        "--output_dir",
        tmp_path / "m",
        "--annotations_file",
        tiny_demo / "annotations/instances_val.json",
        "--max-pixels",
        2303,
        "--workers",
        0,
    )
    assert (
        rendered.returncode == 0 and "0 masks written" in rendered.stdout and "8 over --max-pixels" in rendered.stdout
    )


def test_a_file_name_that_is_not_utf8_is_shown_with_replacement_characters_and_still_read(
    trained_run, tiny_demo, tmp_path
):
    folder = tmp_path / "inputs"
    folder.mkdir()
    source = sorted((tiny_demo / "images/val").iterdir())[0]
    shutil.copy(source, os.fsencode(folder) + b"/caf\xe9.jpg")  # Latin-1 bytes: not valid UTF-8
    (folder / "bad.jpg").write_bytes(b"")
    open(os.fsencode(folder) + b"/bro\xefken.jpg", "wb").close()
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "inference.py"),
            "--input_dir",
            str(folder),
            "--output_dir",
            str(tmp_path / "out"),
            "--checkpoint",
            str(trained_run / "checkpoints/best.pt"),
        ],
        cwd=ROOT,
        capture_output=True,
        timeout=180,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )
    out, err = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, err
    assert "Traceback" not in err and "bro\ufffdken.jpg: unreadable image" in err
    assert "1 images segmented" in out
    assert os.path.exists(os.fsencode(tmp_path / "out" / "masks") + b"/caf\xe9.png")


@pytest.mark.parametrize(
    "main, flags, fragment",
    [
        (train.main, ["--dropout", "1.5"], "--dropout: '1.5' is not a number in [0, 1)"),
        (train.main, ["--lr", "-1"], "--lr: '-1' is not a number in (0, inf]"),
        (train.main, ["--lr", "nan"], "--lr: 'nan' is not a number"),
        (train.main, ["--image-size", "100000"], "--image-size: '100000' is larger than 8192"),
        (train.main, ["--ignore-value", "70000"], "--ignore-value: '70000' is not an integer from 0 to 65535"),
        (train.main, ["--widths", "64,1000000"], "--widths: '64,1000000' is not a comma-separated list"),
        (train.main, ["--seed", "-1"], "--seed: '-1' is not an integer from 0"),
        (train.main, ["--dice-weight", "-2"], "--dice-weight: '-2' is not a number in [0, inf]"),
        (train.main, ["--max-pixels", "0"], "--max-pixels: '0' is not a positive integer"),
        (train.main, ["--workers", "-1"], "--workers: '-1' is not auto or a whole number >= 0"),
        (train.main, ["--val-every", "0"], "--val-every: '0' is not auto or a positive integer"),
        (train.main, ["--in-channels", "2000"], "--in-channels: '2000' is not auto or an integer from 1 to 1024"),
        (inference.main, ["--input_dir", ".", "--batch-size", "0"], "--batch-size: '0' is not a positive integer"),
        (inference.main, ["--input_dir", ".", "--workers", "-1"], "--workers: '-1' is not a positive integer"),
        (
            prepare_masks.main,
            ["--images_dir", ".", "--annotations_file", "a", "--output_dir", "o", "--workers", "-2"],
            "--workers: '-2' is not a positive integer",
        ),
        (bench.main, ["--classes", "0"], "--classes: '0' is not a positive integer"),
        (bench.main, ["--warmup", "-1"], "--warmup: '-1' is not a positive integer"),
    ],
)
def test_impossible_flags_are_one_line_before_any_work(main, flags, fragment, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_in_process(main, *flags)
    assert_user_error(result, fragment)
    assert list(tmp_path.iterdir()) == []  # nothing was written


FULL_DISK = """
import resource, signal, sys
sys.path.insert(0, sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), int(sys.argv[2])))
import train
from cli import run_cli
sys.exit(run_cli(lambda: train.main(sys.argv[3:])))
"""


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_previous_checkpoints(tiny_demo, tmp_path):
    run_dir = tmp_path / "run"
    flags = ["--data-root", tiny_demo, "--run-dir", run_dir, "--save-every", "100", *TINY_TRAIN_FLAGS]
    assert train.main([str(f) for f in (*flags, "--epochs", "1")]) == 0
    last, best = run_dir / "checkpoints/last.pt", run_dir / "checkpoints/best.pt"
    before = {path: path.read_bytes() for path in (last, best)}
    limit = len(before[last]) // 2  # room for events and figures, not for a checkpoint
    result = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(ROOT), str(limit), *map(str, flags), "--epochs", "2", "--resume", "auto"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: {last}: cannot write (File too large)"
    assert {path: path.read_bytes() for path in (last, best)} == before
    assert load_checkpoint(last)["epoch"] == 1
    assert not [p.name for p in last.parent.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_atomic_writes_reach_the_disk_before_the_rename(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    target = tmp_path / "mask.png"
    with files.replace_atomically(target) as tmp:
        tmp.write_bytes(b"new")
        assert not target.exists()
    assert synced[0] == str(tmp) and synced[1] == str(tmp_path)  # the file's data, then the rename in its folder
    assert target.read_bytes() == b"new"


def foreign_checkpoint(trained_run, tmp_path, change) -> str:
    state = torch.load(trained_run / "checkpoints/last.pt", weights_only=True)
    change(state)
    path = tmp_path / "foreign.pt"
    torch.save(state, path)
    return path


@pytest.mark.parametrize(
    "change, fragment, on_resume",
    [
        (lambda s: s["model_args"].update(widths=[8, 16, 32, 64]), "foreign.pt: weight encoders.0.conv1.weight is", 0),
        (lambda s: s["model"].pop("head.bias"), "foreign.pt: no weight head.bias for a model", 1),
        (lambda s: s["model"].update(extra=torch.zeros(1)), "foreign.pt: weight extra does not belong", 1),
        (lambda s: s.update(model={}), "foreign.pt: holds no model weights", 1),
        (lambda s: s.update(model_args={"depth": 3}), "foreign.pt: model_args {'depth': 3} describe no model", 0),
    ],
)
def test_a_checkpoint_whose_weights_do_not_fit_is_one_line(change, fragment, on_resume, trained_run, tmp_path):
    """on_resume: --resume builds the model from the run's own flags, so only changed weights can disagree."""
    path = foreign_checkpoint(trained_run, tmp_path, change)
    folder = trained_run / "samples"
    assert_user_error(run_in_process(inference.main, "--input_dir", folder, "--checkpoint", path), fragment)
    if on_resume:
        result = run_in_process(train.main, "--resume", path, "--run-dir", tmp_path / "resumed", "--epochs", 3)
        assert_user_error(result, fragment)
    assert not (tmp_path / "resumed").exists()


def test_resuming_from_a_checkpoint_without_training_state_is_one_line(trained_run, tmp_path):
    path = foreign_checkpoint(trained_run, tmp_path, lambda s: s.pop("optimizer"))
    result = run_in_process(train.main, "--resume", path, "--run-dir", tmp_path / "r")
    assert_user_error(result, "foreign.pt: not a training checkpoint, cannot resume from it (no optimizer)")
    path = foreign_checkpoint(trained_run, tmp_path, lambda s: s["optimizer"]["param_groups"].append({}))
    result = run_in_process(train.main, "--resume", path, "--run-dir", tmp_path / "r", "--epochs", 3)
    assert_user_error(result, "foreign.pt: its optimizer state does not fit this run")


def test_an_image_claiming_huge_size_reads_nothing_past_its_header(tmp_path):
    """The limit is checked on the header, so a bomb costs no memory: PIL would allocate 400 MB to decode it."""
    from errors import BadSampleError
    from image_io import read_image

    path = tmp_path / "bomb.png"
    path.write_bytes(png_claiming(20000, 20000))
    with pytest.raises(BadSampleError, match="over the limit of 100,000,000"):
        read_image(path)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "ok.png")
    assert read_image(tmp_path / "ok.png", max_pixels=64)[0].shape == (8, 8, 3)
    with pytest.raises(BadSampleError, match="over the limit of 63"):
        read_image(tmp_path / "ok.png", max_pixels=63)


@pytest.mark.parametrize("value", [2_000_000_000, -3])
def test_a_32_bit_mask_with_values_no_label_can_have_is_a_bad_sample(value, tmp_path):
    from errors import BadSampleError
    from image_io import read_mask

    mask = np.zeros((8, 8), np.int32)
    mask[0, 0] = value
    Image.fromarray(mask, mode="I").save(tmp_path / "m.tif")
    with pytest.raises(BadSampleError, match=r"m\.tif: mask values .*labels must be 0\.\.65535"):
        read_mask(tmp_path / "m.tif")


def test_coco_entries_that_are_not_objects_are_counted_or_named(tiny_demo, tmp_path):
    import json

    coco = json.loads((tiny_demo / "annotations/instances_val.json").read_text())
    coco["annotations"].append(7)
    (tmp_path / "a.json").write_text(json.dumps(coco))
    flags = ["--images_dir", tiny_demo / "images/val", "--output_dir", tmp_path / "m", "--workers", 0]
    result = run_in_process(prepare_masks.main, *flags, "--annotations_file", tmp_path / "a.json")
    assert result.returncode == 0 and "8 masks written" in result.stdout
    assert "1 annotation that is not an object" in result.stdout
    coco["categories"].append({"id": "x"})
    (tmp_path / "b.json").write_text(json.dumps(coco))
    result = run_in_process(prepare_masks.main, *flags, "--annotations_file", tmp_path / "b.json")
    assert_user_error(result, "b.json: category {'id': 'x'} needs an integer id and a name")


@pytest.mark.parametrize("version", [1, 3, "x"])
def test_a_checkpoint_of_another_format_version_is_one_line_everywhere(version, trained_run, tmp_path):
    """Formats are told apart in one place (checkpoints.current_format): inference, export and --resume all refuse."""
    path = foreign_checkpoint(trained_run, tmp_path, lambda s: s.update(format_version=version))
    fragment = f"foreign.pt: checkpoint format version {version}; this version reads 2"
    folder = trained_run / "samples"
    assert_user_error(run_in_process(inference.main, "--input_dir", folder, "--checkpoint", path), fragment)
    assert_user_error(run_in_process(export.main, "--checkpoint", path, "--output", tmp_path / "m.onnx"), fragment)
    assert_user_error(run_in_process(train.main, "--resume", path, "--run-dir", tmp_path / "r"), fragment)
    with pytest.raises(ValueError, match=fragment):
        Predictor.from_checkpoint(path)
