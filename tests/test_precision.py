"""Every precision and memory-format path computes what fp32 NCHW computes, within stated tolerances;
the CPU allocator setting does what it is there for."""

import subprocess
import sys

import pytest
import torch

import utils
from conftest import ROOT
from engine import train_step
from errors import UserError
from losses import build_loss
from model import ResidualAttnUNet
from utils import Runtime, autocast, resolve_precision

CPU = torch.device("cpu")


def outputs(precision: str, channels_last: bool) -> torch.Tensor:
    torch.manual_seed(0)
    model = ResidualAttnUNet(3, 5, (8, 16, 32, 64)).eval()
    x = torch.randn(2, 3, 48, 48)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), autocast(CPU, precision):
        return model(x).float()


def test_channels_last_equals_nchw_in_fp32():
    torch.testing.assert_close(outputs("fp32", True), outputs("fp32", False), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("channels_last", [False, True])
def test_bf16_stays_within_two_percent_of_fp32(channels_last):
    """Tolerance: bf16 keeps 8 bits of mantissa, so errors of a few 1e-3 per layer add up to ~1e-2."""
    reference, low = outputs("fp32", False), outputs("bf16", channels_last)
    relative = (low - reference).norm() / reference.norm()
    assert relative < 0.02
    assert (low.argmax(1) == reference.argmax(1)).float().mean() > 0.95


def test_training_in_bf16_reduces_the_loss():
    torch.manual_seed(0)
    model = ResidualAttnUNet(3, 3, (8, 16, 32, 64)).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, fused=True)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    images = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    masks = (images[:, 0] > 0).long() + (images[:, 1] > 1).long()
    loss_fn = build_loss("dice_ce")
    parts = {"loss_fn": loss_fn, "optimizer": optimizer, "scaler": scaler, "runtime": Runtime(CPU, "bf16")}
    losses = [train_step(model, images, masks, **parts).item() for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0]


def test_precision_auto_and_fp16_rules(monkeypatch):
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(utils, "cpu_has_native_bf16", lambda native=native: native)
        assert resolve_precision("auto", CPU) == expected
    assert resolve_precision("fp32", CPU) == "fp32"
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        resolve_precision("fp16", CPU)


@pytest.mark.slow
def test_compiled_model_matches_eager():
    torch.manual_seed(0)
    model = ResidualAttnUNet(3, 3, (4, 8)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model)(x), model(x), rtol=1e-4, atol=1e-4)


PAGE_FAULT_PROBE = """
import resource, sys
import torch
sys.path.insert(0, sys.argv[2])
from utils import keep_freed_cpu_memory
if sys.argv[1] == "keep" and not keep_freed_cpu_memory(torch.device("cpu")):
    print("unsupported")
    raise SystemExit
x = torch.randn(16 * 2**20)  # 64 MB: above glibc's largest mmap threshold


def page_faults_of_a_few_elementwise_ops():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        doubled = x * 2
        torch.nn.functional.silu(doubled + x)
        del doubled
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


print([page_faults_of_a_few_elementwise_ops() for _ in range(3)][-1])
"""


def test_kept_memory_serves_new_large_tensors_without_page_faults():
    """By default every new 64 MB tensor is a fresh mmap: 16,384 pages faulted in, twelve times a round."""
    faults = {}
    for mode in ("default", "keep"):
        result = subprocess.run(
            [sys.executable, "-c", PAGE_FAULT_PROBE, mode, str(ROOT)], capture_output=True, text=True, check=True
        )
        if result.stdout.strip() == "unsupported":
            pytest.skip("this C library has no mallopt")
        faults[mode] = int(result.stdout)
    assert faults["default"] > 100_000
    # Kept memory is reused; now and then the heap still grows by one tensor (16,384 faults) in a round.
    assert faults["keep"] < faults["default"] / 4
