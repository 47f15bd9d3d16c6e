"""Objects: this repo's instance model, its semantic model split into connected components (what a user had before),
StarDist 2D and Cellpose, each trained from scratch on the same split for the same wall time and seed, every
prediction's objects scored by score_masks.py --instances against DATA/masks_instance/val.

    python peers/compare_instances.py --sets data/real/gravel data/real/bbbc007 data/real/phc \\
        --methods ours,components,stardist,cellpose --seeds 0,1,2 --minutes 5 --out runs/instances

Within each set and seed the methods run one after another in one invocation (interleaved: a slow hour hits them
alike), one at a time. Every run appends a row to OUT/results.csv and its per-image AP50 to OUT/per_image.csv (the
paired intervals need only these two files, so a table can grow by seeds across days: docs/results/ keeps them); the
table of means and spreads is printed from all rows at the end (--table-only: just print it), then each lead's paired
bootstrap interval. --split tune runs each set's tuning split instead (peers/compare.py's protocol). StarDist and
Cellpose need their venvs (peers/README.md). --ceilings prints what perfect masks and separation maps allow.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "peers")]

from compare import ours_details  # noqa: E402  (this folder's shared code)
from peer_common import paired_intervals, pinned_env, read_rows, run_all, run_commands  # noqa: E402

from image_io import read_mask  # noqa: E402  (the product's reader and evaluator, from its folder)
from instances import SEPARATIONS, ObjectRule, object_areas, objects_from, separation_target  # noqa: E402
from listing import list_images  # noqa: E402
from metrics import InstanceScores  # noqa: E402
from score_masks import paired_masks, score_instances  # noqa: E402

SCORES = ["ap50", "ap75", "ap50_95", "f1", "pq", "seg", "true_objects", "pred_objects"]
COLUMNS = ["method", "split", "set", "seed", "minutes", *SCORES, "wall_s", "details"]
STARDIST_PYTHON = os.environ.get("PEER_STARDIST_PYTHON", "/tmp/stardist-venv/bin/python")
CELLPOSE_PYTHON = os.environ.get("PEER_CELLPOSE_PYTHON", "/tmp/cellpose-venv/bin/python")


def ours(data: Path, out: Path, seed: int, minutes: float, instances: bool = True) -> list[list]:
    """train.py with its defaults for the budget (instances learnt from masks_instance/, or --instances off), then
    inference.py on the validation images with last.pt (never a checkpoint chosen on those images)."""
    run = out.parent / f"{out.name}-run"
    train = ["train.py", "--data-root", data, "--time-budget", minutes, "--seed", seed, "--run-dir", run]
    train += ["--precision", "fp32", *([] if instances else ["--instances", "off"])]  # fp32 like the peers
    infer = ["inference.py", "--input_dir", data / "images/val", "--checkpoint", run / "checkpoints/last.pt"]
    return [
        [sys.executable, *train],
        [sys.executable, *infer, "--output_dir", out, "--overwrite", "--precision", "fp32"],
    ]


def components(data: Path, out: Path, seed: int, minutes: float) -> list[list]:
    return ours(data, out, seed, minutes, instances=False)


def stardist(data: Path, out: Path, seed: int, minutes: float) -> list[list]:
    return [[STARDIST_PYTHON, ROOT / "peers/stardist_2d.py", data, out, minutes * 60, "--seed", seed]]


def cellpose(data: Path, out: Path, seed: int, minutes: float) -> list[list]:
    return [[CELLPOSE_PYTHON, ROOT / "peers/cellpose_2d.py", data, out, minutes * 60, "--seed", seed]]


METHODS = {"ours": ours, "components": components, "stardist": stardist, "cellpose": cellpose}


def split_components(out: Path) -> None:
    """The semantic model's masks split into connected components (4-connected, scipy's default): its objects."""
    (out / "instances").mkdir(exist_ok=True)
    for path in list_images(out / "masks"):
        ids, _ = ndimage.label(read_mask(path) > 0)
        Image.fromarray(ids.astype(np.uint16)).save(out / "instances" / path.name)


def run_one(method: str, data: Path, seed: int, minutes: float, out: Path, threads: int) -> tuple[dict, list[dict]]:
    pred = out / f"{method}-{data.name}-seed{seed}-{minutes:g}min"
    started = time.monotonic()
    details = run_commands(METHODS[method](data, pred, seed, minutes), pinned_env(threads, minutes))
    if method == "components":
        split_components(pred)
    wall = time.monotonic() - started
    if method in ("ours", "components"):
        details = ours_details(pred.parent / f"{pred.name}-run")
    *images, total = score_instances(paired_masks(pred / "instances", data / "masks_instance/val"))
    run = {"method": method, "set": data.name, "seed": seed, "minutes": minutes}
    done = {"wall_s": round(wall), "details": json.dumps(details)}
    return run | {key: total[key] for key in SCORES} | done, [
        run | {"image": i["image"], "ap50": i["ap50"]} for i in images
    ]


def table(rows: list[dict]) -> str:
    """Mean and spread (min-max) of AP50, and the means of AP50-95 and PQ, per set, budget and method."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["set"], row["minutes"], row["method"]), []).append(row)
    lines = ["| set | minutes | method | runs | AP50, mean | min - max | AP50-95 | PQ |", "| --- " * 8 + "|"]
    for (data, minutes, method), group in sorted(groups.items()):
        ap50 = [float(row["ap50"]) for row in group]
        means = [statistics.mean(float(row[key]) for row in group) for key in ("ap50_95", "pq")]
        lines.append(
            f"| {data} | {minutes} | {method} | {len(group)} | {statistics.mean(ap50):.3f} | "
            f"{min(ap50):.3f} - {max(ap50):.3f} | {means[0]:.3f} | {means[1]:.3f} |"
        )
    return "\n".join(lines)


def ceilings(sets: list[Path]) -> str:
    """What a perfect model allows on each set's validation images: its true foreground split into connected
    components (the most a semantic model can give), and the true separation map of each kind turned into objects
    by the same seeded watershed and size rule as inference (what each representation could give at best)."""
    lines = [
        "| set | true objects | perfect foreground, components | "
        + " | ".join(f"perfect {kind} map" for kind in SEPARATIONS)
        + " |",
        "| --- " * (3 + len(SEPARATIONS)) + "|",
    ]
    for data in sets:
        truths = [read_mask(path) for path in list_images(data / "masks_instance/val")]
        areas = np.concatenate([object_areas(read_mask(path)) for path in list_images(data / "masks_instance/train")])
        scores = {kind: InstanceScores() for kind in ("components", *SEPARATIONS)}
        for truth in truths:
            scores["components"].update(truth, ndimage.label(truth > 0)[0])
            for kind in SEPARATIONS:
                found = objects_from(truth > 0, separation_target(truth, kind), ObjectRule.for_separation(kind, areas))
                scores[kind].update(truth, found)
        totals = {kind: score.compute() for kind, score in scores.items()}
        kinds = ("components", *SEPARATIONS)
        cells = " | ".join(f"{totals[kind]['ap50']:.3f} ({totals[kind]['pred_objects']} objects)" for kind in kinds)
        lines.append(f"| {data.name} | {totals['components']['true_objects']} | {cells} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", type=Path, nargs="+", default=[])
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {','.join(METHODS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--out", type=Path, default=ROOT / "runs/instances")
    p.add_argument("--split", choices=("report", "tune"), default="report", help="tune: each set's tuning split")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch/OpenMP/MKL threads of every method")
    p.add_argument("--table-only", action="store_true")
    p.add_argument("--ceilings", action="store_true", help="only what perfect masks and maps allow on --sets")
    args = p.parse_args()
    if args.ceilings:
        print(ceilings(args.sets))
        return 0
    rows = run_all(args, args.methods.split(","), run_one, COLUMNS, args.threads)
    if rows:
        print(table(rows))
        print(paired_intervals(read_rows(args.out / "per_image.csv"), "ap50"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
