"""What the peers and the two comparisons share (each peer runs in its own venv, with this folder on its path): the
command line, the split as arrays, the label images the instance peers write, the tuning split, the comparison loop
and its statistics."""

import argparse
import csv
import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


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
    args.seconds = seconds_left(args.seconds)  # the comparisons' one clock, started at launch, where they set it
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


def run_all(args, variants: list, run_one, columns: list[str], *extra) -> list[dict]:
    """compare.py's and compare_instances.py's loop: every set, seed and variant (a method, or a method and its
    settings) in that order, so the methods of a set and seed run one after another (interleaved: a slow hour hits
    them alike). Each run's row is printed and appended to OUT/results.csv as it ends, its per-image scores to
    OUT/per_image.csv (the paired intervals need only these two files, so a table can grow by seeds across days and
    an interrupted one keeps its rows); returns every row results.csv holds. --split tune runs each set's tuning
    split (tuning_view) in its place. run_one returns the run's row and its per-image rows."""
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.csv"
    if not args.table_only:
        for data in args.sets:
            data = tuning_view(data, args.out / "tuning-sets") if args.split == "tune" else data.resolve()
            for seed in (int(s) for s in args.seeds.split(",")):
                for variant in variants:
                    row, images = run_one(variant, data, seed, args.minutes, args.out.resolve(), *extra)
                    print(row, flush=True)
                    append_rows(results, columns, [{**row, "split": args.split}])
                    if images:  # a run that did not finish has none
                        image_rows = [{**image, "split": args.split} for image in images]
                        append_rows(args.out / "per_image.csv", list(image_rows[0]), image_rows)
    return read_rows(results)


def tuning_view(data: Path, views: Path) -> Path:
    """A set's tuning split, where defaults and every peer's settings are chosen: its training images in name
    order, the first half (the larger, for an odd count) to train on and the rest to score (a time-lapse set's
    later frames, as its report split's are), linked from views/SET with the set's layout. Its report images
    (DATA/*/val) are never in it."""
    data = data.resolve()
    images = sorted(p for p in (data / "images/train").iterdir() if p.is_file())
    if len(images) < 2:
        raise SystemExit(f"{data}/images/train: {len(images)} images, a tuning split needs at least 2")
    first = len(images) - len(images) // 2
    view = views.resolve() / data.name
    for folder in ("images", "masks", "masks_instance"):
        if not (data / folder / "train").is_dir():
            continue
        by_stem = {p.stem: p for p in (data / folder / "train").iterdir()}
        for split, chosen in (("train", images[:first]), ("val", images[first:])):
            (view / folder / split).mkdir(parents=True, exist_ok=True)
            for image in chosen:
                link = view / folder / split / by_stem[image.stem].name
                if not link.is_symlink():
                    link.symlink_to(by_stem[image.stem])
    for names in (data / "masks/train/classes.json", data / "masks/classes.json"):  # what the set calls its values
        link = view / names.relative_to(data)
        if names.is_file() and not link.is_symlink():
            link.symlink_to(names)
    return view


def pinned_env(threads: int, minutes: float) -> dict[str, str]:
    """One clock and the same threads for every method: PEER_DEADLINE, when its training must end (the budget
    counted from its first process's start, set-up included), and the thread counts torch, OpenMP and MKL read."""
    counts = {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "PEER_THREADS")}
    return {**os.environ, **counts, "PEER_DEADLINE": f"{time.time() + minutes * 60:.3f}"}


def run_commands(commands: list[list], env: dict[str, str]) -> dict:
    """A method's commands in turn from the repo's folder (their output echoed), failing on the first that fails;
    returns the last of their last lines that is JSON: what the run says of itself (steps, batch, numerics)."""
    details = {}
    for command in commands:
        ran = subprocess.run([str(part) for part in command], cwd=ROOT, env=env, check=True, stdout=subprocess.PIPE)
        output = ran.stdout.decode(errors="replace")
        print(output, end="", flush=True)
        last = output.strip().splitlines()[-1] if output.strip() else ""
        details = json.loads(last) if last.startswith("{") else details
    return details


def seconds_left(seconds: float) -> float:
    """A peer's training budget: until compare.py's PEER_DEADLINE where it set one, else SECONDS from now."""
    deadline = os.environ.get("PEER_DEADLINE")
    return float(deadline) - time.time() if deadline else seconds


def paired_intervals(image_rows: list[dict], score: str, reference: str = "ours", draws: int = 10_000) -> str:
    """Per set and method: the mean over report images and seeds of (reference's score - the method's score) on the
    same image and seed, and its bootstrap 95% interval (images x seeds resampled with replacement, seeded). A lead
    is claimed only where the interval excludes 0, "even" otherwise. image_rows: per_image.csv's rows."""
    per_image: dict[tuple, dict] = {}
    for row in image_rows:
        if row.get("split", "report") == "report" and row[score] not in ("", "nan"):
            key = (row["set"], float(row["minutes"]), row["method"])
            per_image.setdefault(key, {})[(row["seed"], row["image"])] = float(row[score])
    lines = [f"| set | minutes | ours - method, {score} per image | 95% interval | lead? |", "| --- " * 5 + "|"]
    rng = np.random.default_rng(0)
    for (data, minutes, method), scores in sorted(per_image.items()):
        ours = per_image.get((data, minutes, reference), {})
        keys = sorted(set(scores) & set(ours))
        if method == reference or not keys:
            continue
        differences = np.array([ours[key] - scores[key] for key in keys])
        means = differences[rng.integers(0, len(keys), (draws, len(keys)))].mean(1)
        low, high = np.percentile(means, [2.5, 97.5])
        verdict = "ours" if low > 0 else ("theirs" if high < 0 else "even")
        lines.append(
            f"| {data} | {minutes:g} | {method}: {differences.mean():+.3f} ({len(keys)} images x seeds) | "
            f"{low:+.3f} to {high:+.3f} | {verdict} |"
        )
    return "\n".join(lines)


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
