"""Named sets of train.py flag values, applied beneath the flags a user types: the demo's, and the reference
design's recipe that this repo's first defaults followed (one flag away: --preset reference)."""

from __future__ import annotations

REFERENCE_WIDTHS = (64, 128, 256, 512)  # the reference design's encoder widths
DEMO_SETTINGS = {"image_size": 96, "crop_size": 0, "epochs": 10, "batch_size": 16}

PRESETS = {
    "reference": {  # whole images squashed to 256 x 256, plain cross-entropy, Adam 1e-4 + cosine over 50 epochs
        "image_size": 256,
        "crop_size": 0,
        "widths": REFERENCE_WIDTHS,
        "loss": "ce",
        "augment": "basic",
        "sampler": "weighted",
        "min_epoch_samples": 0,  # an epoch is one pass, however small the set
        "batch_size": 8,
        "epochs": 50,
        "lr": 1e-4,
        "optimizer": "adam",
        "weight_decay": 0.0,
        "warmup_epochs": 0,
        "schedule": "cosine",
    },
}
