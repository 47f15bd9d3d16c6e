"""The file system as a source of hostile input, beyond the entries the hostile table places in a folder: files that
change between the listing and the read, caches that must notice a change, folders that loop, and output folders
that are the input folder, read-only, or fill up mid-run (troubleshooting.md's file-system rows)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

import dataset
import export
import fetch_real_data
import inference
import labels
import listing
import prepare_masks
import train
from conftest import ROOT, TINY_TRAIN_FLAGS, run_in_process
from test_robustness import assert_user_error


@pytest.fixture
def demo_copy(tiny_demo, tmp_path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(tiny_demo, root)
    return root


def inputs_folder(tiny_demo: Path, tmp_path: Path, count: int = 3) -> Path:
    folder = tmp_path / "inputs"
    folder.mkdir()
    for path in sorted((tiny_demo / "images/val").iterdir())[:count]:
        shutil.copy(path, folder / path.name)
    return folder


def test_a_folder_whose_links_loop_is_listed_once_and_ends(tmp_path):
    (tmp_path / "a/b").mkdir(parents=True)
    for name in ("a/x.png", "a/b/y.png"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "a/b/up").symlink_to("..")  # a/b/up/b/up/... for ever to a naive walk
    (tmp_path / "a/self").symlink_to(".")
    listed = listing.list_images(tmp_path / "a", recursive=True)
    assert [p.relative_to(tmp_path).as_posix() for p in listed] == ["a/b/y.png", "a/x.png"]


def test_the_symlink_loop_regression_through_the_inference_script(trained_run, tiny_demo, tmp_path):
    """The case that reopened: `ln -s loop.jpg loop.jpg` beside the images, through the script itself."""
    folder = inputs_folder(tiny_demo, tmp_path, count=1)
    (folder / "loop.jpg").symlink_to("loop.jpg")
    result = subprocess.run(
        [sys.executable, "inference.py", "--input_dir", folder, "--checkpoint", trained_run / "checkpoints/best.pt"]
        + ["--output_dir", tmp_path / "out"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "Traceback" not in result.stderr
    assert "loop.jpg: a symbolic link loop" in result.stderr and "1 images segmented" in result.stdout


def test_an_image_that_disappears_after_the_listing_is_a_counted_skip(trained_run, tiny_demo, tmp_path, monkeypatch):
    folder = inputs_folder(tiny_demo, tmp_path)
    listed = listing.list_images

    def listing_then_gone(path, recursive=False, slides=False):
        files = listed(path, recursive, slides)
        files[0].unlink()  # between the listing and the read
        files[1].write_bytes(files[1].read_bytes()[:100])  # truncated after the listing
        return files

    monkeypatch.setattr(inference, "list_images", listing_then_gone)
    checkpoint = trained_run / "checkpoints/best.pt"
    result = run_in_process(
        inference.main, "--input_dir", folder, "--checkpoint", checkpoint, "--output_dir", tmp_path / "o"
    )
    assert result.returncode == 0 and "1 images segmented" in result.stdout and "2 unreadable" in result.stdout


def test_a_training_image_that_disappears_after_the_listing_is_skipped_and_named(demo_copy, tmp_path, monkeypatch):
    paired = dataset.pair_files

    def pairs_then_gone(images_dir, masks_dir):
        pairs = paired(images_dir, masks_dir)
        if images_dir.name == "train":
            pairs[3][0].unlink()
        return pairs

    monkeypatch.setattr(dataset, "pair_files", pairs_then_gone)
    flags = ["--data-root", demo_copy, "--epochs", "1", "--sampler", "uniform", "--run-dir", tmp_path / "run"]
    result = run_in_process(train.main, *flags, *TINY_TRAIN_FLAGS)
    assert result.returncode == 0, result.stderr
    summary = next(line for line in result.stdout.splitlines() if line.startswith("epoch 1/1"))
    assert "train skipped 1 bad samples" in summary and "train_00003.jpg: no such image file" in summary


def test_the_label_cache_notices_a_mask_rewritten_with_its_old_size_and_time(tmp_path, monkeypatch):
    """Tools that copy with `cp -p` or `rsync -t` set the modification time back; the change time cannot be."""
    masks = [tmp_path / f"m{i}.tif" for i in range(2)]
    for path in masks:
        tifffile.imwrite(path, np.zeros((8, 8), np.uint8))
    assert labels.scan_masks(masks)["m0.tif"] == {0: 64}
    before = os.stat(masks[0])
    tifffile.imwrite(masks[0], np.full((8, 8), 3, np.uint8))  # uncompressed: the same size
    os.utime(masks[0], ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(masks[0]).st_size == before.st_size and os.stat(masks[0]).st_mtime_ns == before.st_mtime_ns
    assert labels.scan_masks(masks)["m0.tif"] == {3: 64}


def test_a_fifo_under_the_cache_name_is_passed_over_not_read(tmp_path):
    mask = tmp_path / "m.png"
    Image.fromarray(np.ones((4, 4), np.uint8)).save(mask)
    os.mkfifo(tmp_path / labels.SCAN_CACHE_NAME)  # reading it would wait for a writer for ever
    assert labels.scan_masks([mask]) == {"m.png": {1: 16}}
    assert (tmp_path / labels.SCAN_CACHE_NAME).is_file()  # replaced by the cache


def test_an_output_folder_that_is_the_input_folder_is_refused_before_any_work(trained_run, tiny_demo, tmp_path):
    folder = inputs_folder(tiny_demo, tmp_path)
    before = sorted(folder.iterdir())
    checkpoint = trained_run / "checkpoints/best.pt"
    result = run_in_process(inference.main, "--input_dir", folder, "--checkpoint", checkpoint, "--output_dir", folder)
    assert_user_error(result, "--output_dir must not be inside --input_dir")
    coco = tmp_path / "a.json"
    coco.write_text('{"images": [], "annotations": [], "categories": []}')
    flags = ["--images_dir", folder, "--annotations_file", coco, "--output_dir", folder]
    assert_user_error(run_in_process(prepare_masks.main, *flags), "must not be inside the images folder")
    assert sorted(folder.iterdir()) == before


def output_flags(trained_run: Path, tiny_demo: Path, out: Path) -> dict[str, list]:
    """Each entry point that writes, with its output under out."""
    checkpoint = trained_run / "checkpoints/best.pt"
    coco = trained_run.parent / "empty-coco.json"
    coco.write_text('{"images": [], "annotations": [], "categories": []}')
    return {
        "inference": ["--input_dir", tiny_demo / "images/val", "--checkpoint", checkpoint, "--output_dir", out],
        "train": ["--data-root", tiny_demo, "--epochs", "1", "--run-dir", out / "run", *TINY_TRAIN_FLAGS],
        "prepare_masks": ["--images_dir", tiny_demo / "images/val", "--annotations_file", coco, "--output_dir", out],
        "export": ["--checkpoint", checkpoint, "--output", out / "m.onnx"],
        "fetch_real_data": ["--out", out],
    }


MAINS = {
    "inference": inference.main,
    "train": train.main,
    "prepare_masks": prepare_masks.main,
    "export": export.main,
    "fetch_real_data": fetch_real_data.main,
}
FLAG = {"inference": "--output_dir", "train": "--run-dir", "prepare_masks": "--output_dir", "export": "--output"}


@pytest.mark.parametrize("script", MAINS)
def test_an_output_path_through_a_link_loop_or_a_file_is_one_line(script, trained_run, tiny_demo, tmp_path):
    (tmp_path / "loop").symlink_to("loop")
    (tmp_path / "file").touch()
    for blocker, what in ((tmp_path / "loop", "a symbolic link loop"), (tmp_path / "file", "a file")):
        flags = output_flags(trained_run, tiny_demo, blocker / "out")
        result = run_in_process(MAINS[script], *flags[script])
        assert_user_error(result, f"{blocker} is {what}, not a folder", FLAG.get(script, "--out"))


READ_ONLY_RUN = """
import json, sys
sys.path.insert(0, sys.argv[1])
from conftest import run_in_process
import export, fetch_real_data, inference, prepare_masks, train
flags = json.loads(sys.argv[2])
results = {name: run_in_process(sys.modules[name].main, *args) for name, args in flags.items()}
print(json.dumps({name: [r.returncode, r.stderr] for name, r in results.items()}))
"""


def test_a_read_only_output_folder_is_one_line_before_any_work(trained_run, tiny_demo, tmp_path):
    """A read-only mount (root writes through a folder's permissions, so a bind mount makes it read-only for real;
    another user gets a folder without write permission)."""
    import json

    out = tmp_path / "ro"
    out.mkdir()
    flags = {name: list(map(str, args)) for name, args in output_flags(trained_run, tiny_demo, out / "x").items()}
    script = [sys.executable, "-c", READ_ONLY_RUN, str(ROOT / "tests"), json.dumps(flags)]
    if os.geteuid() == 0:
        if shutil.which("unshare") is None:
            pytest.skip("root without unshare: no way to make a read-only folder")
        mount = f'mount --bind -o ro {out} {out} && exec "$@"'
        script = ["unshare", "--mount", "sh", "-c", mount, "sh", *script]
    else:
        out.chmod(0o555)
    result = subprocess.run(script, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if result.returncode != 0 and "unshare" in result.stderr:
        pytest.skip(f"no mount namespace here: {result.stderr.strip()}")
    for name, (code, stderr) in json.loads(result.stdout.splitlines()[-1]).items():
        assert code == 2 and "Traceback" not in stderr, (name, stderr)
        last = stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: {FLAG.get(name, '--out')} {out / 'x'}") and "cannot write there" in last
    assert list(out.iterdir()) == []


FULL_DISK = """
import resource, signal, sys
sys.path.insert(0, sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), int(sys.argv[2])))
import inference
from cli import run_cli
sys.exit(run_cli(lambda: inference.main(sys.argv[3:])))
"""


def test_a_disk_that_fills_mid_run_keeps_what_was_written_and_a_rerun_finishes(trained_run, tmp_path):
    """A small image's files fit under the file-size limit, a large one's overlay does not: the run stops on one
    line naming that file, the small image's files stay, and a run with room does only what is left."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), np.uint8)).save(folder / "a_small.png")
    Image.fromarray(rng.integers(0, 256, (400, 400, 3), np.uint8)).save(folder / "b_large.png")
    out = tmp_path / "out"
    flags = ["--input_dir", folder, "--checkpoint", trained_run / "checkpoints/best.pt", "--output_dir", out]
    limit = 64 * 1024  # the small overlay is a few KB, the large one hundreds
    result = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(ROOT), str(limit), *map(str, flags)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {out}/") and last.endswith("/b_large.png: cannot write (File too large)")
    written = {p.relative_to(out).as_posix() for p in out.rglob("*.png")}
    assert {"masks/a_small.png", "overlays/a_small.png"} <= written and "overlays/b_large.png" not in written
    assert not [p for p in out.rglob(".*") if p.is_file()]  # no temporary left behind
    rerun = run_in_process(inference.main, *flags)
    assert rerun.returncode == 0 and "1 images segmented" in rerun.stdout and "1 already done" in rerun.stdout


@pytest.mark.parametrize(
    "script, flags",
    [
        (train.main, ["--data-root", "{loop}"]),
        (
            train.main,
            ["--train-coco", "{loop}", "--train-images", "{tmp}", "--val-images", "{tmp}", "--val-masks", "{tmp}"],
        ),
        (train.main, ["--config", "{fifo}"]),
        (inference.main, ["--input_dir", "{loop}"]),
        (inference.main, ["--input_dir", "{fifo}"]),
        (export.main, ["--checkpoint", "{fifo}"]),
        (prepare_masks.main, ["--images_dir", "{loop}", "--annotations_file", "{fifo}", "--output_dir", "{tmp}/o"]),
        (prepare_masks.main, ["--images_dir", "{tmp}", "--annotations_file", "{fifo}", "--output_dir", "{tmp}/../o"]),
    ],
)
def test_a_flag_that_names_a_link_loop_or_a_fifo_is_one_line(script, flags, tmp_path):
    (tmp_path / "loop").symlink_to("loop")
    os.mkfifo(tmp_path / "fifo")
    paths = {"loop": tmp_path / "loop", "fifo": tmp_path / "fifo", "tmp": tmp_path}
    result = run_in_process(script, *(flag.format(**paths) for flag in flags))
    assert_user_error(result)
    assert "a symbolic link loop, not a" in result.stderr or "a named pipe, which would block a reader" in result.stderr
