"""Score a folder of predicted masks against the true masks, each at the true mask's own size.

One evaluator for every row of a comparison: this repo's predictions (inference.py's masks/ folder) and any
other tool's (e.g. milesial/Pytorch-UNet's predict.py), matched by file stem:

    python score_masks.py --pred runs/x/predictions/val/masks --truth data/real/bbbc007/masks/val

The classes are the values the true masks hold (except --ignore-value); a predicted value that is not among
them is an error for the true class, never a class of its own.

With --instances both folders hold instance masks (one id per object, 0 background: inference.py's instances/, the
Cell Tracking Challenge's or StarDist's and Cellpose's label images) and the scores are objects': AP at IoU 0.5 to
0.95 as StarDist and Cellpose report it (TP / (TP + FP + FN)), F1 at 0.5, panoptic quality and the Cell Tracking
Challenge's SEG, per image and over all images (metrics.InstanceScores):

    python score_masks.py --instances --pred runs/x/predictions/val/instances --truth data/real/phc/masks_instance/val
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from cli import ArgumentParser, mask_value_type, run_cli, setup_logging
from errors import UserError
from files import require_folder
from image_io import read_mask
from labels import IGNORE_INDEX
from listing import image_listing, list_images
from metrics import ConfusionMatrix, InstanceScores
from records import class_report, format_report, write_csv

log = logging.getLogger(__name__)


def get_args_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pred", type=Path, required=True, help="folder of predicted masks (label values, not colours)")
    p.add_argument("--truth", type=Path, required=True, help="folder of true masks with the same file stems")
    p.add_argument(
        "--ignore-value", type=mask_value_type, default=IGNORE_INDEX, help="true-mask value that is not scored"
    )
    p.add_argument("--binary", action="store_true", help="every nonzero value (both folders) is one foreground class")
    p.add_argument(
        "--instances", action="store_true", help="both folders hold object ids: score objects (AP, F1, PQ, SEG)"
    )
    p.add_argument("--csv", type=Path, help="--instances: also write the per-image and overall scores to this CSV")
    return p


def paired_masks(pred_dir: Path, truth_dir: Path) -> list[tuple[Path, Path]]:
    """(prediction, truth) per true mask; a true mask without a prediction is an error, not a skipped image."""
    predictions = {p.stem: p for p in list_images(require_folder(pred_dir, "--pred"))}
    truths = image_listing(require_folder(truth_dir, "--truth"))
    if truths.not_files:  # every true mask is scored or the score is refused
        path, problem = truths.not_files[0]
        raise UserError(f"{path}: {problem}, not a mask file (--truth)")
    truths = truths.files
    if not truths:
        raise UserError(f"{truth_dir}: no masks to score against (--truth)")
    missing = [t.name for t in truths if t.stem not in predictions]
    if missing:
        raise UserError(f"{pred_dir}: no prediction for {len(missing)} of {len(truths)} true masks ({missing[0]}, ...)")
    return [(predictions[t.stem], t) for t in truths]


def read_pair(pred_path: Path, truth_path: Path, *, binary: bool, ignore_value: int) -> tuple[np.ndarray, np.ndarray]:
    pred, truth = read_mask(pred_path), read_mask(truth_path)
    if pred.shape != truth.shape:
        h, w = truth.shape
        raise UserError(f"{pred_path}: {pred.shape[1]}x{pred.shape[0]}, its true mask {truth_path} is {w}x{h}")
    if binary:
        ignored = truth == ignore_value
        pred, truth = (pred != 0).astype(np.int64), (truth != 0).astype(np.int64)
        truth[ignored] = ignore_value
    return pred.astype(np.int64), truth.astype(np.int64)


def score(pairs: list[tuple[Path, Path]], *, binary: bool = False, ignore_value: int = IGNORE_INDEX) -> dict:
    """Per-class rows (records.class_report) and the means over the true masks' classes, from one confusion
    matrix over all pixels of all images (not a mean of per-image scores)."""
    arrays = [read_pair(p, t, binary=binary, ignore_value=ignore_value) for p, t in pairs]
    classes = np.unique(np.concatenate([np.unique(t) for _, t in arrays]))
    classes = classes[classes != ignore_value]
    if not classes.size:
        folder = pairs[0][1].parent
        raise UserError(f"{folder}: every true-mask pixel is --ignore-value {ignore_value}: nothing to score")
    other = len(classes)  # where predicted values the truth never holds go
    matrix = ConfusionMatrix(other + 1)
    for pred, truth in arrays:
        pred_index = np.searchsorted(classes, pred).clip(max=other)
        pred_index[classes[pred_index.clip(max=other - 1)] != pred] = other
        truth_index = np.where(truth == ignore_value, IGNORE_INDEX, np.searchsorted(classes, truth))
        matrix.update(torch.from_numpy(pred_index), torch.from_numpy(truth_index))
    rows = class_report(matrix, [str(c) for c in classes] + ["other"])[:other]
    correct = int(matrix.matrix.diag()[:other].sum())
    return {
        "rows": rows,
        "miou": float(np.nanmean([r["iou"] for r in rows])),
        "mdice": float(np.nanmean([r["dice"] for r in rows])),
        "pixel_acc": correct / max(int(matrix.matrix[:other].sum()), 1),
        "images": len(pairs),
    }


INSTANCE_COLUMNS = ("image", "true_objects", "pred_objects", *(f"ap{t}" for t in range(50, 100, 5)))
INSTANCE_COLUMNS += ("ap50_95", "f1", "pq", "seg")


def score_instances(pairs: list[tuple[Path, Path]]) -> list[dict]:
    """One row per image and a last one, "all", over every image's objects (summed, not a mean of the rows)."""
    overall, rows = InstanceScores(), []
    for pred_path, truth_path in pairs:
        pred = read_mask(pred_path, kind="instance mask")
        truth = read_mask(truth_path, kind="instance mask")
        if pred.shape != truth.shape:
            h, w = truth.shape
            raise UserError(f"{pred_path}: {pred.shape[1]}x{pred.shape[0]}, its true mask {truth_path} is {w}x{h}")
        rows.append({"image": truth_path.name, **overall.update(truth, pred)})
    return [*rows, {"image": "all", **overall.compute()}]


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = get_args_parser().parse_args(argv)
    pairs = paired_masks(args.pred, args.truth)
    if args.instances:
        rows = score_instances(pairs)
        if args.csv:
            write_csv(rows, INSTANCE_COLUMNS, args.csv)
        total = rows[-1]
        log.info(
            f"{len(pairs)} images, {total['true_objects']} true and {total['pred_objects']} predicted objects: "
            f"AP50 {total['ap50']:.4f}, AP75 {total['ap75']:.4f}, AP50-95 {total['ap50_95']:.4f}, "
            f"F1 {total['f1']:.4f}, PQ {total['pq']:.4f}, SEG {total['seg']:.4f}"
        )
        return 0
    result = score(pairs, binary=args.binary, ignore_value=args.ignore_value)
    log.info(format_report(result["rows"]))
    log.info(
        f"{result['images']} images: mIoU {result['miou']:.4f}, mean Dice {result['mdice']:.4f}, "
        f"pixel accuracy {result['pixel_acc']:.4f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
