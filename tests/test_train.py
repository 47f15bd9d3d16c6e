import math
import subprocess
import sys

import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from checkpoints import load_checkpoint
from conftest import ROOT, TINY_TRAIN_FLAGS, run_in_process


def scalars(run_dir, tag):
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)}


def test_training_writes_checkpoints_events_and_figures(trained_run):
    state = torch.load(trained_run / "checkpoints" / "last.pt", weights_only=True)
    assert state["epoch"] == 2
    assert state["mapping"]["names"] == ["background", "ellipse", "rectangle", "triangle", "star"]
    assert set(state["model_args"]) == {"in_channels", "num_classes", "widths", "dropout"}
    best = load_checkpoint(trained_run / "checkpoints" / "best.pt")
    assert best["best_miou"] == max(h["miou"] for h in state["history"])
    miou = scalars(trained_run, "val/miou")
    assert sorted(miou) == [1, 2]
    assert miou[2] == pytest.approx(state["history"][1]["miou"], abs=1e-6)
    assert set(scalars(trained_run, "iou/star")) == {1, 2}
    for name in ("samples_epoch_002.png", "confusion_matrix_epoch_002.png"):
        with Image.open(trained_run / "samples" / name) as image:
            assert image.size[0] > 100
    with Image.open(trained_run / "curves.png") as image:
        image.verify()


def test_the_logged_val_miou_equals_a_fresh_evaluation_of_the_checkpoint(trained_run, tiny_demo):
    """The metric in the logs is what the saved weights score at each image's original size: the model on the
    resized image, its softmax upsampled whole with F.interpolate (not band by band), compared with the mask."""
    import torch.nn.functional as F
    from torchvision.transforms.v2 import functional as TF

    from dataset import SegmentationFolder, normalize_images
    from labels import LabelMapping
    from metrics import ConfusionMatrix
    from model import ResidualAttnUNet

    state = load_checkpoint(trained_run / "checkpoints" / "last.pt")
    mapping = LabelMapping.from_dict(state["mapping"])
    val = SegmentationFolder(tiny_demo / "images/val", tiny_demo / "masks/val", None, mapping=mapping)
    model = ResidualAttnUNet(**state["model_args"])
    model.load_state_dict(state["model"])
    model.eval()
    matrix = ConfusionMatrix(val.num_classes)
    size = [state["image_size"]] * 2
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=state["args"]["precision"] != "fp32"):
        for i in range(len(val)):
            image, mask = val[i]
            assert image.shape[-2:] == mask.shape == (48, 48)  # the original size, not the training square
            x = normalize_images()(TF.resize(image, size, antialias=True))[None]
            probs = model(x.contiguous(memory_format=torch.channels_last)).float().softmax(1)
            full = F.interpolate(probs, size=mask.shape, mode="bilinear", align_corners=False)
            matrix.update(full.argmax(1)[0], mask)
    assert matrix.compute()["miou"] == pytest.approx(state["history"][-1]["miou"], abs=1e-4)


@pytest.mark.slow
def test_resume_continues_at_the_next_epoch_with_the_scheduled_learning_rate(trained_run, tmp_path):
    run_dir = tmp_path / "resumed"
    assert (
        train.main(
            ["--resume", str(trained_run / "checkpoints" / "epoch_001.pt"), "--epochs", "2", "--run-dir", str(run_dir)]
        )
        == 0
    )
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert [h["epoch"] for h in state["history"]] == [1, 2]
    lr = scalars(run_dir, "lr")
    assert sorted(lr) == [2]  # epoch 1 is not trained again
    base = state["args"]["lr"]
    assert lr[2] == pytest.approx(base * (1 + math.cos(math.pi * 1 / 2)) / 2)


@pytest.mark.slow
def test_resume_auto_with_more_epochs_continues_the_same_run(tiny_demo, tmp_path):
    run_dir = tmp_path / "run"
    common = ["--data-root", str(tiny_demo), "--run-dir", str(run_dir), *TINY_TRAIN_FLAGS]
    assert train.main([*common, "--epochs", "1"]) == 0
    assert train.main([*common, "--epochs", "2", "--resume", "auto"]) == 0
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert state["epoch"] == 2 and len(state["history"]) == 2
    assert sorted(scalars(run_dir, "val/miou")) == [1, 2]


def run_script(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--image-size", "0"], "--image-size: '0' is not a positive integer"),
        (["--widths", "64,,128"], "--widths: '64,,128' is not a comma-separated list"),
        (["--data-root", "/nonexistent/data"], "--data-root /nonexistent/data: no such folder"),
    ],
)
def test_user_mistakes_exit_2_with_one_line_and_no_traceback(flags, message):
    result = run_in_process(train.main, *flags, "--epochs", "1")
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_an_existing_run_is_never_overwritten(trained_run):
    before = (trained_run / "checkpoints" / "last.pt").read_bytes()
    result = run_script("--run-dir", str(trained_run), "--epochs", "1")
    assert result.returncode == 2 and "already holds a run" in result.stderr
    assert (trained_run / "checkpoints" / "last.pt").read_bytes() == before


@pytest.mark.slow
def test_compiled_training_says_what_its_first_step_cost_and_saves_plain_weights(tiny_demo, tmp_path, capsys):
    run_dir = tmp_path / "compiled"
    flags = ["--data-root", str(tiny_demo), "--epochs", "1", "--run-dir", str(run_dir), "--compile"]
    assert train.main([*flags, *TINY_TRAIN_FLAGS]) == 0
    assert "first step, torch.compile included:" in capsys.readouterr().out
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert not any(name.startswith("_orig_mod") for name in state["model"])  # loads into an uncompiled model
