"""Joint augmentation keeps image and mask aligned; validation is never augmented; early stopping."""

import numpy as np
import pytest
import torch
from torchvision import tv_tensors

import train
from checkpoints import load_checkpoint
from conftest import TINY_TRAIN_FLAGS
from dataset import SegmentationFolder
from intensity import Normalization
from labels import IGNORE_INDEX
from stopping import EarlyStopping
from transforms import Crop, build_transforms


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
    rgb = image.permute(1, 2, 0).numpy()  # 0..1, not normalised
    red_minus_blue = torch.from_numpy(rgb[..., 0] - rgb[..., 2])
    decided = (mask != IGNORE_INDEX) & (red_minus_blue.abs() > 0.3)
    return ((red_minus_blue > 0).long()[decided] == mask[decided]).float().mean().item()


@pytest.mark.parametrize("augment", ["basic", "strong", "crop"])
def test_augmented_image_and_mask_stay_aligned(augment):
    if augment == "crop":  # native-resolution crops, rescaled first, then today's basic augmentation
        transform = build_transforms(48, "basic", Normalization.none(3), crop=Crop(40, (0.5, 2.0)))
    else:
        transform = build_transforms(48, augment, Normalization.none(3))
    torch.manual_seed(0)
    for _ in range(20):
        image, mask = transform(*red_blue_sample())
        assert agreement(image, mask) > 0.95
    misaligned = agreement(image, mask.flip(-1))  # the check can fail: a mask flipped alone disagrees
    assert misaligned < 0.8


def four_channel_sample(size=64):
    """A float 4-channel image whose last channel alone says the class: bright where the mask is 1."""
    _, mask = red_blue_sample(size)
    noise = torch.rand(4, size, size, generator=torch.Generator().manual_seed(0))
    noise[3] = torch.where(mask.bool(), 0.8, 0.2) + 0.05 * noise[3]
    return tv_tensors.Image(noise), mask


def last_channel_agreement(image, mask):
    """Share of labelled pixels whose last channel, split halfway between its means over the two classes, says
    the mask (the split moves with the jitter; a misaligned mask brings the two means together)."""
    labelled = mask != IGNORE_INDEX
    values, labels = image[3][labelled], mask[labelled]
    middle = (values[labels == 1].mean() + values[labels == 0].mean()) / 2
    return ((values > middle).long() == labels).float().mean().item()


@pytest.mark.parametrize("augment", ["basic", "strong"])
def test_augmentation_of_n_channel_float_images_keeps_them_aligned_and_jitters_each_channel(augment):
    transform = build_transforms(48, augment, Normalization.none(4), photo=False)
    torch.manual_seed(0)
    source, _ = four_channel_sample()
    ratios = []
    for _ in range(20):
        image, mask = transform(*four_channel_sample())
        assert image.shape == (4, 48, 48) and image.dtype == torch.float32
        assert last_channel_agreement(image, mask) > 0.9
        ratios.append(image.flatten(1).std(1) / source.flatten(1).std(1))
    assert last_channel_agreement(image, mask.flip(-1)) < 0.8  # the check can fail
    spread = torch.stack(ratios)  # each channel's contrast is drawn on its own
    assert (spread.std(0) > 0.05).all() and (spread[:, 0] - spread[:, 1]).abs().max() > 0.1


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
        assert torch.equal(image, expected_image) and torch.equal(mask, expected_mask.as_subclass(torch.Tensor))


def test_early_stopping_stops_after_n_epochs_without_a_better_miou():
    early = EarlyStopping(patience=2)
    improved, stopped_at = [], None
    for epoch, miou in enumerate([0.5, 0.6, 0.6, 0.55, 0.7, 0.8], 1):
        improved.append(early.update(miou))
        if early.should_stop:
            stopped_at = epoch
            break
    assert stopped_at == 4 and early.best == 0.6
    assert improved == [True, True, False, False]
    never = EarlyStopping(patience=0)
    for _ in range(20):
        never.update(0.1)
        assert not never.should_stop
    resumed = EarlyStopping(patience=1, best=0.9)  # a resumed run keeps the best it had
    assert not resumed.update(0.8) and resumed.should_stop


def first_plateau(mious: list[float], patience: int) -> int | None:
    """Reference rule, written out: the first epoch that ends `patience` epochs without a new best."""
    best_epoch = 0
    for epoch in range(1, len(mious)):
        if mious[epoch] > mious[best_epoch]:
            best_epoch = epoch
        elif epoch - best_epoch >= patience:
            return epoch + 1
    return None


def test_the_loop_stops_early_saves_the_stopping_epoch_and_keeps_the_best(tiny_demo, tmp_path, capsys):
    run_dir = tmp_path / "run"
    flags = list(TINY_TRAIN_FLAGS)
    flags[flags.index("--lr") + 1] = "3e-2"  # a high rate: validation mIoU does not rise every epoch
    args = ["--data-root", str(tiny_demo), "--epochs", "8", "--early-stop", "1", "--run-dir", str(run_dir), *flags]
    assert train.main(args) == 0
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    mious = [h["miou"] for h in state["history"]]
    stop = first_plateau(mious, patience=1)
    assert stop is not None and state["epoch"] == stop == len(mious) < 8
    assert f"early stop: no better val mIoU in 1 validations (best {max(mious):.4f})" in capsys.readouterr().out
    assert load_checkpoint(run_dir / "checkpoints" / "best.pt")["epoch"] == mious.index(max(mious)) + 1
    assert (run_dir / "checkpoints" / f"epoch_{stop:03d}.pt").is_file()
    assert (run_dir / "samples" / f"samples_epoch_{stop:03d}.png").is_file()


def test_dropout_is_in_the_bottleneck_and_decoder_only():
    from model import ResidualAttnUNet

    model = ResidualAttnUNet(3, 2, (4, 8), dropout=0.3)
    placed = {name.split(".")[0] for name, module in model.named_modules() if isinstance(module, torch.nn.Dropout2d)}
    assert placed == {"bottleneck", "decoders"}


def test_crops_keep_the_aspect_ratio_and_pad_small_images_with_ignore():
    from transforms import RandomScale

    torch.manual_seed(0)
    image = tv_tensors.Image(torch.zeros(3, 40, 80, dtype=torch.uint8))
    mask = tv_tensors.Mask(torch.ones(40, 80, dtype=torch.uint8))
    for _ in range(10):
        scaled, _ = RandomScale((0.5, 2.0))(image, mask)
        height, width = scaled.shape[-2:]
        assert abs(width - 2 * height) <= 1 and 20 <= height <= 80  # one factor for both sides
    assert RandomScale((1.0, 1.0), base_size=20)(image)[0].shape[-2:] == (20, 40)  # shorter side -> base
    transform = build_transforms(64, "none", crop=Crop(16, (1.0, 1.0))).geometry
    small, small_mask = transform(
        tv_tensors.Image(torch.full((3, 10, 12), 7, dtype=torch.uint8)), tv_tensors.Mask(mask[:10, :12])
    )
    assert small.shape == (3, 16, 16) and small_mask.shape == (16, 16)
    assert (small_mask == 1).sum() == 120 and (small_mask == IGNORE_INDEX).sum() == 16 * 16 - 120
    assert (small == 7).all(0).sum() == 120  # the image is padded where the mask is ignored, not stretched


@pytest.mark.parametrize("augment", ["none", "basic", "strong"])
def test_colour_on_float_is_the_same_augmentation_as_colour_on_uint8(augment):
    """The training pipeline jitters colour after converting to float; the reference, written out here, jitters
    the uint8 image and converts at the end. Same random draws: same geometry (masks exactly), colours within
    the rounding the reference adds after each jitter step."""
    from torchvision.transforms import v2

    from intensity import IMAGENET_MEAN as MEAN
    from intensity import IMAGENET_STD as STD

    fill = {tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}
    strong = augment == "strong"
    reference = [v2.Resize((40, 40), antialias=True)]
    if augment != "none":
        reference = [
            v2.RandomResizedCrop((40, 40), scale=(0.25 if strong else 0.5, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            *([v2.RandomVerticalFlip()] if strong else []),
            v2.RandomRotation(15, fill=fill),
            v2.ColorJitter(0.3, 0.3, 0.3, 0.05 if strong else 0.0),
            *([v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, 2.0))], p=0.3)] if strong else []),
        ]
    reference = v2.Compose([*reference, v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])
    ours = build_transforms(40, augment)
    generator = torch.Generator().manual_seed(1)
    image = tv_tensors.Image(torch.randint(0, 256, (3, 64, 56), dtype=torch.uint8, generator=generator))
    mask = tv_tensors.Mask(torch.randint(0, 4, (64, 56), dtype=torch.uint8, generator=generator))
    for seed in range(10):
        torch.manual_seed(seed)
        expected_image, expected_mask = reference(image, mask)
        torch.manual_seed(seed)
        found_image, found_mask = ours(image, mask)
        assert torch.equal(found_mask, expected_mask)
        levels = (found_image - expected_image).abs() * torch.tensor(STD)[:, None, None] * 255  # in uint8 steps
        # The reference truncates to uint8 after each of brightness, contrast and saturation (torchvision's
        # uint8 blend): about half a level lost per step.
        assert levels.max() <= (1e-3 if augment == "none" else 6)
        assert levels.mean() <= (1e-3 if augment == "none" else 2)


def test_the_mask_gather_reads_the_pixels_torchvision_nearest_resize_reads():
    from torchvision.transforms.v2 import functional as TF

    from transforms import nearest_sources

    generator = torch.Generator().manual_seed(4)
    for _ in range(40):
        height, width, out_height, out_width = (int(n) for n in torch.randint(5, 300, (4,), generator=generator))
        mask = torch.randint(0, 250, (height, width), dtype=torch.uint8, generator=generator)
        expected = TF.resize(tv_tensors.Mask(mask), [out_height, out_width])
        gathered = mask[nearest_sources(out_height, height)][:, nearest_sources(out_width, width)]
        assert torch.equal(gathered, expected.as_subclass(torch.Tensor))


def test_mask_positions_past_2_31_pixels_are_not_wrapped():
    """A 50,000 x 50,000 mask (2.5e9 pixels, as --max-pixels allows when raised): the flat positions of crops that
    reach past row 2**31 / 50,000 are the int64 row * width + column. Only the sizes are needed, not the pixels."""
    from colour import AUGMENT_LEVELS
    from transforms import build_geometry, size_stand_in

    side, crop = 50_000, 32
    geometry = build_geometry(crop, AUGMENT_LEVELS["none"], Crop(crop, (1.0, 1.0)))
    torch.manual_seed(0)
    placed = [geometry.make_params(size_stand_in(side, side)) for _ in range(40)]
    assert any((params["offset"][0] + crop) * side > 2**31 for params in placed)
    for params in placed:
        (top, left), steps = params["offset"], torch.arange(crop, dtype=torch.int64)
        expected = ((top + steps)[:, None] * side + (left + steps)[None, :]).flatten()
        assert torch.equal(params["mask_index"].long(), expected)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_a_window_of_the_resize_is_torchvision_resize_pixel_for_pixel(dtype, monkeypatch):
    """resize_window against the whole image resized by TF.resize and then cut: grey, RGB, RGBA and 5-channel
    images, channels last (as decoded) and first, enlarged and shrunk, 1-pixel images and windows included."""
    from torchvision.transforms.v2 import functional as TF

    import transforms

    resize, calls = TF.resize, []
    monkeypatch.setattr(transforms.TF, "resize", lambda *args, **kwargs: calls.append(1) or resize(*args, **kwargs))
    generator = torch.Generator().manual_seed(6)
    windowed = 0
    for case in range(120):
        height, width, out_height, out_width = (int(n) for n in torch.randint(1, 160, (4,), generator=generator))
        first_row, first_col = int(torch.randint(out_height, ())), int(torch.randint(out_width, ()))
        rows = (first_row, int(torch.randint(first_row + 1, out_height + 1, ())))
        cols = (first_col, int(torch.randint(first_col + 1, out_width + 1, ())))
        channels = (1, 3, 4, 5)[case % 4]
        pixels = torch.randint(0, 256, (height, width, channels), dtype=torch.uint8, generator=generator)
        pixels = pixels.permute(2, 0, 1).to(dtype)
        pixels = pixels.contiguous() if case % 3 == 0 else pixels
        expected = resize(pixels, [out_height, out_width], antialias=True)[..., rows[0] : rows[1], cols[0] : cols[1]]
        calls.clear()
        found = transforms.resize_window(pixels, [out_height, out_width], rows, cols)
        assert torch.equal(found, expected), (case, pixels.shape, out_height, out_width, rows, cols)
        windowed += len(calls) == 2
    assert windowed > 30  # the window's own two-pass resize ran, not only the whole image's


@pytest.mark.parametrize("augment", ["none", "basic", "strong"])
def test_crop_geometry_is_torchvision_scale_crop_flips_and_rotation_pixel_for_pixel(augment):
    """One resize and one gather against the steps written out with torchvision's classes (and RandomScale): the
    same random draws, the same image and mask, with padding (images smaller than the crop), odd sizes and a base
    size."""
    from torchvision.transforms import v2

    from transforms import FILL, RandomScale

    generator = torch.Generator().manual_seed(5)
    for seed in range(24):
        height, width = (int(n) for n in torch.randint(20, 120, (2,), generator=generator))
        crop, base = int(torch.randint(16, 64, (), generator=generator)), (None, 40)[seed % 2]
        image = tv_tensors.Image(torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator))
        mask = tv_tensors.Mask(torch.randint(0, 4, (height, width), dtype=torch.uint8, generator=generator))
        steps = [RandomScale((0.5, 2.0), base), v2.RandomCrop(crop, pad_if_needed=True, fill=FILL)]
        if augment != "none":
            steps += [v2.RandomHorizontalFlip(), *([v2.RandomVerticalFlip()] if augment == "strong" else [])]
            steps += [v2.RandomRotation(15, fill=FILL)]
        torch.manual_seed(seed)
        expected = v2.Compose(steps)(image, mask)
        ours = build_transforms(64, augment, crop=Crop(crop, (0.5, 2.0), base_size=base)).geometry
        torch.manual_seed(seed)
        found = ours(image, mask)
        assert torch.equal(found[0], expected[0]) and torch.equal(found[1], expected[1]), (seed, height, width, crop)
        assert type(found[0]) is tv_tensors.Image and type(found[1]) is tv_tensors.Mask


@pytest.mark.parametrize(
    "augment, crop", [("none", None), ("strong", None), ("none", 32), ("basic", 32), ("strong", 32)]
)
def test_training_samples_from_files_are_the_reference_pipelines_pixel_for_pixel(augment, crop, tmp_path):
    """From the files to the placed sample: the dataset (TorchCodec decoding, one-pass geometry, raw mask values
    mapped after the gather) against the reference written out here (PIL decoding, the mask mapped first,
    torchvision's classes one step at a time). Raw values 0, 3 (--ignore-value) and 255 (a class here, not the
    fill). The same seeds: the same image and mask."""
    from PIL import Image
    from torchvision.transforms import v2

    from benchmarks.data import write_photo

    rng = np.random.default_rng(2)
    for folder in ("images", "masks"):
        (tmp_path / folder).mkdir()
    for k in range(3):
        write_photo(tmp_path / f"images/{k}.jpg", (70, 50), seed=k)
        Image.fromarray(rng.choice(np.array([0, 3, 255], np.uint8), (50, 70))).save(tmp_path / f"masks/{k}.png")
    crop_rule = Crop(crop, (0.5, 2.0)) if crop else None
    data = SegmentationFolder(
        tmp_path / "images", tmp_path / "masks", 40, crop=crop_rule, augment=augment, ignore_value=3, scan_workers=1
    )
    classes = np.full(256, IGNORE_INDEX, np.uint8)
    classes[0], classes[255] = 0, 1
    stepwise = v2.Compose(data.transform.geometry.stepwise())
    seen = set()
    for index in range(3):
        image_file, mask_file = (
            tmp_path / folder / f"{index}.{ext}" for folder, ext in (("images", "jpg"), ("masks", "png"))
        )
        reference = (
            tv_tensors.Image(torch.from_numpy(np.array(Image.open(image_file))).permute(2, 0, 1)),
            tv_tensors.Mask(torch.from_numpy(classes[np.array(Image.open(mask_file))])),
        )
        for seed in range(6):
            torch.manual_seed(seed)
            expected_image, expected_mask = stepwise(*reference)
            torch.manual_seed(seed)
            image, mask, _ = data.draw(index)
            assert torch.equal(image, expected_image) and torch.equal(mask, expected_mask), (index, seed)
            seen |= set(mask.unique().tolist())
    assert {0, 1, IGNORE_INDEX} <= seen  # raw 255 became class 1; 3 and the filled pixels are ignored
