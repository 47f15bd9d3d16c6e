"""This repo's defaults and the peers on the same data, the same wall time and the same seeds, every prediction
scored at full size by score_masks.py (foreground against background: any value > 0 is foreground).

    python peers/compare.py --sets data/real/phc data/real/bbbc007 data/real/gravel \\
        --methods ours,smp,nnunet,pytorch-unet --seeds 0,1,2 --minutes 5 --out runs/peers

One run at a time, each in its own process: the 2-core machines this is run on slow down 10-40x when two torch
jobs share them. Every run appends a row to OUT/results.csv (so an interrupted table keeps its rows); the table
of means and spreads is printed from all rows at the end (--table-only: just print it). The peers need their own
virtual environments (README.md here); the product never imports this folder.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "peers")]

from peer_common import run_all  # noqa: E402  (this folder's shared code)

from score_masks import paired_masks, score  # noqa: E402  (the product's evaluator, from its folder)

COLUMNS = ["method", "set", "seed", "minutes", "foreground_iou", "miou", "wall_s"]
SMP_PYTHON = os.environ.get("PEER_SMP_PYTHON", "/tmp/smp-venv/bin/python")


def ours(data: Path, pred: Path, seed: int, minutes: float, extra: list[str]) -> list[list[str]]:
    """train.py with its defaults for the budget, then inference.py on the validation images with last.pt (never a
    checkpoint chosen on those images)."""
    run = pred.parent / f"{pred.name}-run"
    checkpoint = run / "checkpoints" / "last.pt"
    train = ["train.py", "--data-root", data, "--time-budget", minutes, "--seed", seed, "--run-dir", run, *extra]
    infer = ["inference.py", "--input_dir", data / "images/val", "--checkpoint", checkpoint, "--output_dir", pred]
    return [[sys.executable, *train], [sys.executable, *infer, "--overwrite"]]


def smp(data: Path, pred: Path, seed: int, minutes: float, extra: list[str]) -> list[list[str]]:
    return [[SMP_PYTHON, ROOT / "peers/smp_unet.py", data, pred / "masks", minutes * 60, "--seed", seed, *extra]]


def nnunet(data: Path, pred: Path, seed: int, minutes: float, extra: list[str]) -> list[list[str]]:
    """nnU-Net has no seed flag: its runs differ by their random draws alone."""
    return [["bash", ROOT / "peers/nnunet_2d.sh", data, pred / "masks", minutes * 60]]


def pytorch_unet(data: Path, pred: Path, seed: int, minutes: float, extra: list[str]) -> list[list[str]]:
    """Pytorch-UNet has no seed flag either (its split is seeded, its weights are not)."""
    return [["bash", ROOT / "peers/pytorch_unet.sh", data, pred / "masks", minutes * 60]]


METHODS = {"ours": ours, "smp": smp, "nnunet": nnunet, "pytorch-unet": pytorch_unet}


def run_one(method: str, data: Path, seed: int, minutes: float, out: Path, extra: list[str]) -> dict:
    pred = out / f"{method}-{data.name}-seed{seed}-{minutes:g}min"
    started = time.monotonic()
    for command in METHODS[method](data, pred, seed, minutes, extra):
        subprocess.run([str(part) for part in command], cwd=ROOT, check=True)
    wall = time.monotonic() - started
    if (pred / "masks" / "DID_NOT_FINISH").exists():  # no model within the budget: no score, not a score of 0
        return dict(zip(COLUMNS, [method, data.name, seed, minutes, "", "", round(wall)], strict=True))
    result = score(paired_masks(pred / "masks", data / "masks/val"), binary=True)
    foreground = next(row["iou"] for row in result["rows"] if row["class"] == "1")
    return dict(zip(COLUMNS, [method, data.name, seed, minutes, foreground, result["miou"], round(wall)], strict=True))


def table(rows: list[dict]) -> str:
    """Mean and spread (min-max) of the foreground IoU per method, set and budget."""
    groups: dict[tuple, list[float | None]] = {}
    for row in rows:
        value = float(row["foreground_iou"]) if row["foreground_iou"] not in ("", None) else None
        groups.setdefault((row["set"], row["minutes"], row["method"]), []).append(value)
    lines = ["| set | minutes | method | runs | foreground IoU, mean | min - max |", "| --- " * 6 + "|"]
    for (data, minutes, method), found in sorted(groups.items()):
        values, unfinished = [v for v in found if v is not None], found.count(None)
        dnf = f" ({unfinished} did not finish)" if unfinished else ""
        if not values:
            lines.append(f"| {data} | {minutes} | {method} | {len(found)} | did not finish | |")
            continue
        spread = f"{min(values):.3f} - {max(values):.3f}"
        mean = statistics.mean(values)
        lines.append(f"| {data} | {minutes} | {method} | {len(values)}{dnf} | {mean:.3f} | {spread} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", type=Path, nargs="+", default=[])
    p.add_argument("--methods", default="ours,smp,nnunet", help=f"comma-separated, of {','.join(METHODS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--out", type=Path, default=ROOT / "runs/peers")
    p.add_argument("--table-only", action="store_true")
    args, extra = p.parse_known_args()  # anything else goes to the method (e.g. a train.py flag for ours)
    rows = run_all(args, run_one, COLUMNS, extra)
    if rows:
        print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
