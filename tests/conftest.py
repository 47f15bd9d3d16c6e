import contextlib
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cli import run_cli  # noqa: E402
from demo import make_demo_data  # noqa: E402


def run_in_process(main, *args) -> subprocess.CompletedProcess:
    """What `python script.py ARGS` does (sys.exit(run_cli(main))), without a new interpreter's start-up.

    A raw traceback would surface here as the exception itself, so the test fails on it as it would on stderr.
    """
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = run_cli(lambda: main([str(a) for a in args]))
        except SystemExit as stop:  # argparse exits on a malformed flag
            code = stop.code
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> Path:
    """A small copy of the built-in demo: 24 training and 8 validation images of 48 px."""
    return make_demo_data(tmp_path_factory.mktemp("data") / "demo", num_train=24, num_val=8, size=48, seed=1)


TINY_TRAIN_FLAGS = [
    "--image-size",
    "32",
    "--crop-size",
    "0",
    "--min-epoch-samples",
    "0",
    "--widths",
    "4,8,16,32",
    "--batch-size",
    "4",
    "--workers",
    "0",
    "--augment",
    "none",
    "--lr",
    "3e-3",
    "--val-every",
    "1",  # auto would choose from timings, which vary from run to run
]


@pytest.fixture(scope="session")
def trained_run(tiny_demo, tmp_path_factory) -> Path:
    """A 2-epoch run on the tiny demo; tests read its checkpoints, events and figures."""
    import train

    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    assert (
        train.main(
            [
                "--data-root",
                str(tiny_demo),
                "--epochs",
                "2",
                "--save-every",
                "1",
                "--run-dir",
                str(run_dir),
                *TINY_TRAIN_FLAGS,
            ]
        )
        == 0
    )
    return run_dir


def same_numerics(run_args: dict) -> list[str]:
    """The flags that give a new run the precision and layout an earlier run measured (its checkpoint's args): a
    fresh run measures its own, and on a tiny model the fastest may differ from one start to the next."""
    layout = "--channels-last" if run_args["channels_last"] else "--no-channels-last"
    return ["--precision", run_args["precision"], layout]


def add_instance_masks(root: Path) -> Path:
    """masks_instance/ beside masks/: each connected piece of foreground an object, with ids past 255."""
    for split in ("train", "val"):
        (root / "masks_instance" / split).mkdir(parents=True)
        for path in sorted((root / "masks" / split).glob("*.png")):
            ids, _ = ndimage.label(np.asarray(Image.open(path)) > 0)
            Image.fromarray((np.where(ids > 0, ids + 1000, 0)).astype(np.uint16)).save(
                root / "masks_instance" / split / path.name
            )
    return root
