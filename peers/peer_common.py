"""What the instance peers' scripts share (each runs in its own venv, with this folder on its path): the command
line, the split as arrays, and the label images they write."""

import argparse
import csv
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image


def peer_args(thresholds_only: bool = False) -> argparse.Namespace:
    """DATA OUT SECONDS [--seed N]: the set, where its label images go, the wall-clock budget (thresholds_only: the
    flag StarDist's script gives the child process that picks its thresholds)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("data", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("seconds", type=float)
    parser.add_argument("--seed", type=int, default=0)
    if thresholds_only:
        parser.add_argument("--thresholds-only", action="store_true")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    return args


def load_split(data: Path, split: str, mode: str) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """DATA/images/SPLIT/*.png as float32 arrays in the PIL mode asked for ("L" or "RGB"), their instance masks from
    DATA/masks_instance/SPLIT (int32 ids) and their stems, in name order."""
    images, labels, names = [], [], []
    for path in sorted((data / "images" / split).glob("*.png")):
        images.append(np.asarray(Image.open(path).convert(mode)).astype(np.float32))
        labels.append(np.asarray(Image.open(data / "masks_instance" / split / path.name)).astype(np.int32))
        names.append(path.stem)
    return images, labels, names


def is_rgb(data: Path) -> bool:
    first = Image.open(sorted((data / "images" / "train").glob("*.png"))[0])
    return first.mode not in ("L", "I;16", "I")


def write_labels(out: Path, names: list[str], labels: list[np.ndarray], summary: dict) -> None:
    """OUT/instances/STEM.png (uint16 ids) for each image, and the run's summary as the last line of stdout."""
    os.makedirs(out / "instances", exist_ok=True)
    for stem, ids in zip(names, labels, strict=True):
        Image.fromarray(ids.astype(np.uint16)).save(out / "instances" / f"{stem}.png")
    print(json.dumps(summary))


def run_all(args, run_one, columns: list[str], *extra) -> list[dict]:
    """compare.py's and compare_instances.py's loop: every set, seed and method in that order (the methods of a set
    and seed one after another), each run's row printed and appended to OUT/results.csv as it ends, so an
    interrupted table keeps its rows; returns every row the file holds."""
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.csv"
    if not args.table_only:
        for data in args.sets:
            for seed in (int(s) for s in args.seeds.split(",")):
                for method in args.methods.split(","):
                    row = run_one(method, data.resolve(), seed, args.minutes, args.out.resolve(), *extra)
                    print(row, flush=True)
                    append_rows(results, columns, [row])
    return read_rows(results)


def append_rows(path: Path, columns: list[str], rows: list[dict]) -> None:
    """Rows appended to a CSV file, its header written first where the file is new."""
    new = not path.exists()
    with path.open("a", newline="") as file:
        writer = csv.DictWriter(file, columns)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def read_rows(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open())) if path.exists() else []
