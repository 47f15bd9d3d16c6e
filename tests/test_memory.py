"""A run that cannot fit says so before it starts; the probe reads real peaks; gradient checkpointing."""

import subprocess
import sys

import pytest
import torch

import memory
from conftest import ROOT, TINY_TRAIN_FLAGS
from errors import UserError
from memory import StepMemory, check_fits
from model import ResidualAttnUNet

PROBE_A_KNOWN_STEP = """
import sys
sys.path.insert(0, sys.argv[1])
import numpy as np
import torch
from memory import probe_step

def step(side):  # touches 3000 bytes per sample-pixel, then frees them
    block = np.ones(2 * side * side * 3000 // 8)
    assert block.sum() > 0

measured = probe_step(step, torch.device("cpu"), 64)
print("unsupported" if measured is None else f"{measured.per_pixel} {measured.fixed}")
"""


def test_the_probe_reads_a_steps_peak_per_pixel():
    """In a fresh process: a long-lived one has freed heap memory that the step would reuse unseen."""
    result = subprocess.run(
        [sys.executable, "-c", PROBE_A_KNOWN_STEP, str(ROOT)], capture_output=True, text=True, check=True
    )
    if result.stdout.strip() == "unsupported":
        pytest.skip("no /proc/self/clear_refs here")
    per_pixel, fixed = map(float, result.stdout.split())
    assert per_pixel == pytest.approx(3000, rel=0.1)
    assert fixed < 8 * 2**20


def test_the_error_names_the_largest_batch_that_fits():
    needs = StepMemory(fixed=2**30, per_pixel=1000)
    with pytest.raises(UserError) as error:
        check_fits(
            needs, batch_size=8, side=256, available=int(1.3 * 2**30), size_flag="--image-size", grad_checkpoint=False
        )
    message = str(error.value)
    assert "--batch-size 8 at 256 px needs about 1.5 GiB" in message and "1.3 GiB is available" in message
    largest = needs.largest_batch(256 * 256, memory.HEADROOM * 1.3 * 2**30)
    assert largest == 1 and "use --batch-size 1 or --grad-checkpoint or a smaller --image-size" in message
    assert needs.bytes_for(largest, 256 * 256) <= memory.HEADROOM * 1.3 * 2**30 < needs.bytes_for(2, 256 * 256)
    fits = check_fits(needs, batch_size=1, side=256, available=2**31, size_flag="--image-size", grad_checkpoint=True)
    assert "needs about 1.1 GiB of the 2.0 GiB available" in fits


SMALL_MACHINE = """
import sys
sys.path.insert(0, sys.argv[1])
import memory, train
from cli import run_cli
memory.available_bytes = lambda device: 2**20  # an artificially small machine: 1 MiB
sys.exit(run_cli(lambda: train.main(sys.argv[2:])))
"""


def test_a_run_that_cannot_fit_stops_before_the_first_epoch(tiny_demo, tmp_path):
    """In a process of its own: a long-lived one (pytest) has freed memory in its heap that a probe reuses."""
    run = tmp_path / "run"
    flags = ["--data-root", tiny_demo, "--run-dir", run, *TINY_TRAIN_FLAGS]
    command = [sys.executable, "-c", SMALL_MACHINE, str(ROOT), *map(str, flags)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--batch-size 4 at 32 px needs about" in lines[0] and "--grad-checkpoint" in lines[0]
    assert not (run / "checkpoints").exists()


def test_gradient_checkpointing_gives_the_same_gradients_and_recomputes_blocks(monkeypatch):
    import model as model_module

    calls = []
    forward = model_module.ResidualBlock.forward
    monkeypatch.setattr(model_module.ResidualBlock, "forward", lambda self, x: calls.append(1) or forward(self, x))
    torch.manual_seed(0)
    plain = ResidualAttnUNet(3, 3, (4, 8, 16))
    checkpointed = ResidualAttnUNet(3, 3, (4, 8, 16))
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.grad_checkpoint = True
    images, masks = torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32))
    counts = []
    for model in (plain, checkpointed):
        calls.clear()
        torch.nn.functional.cross_entropy(model(images), masks).backward()
        counts.append(len(calls))
    assert counts[1] == 2 * counts[0]  # every block's forward, and its recomputation in backward
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)
