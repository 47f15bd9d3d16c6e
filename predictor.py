"""A trained checkpoint as a function: batches of uint8 images -> class probabilities at each image's size."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from checkpoints import CheckpointError, load_checkpoint, model_from_checkpoint
from dataset import normalize_images
from labels import LabelMapping
from utils import PRECISION_DTYPES, Runtime


@dataclass
class Predictor:
    model: torch.nn.Module
    mapping: LabelMapping
    image_size: int
    runtime: Runtime
    normalize: v2.Compose = field(default_factory=normalize_images)  # on the device, a batch at a time

    @classmethod
    def from_checkpoint(cls, path: Path, runtime: Runtime) -> Predictor:
        state = load_checkpoint(path)
        model = model_from_checkpoint(state, path)
        try:
            mapping, image_size = LabelMapping.from_dict(state["mapping"]), int(state["image_size"])
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path}: holds no usable label mapping and image size ({err!r})") from None
        # Weights cast once to the inference dtype: autocast would cast every weight on every batch.
        dtype = PRECISION_DTYPES[runtime.precision]
        model.eval().fold_batchnorm().to(runtime.device, dtype, memory_format=runtime.memory_format)
        return cls(model, mapping, image_size, runtime)

    @torch.inference_mode()
    def probabilities(self, images: torch.Tensor, sizes: list[tuple[int, int]], tta: bool) -> list[torch.Tensor]:
        """Softmax at each image's original (height, width), as (classes, H, W) float32."""
        images = self.normalize(images.to(self.runtime.device, non_blocking=True))  # uint8: a quarter of float
        images = images.to(PRECISION_DTYPES[self.runtime.precision], memory_format=self.runtime.memory_format)
        logits = self.model(images)
        if tta:
            flipped = self.model(images.flip(-1)).flip(-1)
        probs = logits.float().softmax(1)
        if tta:
            probs = (probs + flipped.float().softmax(1)) / 2
        # Interpolate class scores, not labels, to the full size (labels would turn blocky).
        return [
            F.interpolate(p[None], size=size, mode="bilinear", align_corners=False)[0].cpu()
            for p, size in zip(probs, sizes, strict=True)
        ]
