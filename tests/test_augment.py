"""Joint augmentation keeps image and mask aligned; validation is never augmented; early stopping."""

import numpy as np
import pytest
import torch
from torchvision import tv_tensors

import plots
import train
from conftest import TINY_TRAIN_FLAGS
from dataset import IGNORE_INDEX, SegmentationFolder, build_transforms
from utils import load_checkpoint


def red_blue_sample(size=64):
    """Red pixels are class 1, blue ones class 0: the mask can be read back off the pixels."""
    rng = np.random.default_rng(0)
    mask = np.zeros((size, size), np.uint8)
    for _ in range(4):
        y, x = rng.integers(0, size - 20, 2)
        mask[y : y + 20, x : x + 14] = 1
    image = np.zeros((3, size, size), np.uint8)
    image[0][mask == 1] = 220
    image[2][mask == 0] = 220
    return tv_tensors.Image(torch.from_numpy(image)), tv_tensors.Mask(torch.from_numpy(mask))


def agreement(image, mask):
    """Share of labelled, clearly red-or-blue pixels whose colour says the same as the mask."""
    rgb = plots.denormalise(image).astype(np.float32) / 255
    red_minus_blue = torch.from_numpy(rgb[..., 0] - rgb[..., 2])
    decided = (mask != IGNORE_INDEX) & (red_minus_blue.abs() > 0.3)
    return ((red_minus_blue > 0).long()[decided] == mask[decided]).float().mean().item()


@pytest.mark.parametrize("augment", ["basic", "strong"])
def test_augmented_image_and_mask_stay_aligned(augment):
    transform = build_transforms(48, augment)
    torch.manual_seed(0)
    for _ in range(20):
        image, mask = transform(*red_blue_sample())
        assert agreement(image, mask) > 0.95
    misaligned = agreement(image, mask.flip(-1))  # the check can fail: a mask flipped alone disagrees
    assert misaligned < 0.8


def test_rotation_fills_new_mask_pixels_with_ignore():
    transform = build_transforms(32, "basic")
    image = tv_tensors.Image(torch.full((3, 32, 32), 128, dtype=torch.uint8))
    mask = tv_tensors.Mask(torch.ones(32, 32, dtype=torch.uint8))
    torch.manual_seed(0)
    seen = set()
    for _ in range(30):
        seen |= set(transform(image, mask)[1].unique().tolist())
    assert seen == {1, IGNORE_INDEX}  # never 0: a rotated-in corner is ignored, not background


def test_validation_data_is_not_augmented(tiny_demo):
    val = SegmentationFolder(tiny_demo / "images/val", tiny_demo / "masks/val", image_size=32)
    plain = build_transforms(32, "none")
    for index in range(3):
        expected_image, expected_mask = plain(*val.load(index))
        image, mask = val[index]
        assert torch.equal(image, expected_image) and torch.equal(mask, expected_mask.long())


def test_early_stop_stops_after_n_epochs_without_improvement(tiny_demo, tmp_path, monkeypatch, capsys):
    scripted = iter([0.5, 0.6, 0.6, 0.55, 0.7, 0.8])
    real_evaluate = train.evaluate

    def plateauing_evaluate(*args, **kwargs):
        loss, matrix, first_batch, skipped = real_evaluate(*args, **kwargs)
        metrics = matrix.compute()
        metrics["miou"] = next(scripted)
        matrix.compute = lambda: metrics
        return loss, matrix, first_batch, skipped

    monkeypatch.setattr(train, "evaluate", plateauing_evaluate)
    run_dir = tmp_path / "run"
    assert (
        train.main(
            [
                "--data-root",
                str(tiny_demo),
                "--epochs",
                "6",
                "--early-stop",
                "2",
                "--run-dir",
                str(run_dir),
                *TINY_TRAIN_FLAGS,
            ]
        )
        == 0
    )
    assert "early stop: no better val mIoU for 2 epochs (best 0.6000)" in capsys.readouterr().out
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert state["epoch"] == 4
    assert load_checkpoint(run_dir / "checkpoints" / "best.pt")["epoch"] == 2
    assert (run_dir / "samples" / "samples_epoch_004.png").is_file()


def test_dropout_is_in_the_bottleneck_and_decoder_only():
    from model import ResidualAttnUNet

    model = ResidualAttnUNet(3, 2, (4, 8), dropout=0.3)
    placed = {name.split(".")[0] for name, module in model.named_modules() if isinstance(module, torch.nn.Dropout2d)}
    assert placed == {"bottleneck", "decoders"}
