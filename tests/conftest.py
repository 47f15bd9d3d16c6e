import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dataset import make_demo_data  # noqa: E402


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> Path:
    """A small copy of the built-in demo: 24 training and 8 validation images of 48 px."""
    return make_demo_data(tmp_path_factory.mktemp("data") / "demo", num_train=24, num_val=8, size=48, seed=1)


TINY_TRAIN_FLAGS = [
    "--image-size",
    "32",
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
