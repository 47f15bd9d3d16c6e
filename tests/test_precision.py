"""Every precision and memory-format path computes what fp32 NCHW computes, within stated tolerances."""

import pytest
import torch

from losses import build_loss
from model import ResidualAttnUNet
from train import train_step
from utils import autocast, resolve_precision, UserError

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
    losses = [train_step(model, images, masks, loss_fn, optimizer, scaler, CPU, "bf16").item() for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0]


def test_precision_auto_and_fp16_rules():
    assert resolve_precision("auto", CPU) in ("bf16", "fp32")
    assert resolve_precision("fp32", CPU) == "fp32"
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        resolve_precision("fp16", CPU)


def test_compiled_model_matches_eager():
    torch.manual_seed(0)
    model = ResidualAttnUNet(3, 3, (4, 8)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model)(x), model(x), rtol=1e-4, atol=1e-4)
