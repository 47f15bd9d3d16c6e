"""build_loss(name, ...) -> nn.Module; every loss takes (logits, target) and honours ignore_index."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from instances import SEPARATION_LEVELS
from labels import IGNORE_INDEX

LOSSES = ("ce", "dice_ce", "weighted_ce")


class DiceCELoss(nn.Module):
    """Soft Dice over softmax probabilities (all classes at once) plus cross-entropy.

    Dice sums over the whole batch before dividing, so a class seen in one image is not
    averaged away by the images that lack it.
    """

    def __init__(
        self, dice_weight: float = 1.0, ce_weight: float = 1.0, ignore_index: int = IGNORE_INDEX, smooth: float = 1.0
    ):
        super().__init__()
        self.dice_weight, self.ce_weight = dice_weight, ce_weight
        self.ignore_index, self.smooth = ignore_index, smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        ce = F.cross_entropy(logits, target, ignore_index=self.ignore_index)
        valid = (target != self.ignore_index).unsqueeze(1)
        probs = logits.softmax(dim=1) * valid
        one_hot = F.one_hot(target.masked_fill(~valid.squeeze(1), 0), logits.shape[1])
        one_hot = one_hot.permute(0, 3, 1, 2).to(probs.dtype) * valid
        dims = (0, 2, 3)
        intersection = (probs * one_hot).sum(dims)
        cardinality = probs.sum(dims) + one_hot.sum(dims)
        dice = (2 * intersection + self.smooth) / (cardinality + self.smooth)
        return self.ce_weight * ce + self.dice_weight * (1 - dice.mean())


class InstanceLoss(nn.Module):
    """The class loss on the class logits, plus the separation head's binary cross-entropy against the separation map
    (instances.py: soft targets for distance, 0/1 for boundary), averaged over the pixels where the map is known; a
    boundary map adds a soft Dice term, as the class loss has one, since edge pixels are a small share of any image.
    The target is the (B, 2, H, W) stack of class masks and maps (uint8 0..SEPARATION_LEVELS, IGNORE_INDEX unknown).
    """

    def __init__(self, class_loss: nn.Module, num_classes: int, separation: str, smooth: float = 1.0):
        super().__init__()
        self.class_loss, self.num_classes, self.dice, self.smooth = (
            class_loss,
            num_classes,
            separation == "boundary",
            smooth,
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        classes, separation = target[:, 0], target[:, 1]
        known = (separation != IGNORE_INDEX) & (classes != IGNORE_INDEX)
        wanted = separation.float().clamp(max=SEPARATION_LEVELS) / SEPARATION_LEVELS
        predicted = logits[:, self.num_classes].float()
        per_pixel = F.binary_cross_entropy_with_logits(predicted, wanted, reduction="none")
        loss = (per_pixel * known).sum() / known.sum().clamp_min(1)  # masked: no host sync, as a mean
        if self.dice:
            probs, wanted = predicted.sigmoid() * known, wanted * known
            loss = loss + 1 - (2 * (probs * wanted).sum() + self.smooth) / (probs.sum() + wanted.sum() + self.smooth)
        return self.class_loss(logits[:, : self.num_classes], classes) + loss


class CrossEntropy(nn.CrossEntropyLoss):
    """Cross-entropy computed in fp32 whatever precision the model ran in."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return super().forward(logits.float(), target)


def build_loss(
    name: str,
    class_weights: torch.Tensor | None = None,
    *,
    ignore_index: int = IGNORE_INDEX,
    dice_weight: float = 1.0,
    ce_weight: float = 1.0,
    separation: str | None = None,
    num_classes: int = 0,
) -> nn.Module:
    """separation: a model with a separation head (num_classes classes before it), whose loss (InstanceLoss) wraps
    the named one."""
    if separation is not None:
        class_loss = build_loss(
            name, class_weights, ignore_index=ignore_index, dice_weight=dice_weight, ce_weight=ce_weight
        )
        return InstanceLoss(class_loss, num_classes, separation)
    if name == "ce":
        return CrossEntropy(ignore_index=ignore_index)
    if name == "dice_ce":
        return DiceCELoss(dice_weight, ce_weight, ignore_index)
    if name == "weighted_ce":
        if class_weights is None:
            raise ValueError("weighted_ce needs class_weights (from the training set's mask statistics)")
        return CrossEntropy(weight=class_weights.float(), ignore_index=ignore_index)
    raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
