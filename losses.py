"""build_loss(name, ...) -> nn.Module; every loss takes (logits, target) and honours ignore_index."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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


class CrossEntropy(nn.CrossEntropyLoss):
    """Cross-entropy computed in fp32 whatever precision the model ran in."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return super().forward(logits.float(), target)


def build_loss(
    name: str,
    class_weights: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    dice_weight: float = 1.0,
    ce_weight: float = 1.0,
) -> nn.Module:
    if name == "ce":
        return CrossEntropy(ignore_index=ignore_index)
    if name == "dice_ce":
        return DiceCELoss(dice_weight, ce_weight, ignore_index)
    if name == "weighted_ce":
        if class_weights is None:
            raise ValueError("weighted_ce needs class_weights (from the training set's mask statistics)")
        return CrossEntropy(weight=class_weights.float(), ignore_index=ignore_index)
    raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
