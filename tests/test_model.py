import math

import pytest
import torch

from dataset import SegmentationFolder
from metrics import ConfusionMatrix
from model import ResidualAttnUNet, SelfAttention2d, count_parameters

TINY = (4, 8, 16, 32)


def test_attention_equals_handwritten_softmax_qkt_v():
    torch.manual_seed(0)
    block = SelfAttention2d(32)
    with torch.no_grad():
        block.gate.fill_(0.7)
    x = torch.randn(2, 32, 5, 6)
    q = block.query(x).flatten(2).transpose(1, 2)
    k = block.key(x).flatten(2).transpose(1, 2)
    v = block.value(x).flatten(2).transpose(1, 2)
    weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
    expected = x + 0.7 * (weights @ v).transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


def test_attention_gate_starts_closed():
    block = SelfAttention2d(16)
    x = torch.randn(1, 16, 4, 4)
    assert torch.equal(block(x), x)


@pytest.mark.parametrize("size", [(64, 64), (96, 96), (100, 100), (37, 70)])
def test_output_has_the_input_size(size):
    model = ResidualAttnUNet(3, 4, TINY).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, *size))
    assert out.shape == (2, 4, *size)


def test_the_reference_widths_give_the_reference_design_size():
    from presets import REFERENCE_WIDTHS

    assert count_parameters(ResidualAttnUNet(3, 10, REFERENCE_WIDTHS)) == 33_748_939  # the reference design's count


def test_one_widths_default_for_the_model_and_train_py():
    from train_flags import get_args_parser

    assert tuple(ResidualAttnUNet().config["widths"]) == get_args_parser().get_default("widths")


@pytest.mark.slow
def test_tiny_model_overfits_four_images(tiny_demo):
    torch.manual_seed(0)
    data = SegmentationFolder(tiny_demo / "images/train", tiny_demo / "masks/train", image_size=48)
    images, masks = map(torch.stack, zip(*(data[i] for i in range(4)), strict=True))
    masks = masks.long()  # the dataset keeps masks uint8; the training loop widens them on the device
    model = ResidualAttnUNet(3, data.num_classes, (8, 16, 32, 64))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    untrained = score(model, images, masks, data.num_classes)
    for _ in range(200):
        loss = torch.nn.functional.cross_entropy(model(images), masks, ignore_index=255)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert untrained < 0.5  # what it scores is learned, not given by the set-up
    assert score(model, images, masks, data.num_classes) > 0.95


def score(model, images, masks, num_classes) -> float:
    model.eval()
    matrix = ConfusionMatrix(num_classes)
    with torch.no_grad():
        matrix.update(model(images).argmax(1), masks)
    model.train()
    return matrix.compute()["miou"]


def test_folding_batchnorm_keeps_the_outputs():
    torch.manual_seed(0)
    model = ResidualAttnUNet(3, 4, TINY)
    model(torch.randn(4, 3, 32, 32))  # training step: running statistics move away from their defaults
    model.eval()
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        expected = model(x)
        folded = model.fold_batchnorm()
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
        torch.testing.assert_close(folded(x), expected, rtol=1e-4, atol=1e-4)
