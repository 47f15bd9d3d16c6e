"""Run records a researcher opens in a spreadsheet or diffs between runs: results.csv (one row per epoch) and the
per-class report (report.csv, report.json, the normalised confusion matrix)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import torch

from files import replace_atomically
from metrics import ConfusionMatrix

RESULT_COLUMNS = ("epoch", "train_loss", "val_loss", "miou", "mdice", "pixel_acc", "lr", "seconds", "images_per_s")
RESULT_COLUMNS += ("validated",)  # 1 or 0: an epoch not validated leaves the scores empty
OBJECT_COLUMNS = ("ap50", "ap75", "ap50_95", "f1", "pq", "seg")  # runs that learn objects: metrics.InstanceScores
REPORT_COLUMNS = ("class", "pixels", "iou", "dice", "precision", "recall")


def write_csv(rows: list[dict], columns: tuple[str, ...], path: Path) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with replace_atomically(path) as tmp:
        tmp.write_text(text.getvalue(), encoding="utf-8")


VALIDATION_KEYS = ("val_loss", "miou", "mdice", "pixel_acc")  # absent from the rows of epochs not validated


def epoch_record(
    epoch: int,
    *,
    train_loss: float,
    lr: float,
    seconds: tuple,
    images: int,
    validation=None,
) -> dict:
    """One row of the run's history (results.csv, TensorBoard): seconds = (training, the whole epoch); the
    validation's (engine.Validation) loss and scores where the epoch was validated (None: it was not)."""
    record = dict(epoch=epoch, train_loss=train_loss, lr=lr, seconds=seconds[1], images_per_s=images / seconds[0])
    if validation is None:
        return record | dict(validated=0)
    scores = {
        key: validation.metrics[key] for key in (*VALIDATION_KEYS[1:], *OBJECT_COLUMNS) if key in validation.metrics
    }
    return record | dict(val_loss=validation.loss, **scores, validated=1)


def write_results(history: list[dict], path: Path) -> None:
    """Rewritten whole from the history every epoch, so a resumed run (whose history is the checkpoint's) never
    holds an epoch twice or misses one."""
    objects = OBJECT_COLUMNS if any("ap50" in row for row in history) else ()
    write_csv(history, RESULT_COLUMNS[:-1] + objects + RESULT_COLUMNS[-1:], path)


def class_report(matrix: ConfusionMatrix, names: list[str]) -> list[dict]:
    """Per class: labelled pixels, IoU, Dice, precision, recall (NaN where undefined: no such pixels at all)."""
    scores = matrix.compute()
    pixels = matrix.matrix.sum(1).cpu().tolist()
    columns = zip(names, pixels, scores["iou"], scores["dice"], scores["precision"], scores["class_acc"], strict=True)
    return [dict(zip(REPORT_COLUMNS, (n, p, *map(float, rest)), strict=True)) for n, p, *rest in columns]


def format_report(rows: list[dict]) -> str:
    width = max(len("class"), *(len(row["class"]) for row in rows))
    lines = [f"{'class':<{width}} {'pixels':>12} {'IoU':>7} {'Dice':>7} {'precision':>9} {'recall':>7}"]
    for row in rows:
        lines.append(
            f"{row['class']:<{width}} {row['pixels']:>12,} {row['iou']:>7.4f} {row['dice']:>7.4f} "
            f"{row['precision']:>9.4f} {row['recall']:>7.4f}"
        )
    return "\n".join(lines)


def write_report(matrix: ConfusionMatrix, names: list[str], folder: Path) -> list[dict]:
    """report.csv, report.json (with the raw confusion matrix) and confusion_matrix.png in folder."""
    rows = class_report(matrix, names)
    write_csv(rows, REPORT_COLUMNS, folder / "report.csv")
    document = {"classes": rows, **summary(matrix), "confusion_matrix": matrix.matrix.cpu().tolist()}
    with replace_atomically(folder / "report.json") as tmp:
        tmp.write_text(json.dumps(without_nan(document), indent=1), encoding="utf-8")
    # matplotlib only here, so inference.py starts without it (a figure is drawn only with --masks_dir)
    from plots import confusion_matrix_figure, save_figure

    save_figure(confusion_matrix_figure(matrix.matrix, names), folder / "confusion_matrix.png")
    return rows


def summary(matrix: ConfusionMatrix) -> dict[str, float]:
    scores = matrix.compute()
    return {key: scores[key] for key in ("miou", "mdice", "pixel_acc")}


def confusion_from(values: list[list[int]]) -> ConfusionMatrix:
    """A saved confusion matrix (nested lists, as checkpoints hold it) back into a ConfusionMatrix."""
    matrix = ConfusionMatrix(len(values))
    matrix.matrix = torch.tensor(values, dtype=torch.int64)
    return matrix


def without_nan(value):
    """JSON has no NaN: an undefined score becomes null."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: without_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_nan(v) for v in value]
    return value
