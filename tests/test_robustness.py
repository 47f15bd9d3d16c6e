"""Bad input, interrupted runs and unsafe files: each gets a clear message and loses nothing."""

import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from checkpoints import load_checkpoint
from conftest import ROOT, TINY_TRAIN_FLAGS, run_in_process, same_numerics


def run_train(*args, timeout=180):
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_user_error(result, *fragments):
    """Exit 2; the message is the last line of stderr (warnings may come before it), no traceback."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in last


@pytest.fixture
def demo_copy(tiny_demo, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_demo, root)
    return root


@pytest.fixture
def broken_demo(demo_copy):
    """The tiny demo plus four training samples that cannot be read and one colour mask."""
    images, masks = demo_copy / "images/train", demo_copy / "masks/train"
    good = (images / "train_00000.jpg").read_bytes()
    (images / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (images / "empty.jpg").write_bytes(b"")
    (images / "text.jpg").write_text("not a picture")
    shutil.copy(images / "train_00001.jpg", images / "small_mask.jpg")
    for name in ("truncated", "empty", "text"):
        shutil.copy(masks / "train_00000.png", masks / f"{name}.png")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(masks / "small_mask.png")
    shutil.copy(images / "train_00002.jpg", images / "colour_mask.jpg")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(
        masks / "colour_mask.png"
    )
    return demo_copy


def test_bad_samples_are_skipped_and_reported_every_epoch(broken_demo, tmp_path, capsys, caplog):
    # 24 good + 4 bad samples, uniform sampling, batch 4: every sample is drawn once an epoch.
    assert (
        train.main(
            [
                "--data-root",
                str(broken_demo),
                "--epochs",
                "1",
                "--sampler",
                "uniform",
                "--run-dir",
                str(tmp_path / "run"),
                *TINY_TRAIN_FLAGS,
            ]
        )
        == 0
    )
    out = capsys.readouterr()
    assert "colour_mask.png: colour (RGB) mask" in caplog.text  # reported by the scan, up front
    assert "1 bad masks left out" in caplog.text
    summary = next(line for line in out.out.splitlines() if line.startswith("epoch 1/1"))
    assert "train skipped 4 bad samples" in summary
    for name in ("truncated.jpg", "empty.jpg", "text.jpg", "small_mask.png: mask is 10x10"):
        assert name in summary, summary


def test_strict_turns_a_bad_sample_into_an_error(broken_demo, tmp_path):
    result = run_in_process(
        train.main,
        "--data-root",
        broken_demo,
        "--epochs",
        "1",
        "--sampler",
        "uniform",
        "--strict",
        "--run-dir",
        tmp_path / "run",
        *TINY_TRAIN_FLAGS,
    )
    assert_user_error(result)
    assert any(name in result.stderr for name in ("truncated.jpg", "empty.jpg", "text.jpg", "small_mask.png"))


def test_a_bad_validation_image_is_left_out_not_counted_twice(demo_copy, tmp_path, capsys):
    (demo_copy / "images/val/val_00003.jpg").write_bytes(b"")
    assert (
        train.main(
            ["--data-root", str(demo_copy), "--epochs", "1", "--run-dir", str(tmp_path / "run"), *TINY_TRAIN_FLAGS]
        )
        == 0
    )
    assert "val skipped 1 bad samples" in capsys.readouterr().out
    state = load_checkpoint(tmp_path / "run/checkpoints/last.pt")
    assert math.isfinite(state["history"][0]["val_loss"])


@pytest.mark.parametrize(
    "case",
    [
        "empty folder",
        "root is a file",
        "unknown val value",
        "batch too large",
        "resume a folder",
        "truncated checkpoint",
        "other widths",
        "other classes",
        "coco is a folder",
        "negative size",
        "demo style with data",
    ],
)
def test_user_mistakes_get_one_line_and_exit_2(case, demo_copy, trained_run, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    last = trained_run / "checkpoints" / "last.pt"
    args, fragments = {
        "empty folder": (
            ["--train-images", empty, "--train-masks", empty, "--val-images", empty, "--val-masks", empty],
            ["no image/mask pairs", str(empty)],
        ),
        "root is a file": (["--data-root", last], ["--data-root", "last.pt: not a folder"]),
        "unknown val value": (["--data-root", demo_copy], ["val_00000.png: mask value 7 never occurs"]),
        "batch too large": (["--data-root", demo_copy, "--batch-size", "500"], ["--batch-size 500 is larger"]),
        "resume a folder": (["--resume", trained_run], ["names no checkpoint file"]),
        "truncated checkpoint": (["--resume", tmp_path / "cut.pt"], ["cut.pt: not a loadable checkpoint"]),
        "other widths": (["--resume", last, "--widths", "8,16"], ["trained with --widths 4,8,16,32, not 8,16"]),
        "other classes": (["--resume", last, "--binary"], ["trained with --binary False, not True"]),
        "coco is a folder": (
            [
                "--train-coco",
                empty,
                "--train-images",
                demo_copy / "images/train",
                "--val-images",
                demo_copy / "images/val",
                "--val-masks",
                demo_copy / "masks/val",
            ],
            ["a folder, not a regular file"],
        ),
        "negative size": (["--image-size", "-3"], ["--image-size: '-3' is not a positive integer"]),
        "demo style with data": (["--data-root", demo_copy, "--demo-style", "texture"], ["--demo-style", "data flags"]),
    }[case]
    if case == "unknown val value":
        mask = np.asarray(Image.open(demo_copy / "masks/val/val_00000.png")).copy()
        mask[0, 0] = 7
        Image.fromarray(mask).save(demo_copy / "masks/val/val_00000.png")
    if case == "truncated checkpoint":
        (tmp_path / "cut.pt").write_bytes(last.read_bytes()[:2000])
    run_dir = tmp_path / "run"
    result = run_in_process(train.main, *args, "--epochs", "1", "--run-dir", run_dir, "--workers", "0")
    assert_user_error(result, *fragments)
    assert not (run_dir / "checkpoints").exists()


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_forged_checkpoint_cannot_run_code(tmp_path, trained_run):
    Exploit.marker = tmp_path / "pwned"
    forged = tmp_path / "forged.pt"
    state = torch.load(trained_run / "checkpoints" / "last.pt", weights_only=True)
    state["payload"] = Exploit()
    torch.save(state, forged)
    for script, args in (
        ("train.py", ["--resume", forged]),
        ("inference.py", ["--input_dir", trained_run / "samples", "--checkpoint", forged]),
    ):
        result = subprocess.run(
            [sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert_user_error(result, "forged.pt: not a loadable checkpoint")
    assert not Exploit.marker.exists()


@pytest.mark.slow
def test_sigterm_saves_nothing_broken_and_resume_finishes_the_schedule(tiny_demo, tmp_path):
    run_dir = tmp_path / "run"
    flags = [
        "--data-root",
        tiny_demo,
        "--epochs",
        "6",
        "--run-dir",
        run_dir,
        "--image-size",
        "48",
        "--crop-size",
        "0",
        "--min-epoch-samples",
        "0",
        "--widths",
        "4,8,16,32",
        "--batch-size",
        "2",
        "--workers",
        "1",
        "--lr",
        "3e-3",
    ]
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *map(str, flags)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    last = run_dir / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)  # polls for the condition: the first epoch is saved
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert "stopped by SIGTERM during epoch" in err or "stopped by SIGTERM after epoch" in err
    stopped_at = load_checkpoint(last)["epoch"]
    assert 1 <= stopped_at < 6
    result = run_train(*flags[:-2], "--resume", "auto")
    assert result.returncode == 0, result.stderr
    state = load_checkpoint(last)
    assert state["epoch"] == 6
    assert [h["epoch"] for h in state["history"]] == [1, 2, 3, 4, 5, 6]
    events = EventAccumulator(str(run_dir))
    events.Reload()
    lrs = {e.step: e.value for e in events.Scalars("lr")}
    assert sorted(lrs) == [1, 2, 3, 4, 5, 6]
    for epoch, lr in lrs.items():
        assert lr == pytest.approx(3e-3 * (1 + math.cos(math.pi * (epoch - 1) / 6)) / 2, rel=1e-5)
    results = (run_dir / "results.csv").read_text().splitlines()
    assert [int(line.split(",")[0]) for line in results[1:]] == [1, 2, 3, 4, 5, 6]  # none twice, none missing
    # Same order, augmentation and RNG: the resumed run ends where an uninterrupted one does (at the same numerics).
    flags[flags.index("--run-dir") + 1] = tmp_path / "uninterrupted"
    assert run_train(*flags, *same_numerics(state["args"])).returncode == 0
    reference = load_checkpoint(tmp_path / "uninterrupted/checkpoints/last.pt")
    for name, tensor in reference["model"].items():
        torch.testing.assert_close(state["model"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_a_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_demo, tmp_path, monkeypatch, capsys):
    import model_setup

    real_build_loss = model_setup.build_loss

    class PoisonedAfterOneEpoch(torch.nn.Module):
        def __init__(self, loss):
            super().__init__()
            self.loss, self.calls = loss, 0

        def forward(self, logits, target):
            self.calls += 1
            value = self.loss(logits, target)
            return value * float("nan") if self.calls > 10 else value  # 3 memory-probe steps, epoch 1: 6

    def poisoned_after_one_epoch(*args, **kwargs):
        return PoisonedAfterOneEpoch(real_build_loss(*args, **kwargs))

    monkeypatch.setattr(model_setup, "build_loss", poisoned_after_one_epoch)
    run_dir = tmp_path / "run"
    assert (
        train.main(["--data-root", str(tiny_demo), "--epochs", "3", "--run-dir", str(run_dir), *TINY_TRAIN_FLAGS]) == 1
    )
    assert "non-finite loss at epoch 2, step 2" in capsys.readouterr().err
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
