import csv
import hashlib
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.classification import MulticlassJaccardIndex

from checkpoints import load_checkpoint
from conftest import ROOT, TINY_TRAIN_FLAGS, run_in_process
from image_io import read_mask
from labels import LabelMapping
from utils import Runtime


def run_inference(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "inference.py"), *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )


def folder_hashes(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture
def mixed_folder(tiny_demo, tmp_path):
    """Good images of odd sizes next to a zero-byte file and a text file named .jpg."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    sources = sorted((tiny_demo / "images/val").iterdir())
    Image.open(sources[0]).resize((70, 50)).save(folder / "wide.jpg")
    Image.open(sources[1]).resize((40, 64)).save(folder / "tall.png")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is not an image")
    return folder


def test_masks_at_original_size_with_original_values_and_inputs_untouched(trained_run, mixed_folder, tmp_path):
    before = folder_hashes(mixed_folder)
    out = tmp_path / "out"
    args = [
        "--input_dir",
        mixed_folder,
        "--checkpoint",
        trained_run / "checkpoints/best.pt",
        "--output_dir",
        out,
        "--workers",
        "0",
    ]
    result = run_inference(*args)
    assert result.returncode == 0, result.stderr
    assert folder_hashes(mixed_folder) == before
    assert re.search(r"empty\.jpg: unreadable image", result.stderr)
    assert re.search(r"notes\.jpg: unreadable image", result.stderr)
    assert "2 unreadable" in result.stdout
    values = set(LabelMapping.from_dict(load_checkpoint(trained_run / "checkpoints/best.pt")["mapping"]).values)
    for name, size in (("wide", (70, 50)), ("tall", (40, 64))):
        with Image.open(out / "masks" / f"{name}.png") as mask:
            assert mask.size == size
            assert set(np.unique(np.asarray(mask)).tolist()) <= values
        with Image.open(out / "overlays" / f"{name}.png") as overlay:
            assert overlay.size[1] >= size[1] and overlay.mode == "RGB"
    rerun = run_inference(*args)
    assert "0 images segmented" in rerun.stdout and "2 already done" in rerun.stdout


def test_evaluation_equals_torchmetrics_on_the_written_masks(trained_run, tiny_demo, tmp_path):
    out = tmp_path / "out"
    result = run_inference(
        "--input_dir",
        tiny_demo / "images/val",
        "--checkpoint",
        trained_run / "checkpoints/best.pt",
        "--output_dir",
        out,
        "--masks_dir",
        tiny_demo / "masks/val",
        "--tta",
        "--save-probs",
    )
    assert result.returncode == 0, result.stderr
    printed = float(re.search(r"mIoU (\d\.\d+)", result.stdout).group(1))
    mapping = LabelMapping.from_dict(load_checkpoint(trained_run / "checkpoints/best.pt")["mapping"])
    lut = mapping.lookup_table()
    jaccard = MulticlassJaccardIndex(mapping.num_classes, average="none", ignore_index=255)
    for truth in sorted((tiny_demo / "masks/val").glob("*.png")):
        pred = torch.from_numpy(lut[read_mask(out / "masks" / truth.name)].astype(np.int64))
        jaccard.update(pred, torch.from_numpy(lut[read_mask(truth)].astype(np.int64)))
    per_class = jaccard.compute()
    assert printed == pytest.approx(per_class[per_class.isfinite()].mean().item(), abs=1e-4)
    with open(out / "report.csv", newline="") as handle:
        report = list(csv.DictReader(handle))
    assert [row["class"] for row in report] == mapping.names
    for row, iou in zip(report, per_class.tolist(), strict=True):
        assert float(row["iou"]) == pytest.approx(iou, abs=1e-6) or float(row["pixels"]) == 0
    assert json.loads((out / "report.json").read_text())["miou"] == pytest.approx(printed, abs=1e-4)
    with Image.open(out / "confusion_matrix.png") as image:
        image.verify()
    probs = np.load(out / "probs" / f"{truth.stem}.npy")
    assert probs.dtype == np.float16 and probs.shape == (mapping.num_classes, 48, 48)
    np.testing.assert_allclose(probs.astype(np.float32).sum(0), 1, atol=1e-2)
    agree = probs.argmax(0) == lut[read_mask(out / "masks" / truth.name)]  # the mask is the probabilities' argmax
    assert agree.mean() > 0.99  # float16 rounding may break near-ties


@pytest.mark.parametrize(
    "make_args, message",
    [
        (
            lambda folder, ckpt: ["--input_dir", folder, "--checkpoint", ckpt, "--output_dir", folder / "out"],
            "must not be inside --input_dir",
        ),
        (lambda folder, ckpt: ["--input_dir", folder / "missing", "--checkpoint", ckpt], "missing: no such folder"),
        (
            lambda folder, ckpt: ["--input_dir", folder / "wide.jpg", "--checkpoint", ckpt],
            "wide.jpg: not a folder",
        ),
        (
            lambda folder, ckpt: ["--input_dir", folder, "--checkpoint", folder / "wide.jpg"],
            "not a loadable checkpoint",
        ),
        (
            lambda folder, ckpt: [
                "--input_dir",
                folder,
                "--checkpoint",
                ckpt,
                "--output_dir",
                folder.parent / "o",
                "--tile",
                64,
            ],
            "--tile applies to --mode slide only",
        ),
    ],
)
def test_user_mistakes_exit_2_and_write_nothing(trained_run, mixed_folder, make_args, message):
    before = folder_hashes(mixed_folder)
    result = run_inference(*make_args(mixed_folder, trained_run / "checkpoints/best.pt"))
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert folder_hashes(mixed_folder) == before


def test_a_folder_with_nothing_readable_exits_non_zero(trained_run, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"\xff\xd8\xff")
    result = run_inference(
        "--input_dir",
        folder,
        "--checkpoint",
        trained_run / "checkpoints/best.pt",
        "--output_dir",
        tmp_path / "out",
        "--workers",
        "0",
    )
    assert result.returncode == 1 and "a.jpg" in result.stderr


def test_recursive_mirrors_subfolders(trained_run, tiny_demo, tmp_path):
    folder = tmp_path / "nested"
    (folder / "a" / "b").mkdir(parents=True)
    sources = sorted((tiny_demo / "images/val").iterdir())
    shutil.copy(sources[0], folder / "top.jpg")
    shutil.copy(sources[1], folder / "a" / "b" / "deep.jpg")
    out = tmp_path / "out"
    args = ["--input_dir", folder, "--checkpoint", trained_run / "checkpoints/best.pt", "--output_dir", out]
    assert "1 images segmented" in run_inference(*args, "--workers", "0").stdout
    assert run_inference(*args, "--workers", "0", "--recursive").returncode == 0
    assert (out / "masks" / "top.png").is_file() and (out / "masks" / "a" / "b" / "deep.png").is_file()
    assert (out / "overlays" / "a" / "b" / "deep.png").is_file()


@pytest.mark.parametrize("mode", ["resize", "slide"])
def test_logged_val_miou_equals_inference_at_full_size(tiny_demo, tmp_path, mode):
    """One code path: validation scores each image at its own size exactly as inference.py --masks_dir does."""
    import inference
    import train

    run = tmp_path / "run"
    crop = ["--crop-size", "32"] if mode == "slide" else []
    flags = [*TINY_TRAIN_FLAGS, "--data-root", tiny_demo, "--epochs", "1", "--run-dir", run, "--precision", "fp32"]
    assert run_in_process(train.main, *flags, *crop).returncode == 0
    checkpoint = run / "checkpoints/last.pt"
    logged = load_checkpoint(checkpoint)["history"][-1]["miou"]
    result = run_in_process(
        inference.main,
        *("--input_dir", tiny_demo / "images/val", "--masks_dir", tiny_demo / "masks/val"),
        *("--checkpoint", checkpoint, "--output_dir", tmp_path / "out", "--precision", "fp32"),
    )
    assert result.returncode == 0, result.stderr
    assert ("sliding tiles 32 px high, up to 64 wide" in result.stdout) == (mode == "slide")  # the 32 px crop
    printed = float(re.search(r"mIoU (\d\.\d+)", result.stdout).group(1))
    assert abs(printed - logged) <= 1e-4


def test_bf16_predictor_agrees_with_fp32(trained_run, tiny_demo):
    """The bf16 path casts the folded model itself (no autocast): probabilities within 0.02, labels 99% equal."""
    from dataset import SegmentationFolder
    from predictor import Predictor

    cpu = torch.device("cpu")
    checkpoint = trained_run / "checkpoints" / "best.pt"
    fp32 = Predictor.from_checkpoint(checkpoint, Runtime(cpu, "fp32", channels_last=False))
    bf16 = Predictor.from_checkpoint(checkpoint, Runtime(cpu, "bf16", channels_last=True))
    assert next(bf16.network.parameters()).dtype == torch.bfloat16
    validation = SegmentationFolder(tiny_demo / "images/val", tiny_demo / "masks/val", None)
    images = torch.stack([validation[i][0] for i in range(len(validation))])
    reference = fp32.batch_logits(images).softmax(1)
    low = bf16.batch_logits(images).softmax(1)
    assert (low - reference).abs().max() < 0.02
    assert (low.max(1).indices == reference.max(1).indices).float().mean() > 0.99


def test_resize_decodes_a_pass_of_images_at_a_time_and_slide_one(tmp_path, monkeypatch):
    from predictions import Outputs, segment_folder
    from predictor import Predictor
    from sampling import Sampling

    for k in range(5):
        Image.fromarray(np.full((20, 30, 3), 40 * k, np.uint8)).save(tmp_path / f"{k}.png")
    mapping = LabelMapping([0, 1], ["background", "thing"], 255, False)
    seen = []
    original = Predictor.segment

    def counting(self, images, on_band=None):
        seen.append(len(images))
        return original(self, images, on_band)

    monkeypatch.setattr(Predictor, "segment", counting)
    inputs = sorted(tmp_path.glob("*.png"))
    for mode, expected in (("resize", [2, 2, 1]), ("slide", [1] * 5)):
        seen.clear()
        predictor = Predictor(
            torch.nn.Conv2d(3, 2, 1), mapping, Sampling(mode, 16, tile=16), Runtime(torch.device("cpu"))
        )
        result = segment_folder(predictor, inputs, tmp_path, Outputs(tmp_path / f"out-{mode}"))
        assert seen == expected and result.written == 5  # the CPU's default pass: 2 images
        assert len(list((tmp_path / f"out-{mode}" / "masks").glob("*.png"))) == 5


def test_the_write_queue_waits_only_while_its_images_pass_the_byte_limit(monkeypatch):
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import predictions

    monkeypatch.setattr(predictions, "WRITE_QUEUE_BYTES", 100)
    release, written = threading.Event(), []
    with ThreadPoolExecutor(max_workers=1) as pool:
        queue = predictions.WriteQueue(pool, torch.device("cpu"))
        queue.submit(60, lambda: (release.wait(10), written.append("first")))
        assert written == []  # under the limit: the write goes on while the caller segments the next image
        release.set()
        queue.submit(60, written.append, "second")  # 120 bytes waiting: the first is waited for
        assert written[0] == "first"
        queue.submit(150, written.append, "large")  # alone over the limit: written before submit returns
        assert written == ["first", "second", "large"] and not queue.pending
        queue.drain()
