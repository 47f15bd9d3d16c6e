"""A peer, never imported by the product: segmentation_models_pytorch's Unet in the plain loop its examples use,
trained for a wall-clock budget, then the validation images predicted whole.

    python peers/smp_unet.py DATA_DIR PRED_DIR SECONDS [--seed N] [--encoder resnet34] [--batch 8] [--lr 1e-3]
        [--augment flips|ours]

DATA_DIR is laid out as train.py's --data-root (images/{train,val}, masks/{train,val} index PNGs, 255 ignored).
No pretrained weights (no model hub here): encoder_weights=None. The recipe a user of smp writes in an afternoon:
random crops padded with the ignore label, ImageNet normalisation, Dice + cross-entropy, AdamW with a cosine over
the budget, fp32. --augment flips: horizontal and vertical flips; ours: what train.py's default augmentation does
(a rescale by 0.75-1.33, the crop, a horizontal flip, a rotation of up to 15 degrees, brightness, contrast and
saturation jitter of 0.3), through torchvision's v2 transforms. Trains until compare.py's PEER_DEADLINE where it
set one (else SECONDS), with PEER_THREADS threads. Writes PRED_DIR/<stem>.png with the class index (0..K-1, the mask
values of a 0..K-1 set) for score_masks.py, and prints what it ran as one JSON line.
"""

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from peer_common import seconds_left
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
IGNORE = 255


def load(data: Path, split: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(stem, uint8 RGB image, int64 mask) per image, in name order."""
    pairs = []
    for path in sorted((data / "images" / split).iterdir()):
        image = np.asarray(Image.open(path).convert("RGB"))
        mask = np.asarray(Image.open(data / "masks" / split / f"{path.stem}.png")).astype(np.int64)
        pairs.append((path.stem, image, mask))
    return pairs


def normalised(image: np.ndarray) -> np.ndarray:
    return (image.astype(np.float32) / 255 - MEAN) / STD


def ours_augmentation(crop: int) -> v2.Compose:
    """train.py's default augmentation (--augment basic with its --scale-range), in torchvision's v2 pipeline."""
    fill = {tv_tensors.Image: 0, tv_tensors.Mask: IGNORE}
    return v2.Compose(
        [
            random_rescale,
            v2.RandomCrop(crop, pad_if_needed=True, fill=fill),
            v2.RandomHorizontalFlip(),
            v2.RandomRotation(15, fill=fill),
            v2.ColorJitter(0.3, 0.3, 0.3),
        ]
    )


def random_rescale(image: tv_tensors.Image, mask: tv_tensors.Mask) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
    """The whole image and its mask rescaled by one factor drawn from 0.75-1.33 (the mask by nearest neighbour)."""
    factor = float(torch.empty(()).uniform_(0.75, 1.33))
    size = [round(side * factor) for side in mask.shape[-2:]]
    return v2.functional.resize(image, size, antialias=True), v2.functional.resize(mask, size)


def augmented_crop(pairs, transform: v2.Compose, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    _, image, mask = pairs[rng.integers(len(pairs))]
    image = tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))))
    image, mask = transform(image, tv_tensors.Mask(torch.from_numpy(mask)))
    return normalised(image.numpy().transpose(1, 2, 0)).transpose(2, 0, 1).copy(), mask.numpy().copy()


def random_crop(pairs, crop: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    _, image, mask = pairs[rng.integers(len(pairs))]
    image = normalised(image)
    pad_h, pad_w = max(0, crop - mask.shape[0]), max(0, crop - mask.shape[1])
    if pad_h or pad_w:
        image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)))
        mask = np.pad(mask, ((0, pad_h), (0, pad_w)), constant_values=IGNORE)
    top, left = rng.integers(mask.shape[0] - crop + 1), rng.integers(mask.shape[1] - crop + 1)
    image, mask = image[top : top + crop, left : left + crop], mask[top : top + crop, left : left + crop]
    if rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    if rng.random() < 0.5:
        image, mask = image[::-1], mask[::-1]
    return np.ascontiguousarray(image.transpose(2, 0, 1)), np.ascontiguousarray(mask)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", type=Path)
    p.add_argument("pred_dir", type=Path)
    p.add_argument("seconds", type=float, help="training wall time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--encoder", default="resnet34")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--augment", choices=("flips", "ours"), default="flips")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("PEER_THREADS", torch.get_num_threads())))
    deadline = time.monotonic() + seconds_left(args.seconds)  # compare.py's clock started at launch: loading counts
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    train, val = load(args.data, "train"), load(args.data, "val")
    classes = int(max(mask[mask != IGNORE].max() for _, _, mask in train)) + 1
    model = smp.Unet(encoder_name=args.encoder, encoder_weights=None, in_channels=3, classes=classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    dice = smp.losses.DiceLoss("multiclass", from_logits=True, ignore_index=IGNORE)
    started, steps = time.monotonic(), 0
    model.train()
    transform = ours_augmentation(args.crop) if args.augment == "ours" else None
    while (now := time.monotonic()) < deadline:
        for group in optimizer.param_groups:
            group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (now - started) / (deadline - started))))
        if transform is None:
            samples = [random_crop(train, args.crop, rng) for _ in range(args.batch)]
        else:
            samples = [augmented_crop(train, transform, rng) for _ in range(args.batch)]
        images, masks = zip(*samples, strict=True)
        x, y = torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(masks))
        logits = model(x)
        loss = F.cross_entropy(logits, y, ignore_index=IGNORE) + dice(logits, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps += 1
    train_seconds = time.monotonic() - started
    model.eval()
    args.pred_dir.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        for stem, image, mask in val:  # whole images, reflect-padded to the encoder's stride of 32
            height, width = mask.shape
            padded = np.pad(normalised(image), ((0, -height % 32), (0, -width % 32), (0, 0)), mode="reflect")
            logits = model(torch.from_numpy(padded.transpose(2, 0, 1).copy())[None])
            labels = logits[0, :, :height, :width].argmax(0).numpy().astype(np.uint8)
            Image.fromarray(labels).save(args.pred_dir / f"{stem}.png")
    params = sum(p.numel() for p in model.parameters()) / 1e6
    steps_text = f"{steps} steps of {args.batch} x {args.crop} px in {train_seconds:.0f} s"
    print(f"smp Unet({args.encoder}, random init, {params:.1f} M parameters, seed {args.seed}): {steps_text}")
    ran = {"steps": steps, "batch": args.batch, "crop": args.crop, "lr": args.lr, "augment": args.augment}
    print(
        json.dumps(ran | {"train_s": round(train_seconds, 1), "threads": torch.get_num_threads(), "precision": "fp32"})
    )


if __name__ == "__main__":
    main()
