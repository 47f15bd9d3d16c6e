"""Dataset-level segmentation metrics from one confusion matrix."""

from __future__ import annotations

import torch
import torch.distributed as dist

from labels import IGNORE_INDEX


class ConfusionMatrix:
    """Accumulates a (num_classes x num_classes) matrix, rows = target, columns = prediction.

    Metrics come from the matrix of the whole set, never a mean of per-batch values. A class
    absent from both targets and predictions has no defined IoU/Dice: it is NaN per class and
    left out of the means.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, device: torch.device | str = "cpu"):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        pred, target = pred.to(self.matrix.device), target.to(self.matrix.device)
        keep = (target != self.ignore_index) & (target >= 0) & (target < self.num_classes)
        index = target[keep].long() * self.num_classes + pred[keep].long()
        self.matrix += torch.bincount(index, minlength=self.num_classes**2).reshape(self.num_classes, -1)

    def reset(self) -> None:
        self.matrix.zero_()

    def reduce(self) -> None:
        """Sum the matrices of all processes, so every rank reports the whole set."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.matrix)

    def compute(self) -> dict[str, torch.Tensor | float]:
        m = self.matrix.double()
        true_positive = m.diag()
        target_total, pred_total = m.sum(1), m.sum(0)
        union = target_total + pred_total - true_positive
        nan = torch.tensor(float("nan"), dtype=m.dtype, device=m.device)
        iou = torch.where(union > 0, true_positive / union, nan)
        dice = torch.where(union > 0, 2 * true_positive / (target_total + pred_total), nan)
        class_acc = torch.where(target_total > 0, true_positive / target_total, nan)  # recall
        precision = torch.where(pred_total > 0, true_positive / pred_total, nan)
        total = m.sum()
        return {
            "iou": iou.cpu(),
            "miou": iou.nanmean().item(),
            "dice": dice.cpu(),
            "mdice": dice.nanmean().item(),
            "class_acc": class_acc.cpu(),
            "macc": class_acc.nanmean().item(),
            "precision": precision.cpu(),
            "pixel_acc": (true_positive.sum() / total).item() if total > 0 else float("nan"),
        }
