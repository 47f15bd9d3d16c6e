"""Dataset-level segmentation metrics: classes from one confusion matrix over the whole set, objects from the
matchings of every image summed."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from labels import IGNORE_INDEX
from utils import Distributed


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

    def reduce(self, ddp: Distributed) -> None:
        """Sum the matrices of all processes, so every rank reports the whole set."""
        ddp.all_reduce_sum(self.matrix)

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


IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * k, 2) for k in range(10))  # 0.5, 0.55, ..., 0.95


def overlaps(truth: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The pairs of a true and a predicted object that share pixels: (true id, predicted id, shared pixels), and
    each id's size (indexed by id, background 0 included). One pass over the pixels, never a (true x predicted)
    matrix."""
    truth, pred = truth.ravel().astype(np.int64), pred.ravel().astype(np.int64)
    both = (truth > 0) & (pred > 0)
    width = int(pred.max()) + 1
    pairs, shared = np.unique(truth[both] * width + pred[both], return_counts=True)
    return pairs // width, pairs % width, shared, (np.bincount(truth), np.bincount(pred))


def matched_pairs(truth: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, int, int]:
    """The IoUs of the one-to-one matching of true and predicted objects that maximises the summed IoU among pairs of
    IoU >= 0.5 (above 0.5 a pair is the only possible one for both objects, so the matching holds for every higher
    threshold too), and the numbers of true and predicted objects. As StarDist's and Cellpose's matching."""
    true_ids, pred_ids, shared, (true_sizes, pred_sizes) = overlaps(truth, pred)
    iou = shared / (true_sizes[true_ids] + pred_sizes[pred_ids] - shared)
    keep = iou >= IOU_THRESHOLDS[0]
    true_ids, pred_ids, iou = true_ids[keep], pred_ids[keep], iou[keep]
    if len(np.unique(true_ids)) < len(true_ids) or len(np.unique(pred_ids)) < len(pred_ids):  # IoU exactly 0.5 twice
        rows, row_of = np.unique(true_ids, return_inverse=True)
        cols, col_of = np.unique(pred_ids, return_inverse=True)
        dense = np.zeros((len(rows), len(cols)))
        dense[row_of, col_of] = iou
        chosen = linear_sum_assignment(dense, maximize=True)
        iou = dense[chosen][dense[chosen] > 0]
    return iou, int((true_sizes[1:] > 0).sum()), int((pred_sizes[1:] > 0).sum())


def seg_scores(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """The Cell Tracking Challenge's SEG per true object: the Jaccard index with the predicted object that covers more
    than half of it, 0 where none does."""
    true_ids, pred_ids, shared, (true_sizes, pred_sizes) = overlaps(truth, pred)
    present = np.flatnonzero(true_sizes[1:]) + 1
    scores = np.zeros(len(true_sizes))
    covering = shared > 0.5 * true_sizes[true_ids]
    t, p, s = true_ids[covering], pred_ids[covering], shared[covering]
    scores[t] = s / (true_sizes[t] + pred_sizes[p] - s)
    return scores[present]


class InstanceScores:
    """Object-level scores over a whole set, from per-image matchings summed (not a mean of per-image scores):
    AP at IoU t as StarDist and Cellpose report it, TP / (TP + FP + FN), for t = 0.5, 0.55, ..., 0.95 and their
    mean; F1 at 0.5; panoptic quality (the summed IoU of the matches at 0.5 over TP + FP/2 + FN/2); the Cell
    Tracking Challenge's SEG (the mean over true objects of seg_scores)."""

    def __init__(self):
        self.true_positives = np.zeros(len(IOU_THRESHOLDS), np.int64)
        self.true_objects = self.pred_objects = 0
        self.matched_iou = self.seg_sum = 0.0

    def update(self, truth: np.ndarray, pred: np.ndarray) -> dict:
        """Adds one image's objects (id images of the same shape, 0 background); returns that image's scores."""
        if truth.shape != pred.shape:
            raise ValueError(f"prediction shape {pred.shape} != truth shape {truth.shape}")
        image = InstanceScores()
        iou, image.true_objects, image.pred_objects = matched_pairs(truth, pred)
        image.true_positives = np.array([(iou >= t).sum() for t in IOU_THRESHOLDS])
        image.matched_iou, image.seg_sum = float(iou.sum()), float(seg_scores(truth, pred).sum())
        self.add(image)
        return image.compute()

    def add(self, other: InstanceScores) -> None:
        self.true_positives = self.true_positives + other.true_positives
        self.true_objects += other.true_objects
        self.pred_objects += other.pred_objects
        self.matched_iou += other.matched_iou
        self.seg_sum += other.seg_sum

    def reduce(self, ddp: Distributed, device: torch.device) -> None:
        """Sums every rank's counts, so every rank reports the whole set."""
        counts = [*self.true_positives, self.true_objects, self.pred_objects, self.matched_iou, self.seg_sum]
        on = device if ddp.enabled else "cpu"  # float64: not on every device, and needed only to travel
        totals = ddp.all_reduce_sum(torch.tensor(counts, dtype=torch.float64, device=on)).cpu().tolist()
        count = len(IOU_THRESHOLDS)
        self.true_positives = np.array(totals[:count], np.int64)
        self.true_objects, self.pred_objects = int(totals[count]), int(totals[count + 1])
        self.matched_iou, self.seg_sum = totals[count + 2], totals[count + 3]

    def compute(self) -> dict[str, float]:
        tp = self.true_positives.astype(np.float64)
        fp, fn = self.pred_objects - tp, self.true_objects - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            ap = np.where(tp + fp + fn > 0, tp / (tp + fp + fn), np.nan)
            f1 = 2 * tp[0] / (2 * tp[0] + fp[0] + fn[0]) if tp[0] + fp[0] + fn[0] else float("nan")
            pq = self.matched_iou / (tp[0] + fp[0] / 2 + fn[0] / 2) if tp[0] + fp[0] + fn[0] else float("nan")
        scores = {f"ap{round(t * 100)}": float(a) for t, a in zip(IOU_THRESHOLDS, ap, strict=True)}
        return {
            **scores,
            "ap50_95": float(np.nanmean(ap)) if not np.isnan(ap).all() else float("nan"),
            "f1": float(f1),
            "pq": float(pq),
            "seg": self.seg_sum / self.true_objects if self.true_objects else float("nan"),
            "true_objects": self.true_objects,
            "pred_objects": self.pred_objects,
        }
