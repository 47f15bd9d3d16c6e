"""This repo's defaults and the peers on the same data, the same wall time and the same seeds, every prediction
scored at full size by score_masks.py (foreground against background: any value > 0 is foreground), under one
protocol (docs/results.md) that every method goes through alike:

1. search: each method's small grid (SEARCH) on each set's tuning split, the set's training images split in two
   (peer_common.tuning_view), never on the images that report:
       python peers/compare.py --split tune --search --sets data/real/phc ... --methods ours,smp --out runs/tune
2. freeze: each method's setting with the best mean foreground IoU over its tuning rows goes to peers/frozen.json:
       python peers/compare.py --out runs/tune --freeze
3. report: each method once per seed with its frozen setting, trained on DATA/*/train and scored on DATA/*/val:
       python peers/compare.py --sets data/real/phc data/real/bbbc007 data/real/gravel \\
           --methods ours,smp,nnunet,pytorch-unet --seeds 0,1,2 --minutes 5 --out runs/peers

One clock: each method's training ends at PEER_DEADLINE, the budget after its first process started (a peer's
conversion, planning and loading inside it; ours counts from train.py's main()); prediction follows, its time in
wall_s. Every process gets the same threads (--threads) and fp32 (the peers have no bf16, so ours runs with
--precision fp32). Within a set and seed the methods run one after another (interleaved: a slow hour hits them
alike), one at a time: the 2-core machines this is run on slow down 10-40x when two torch jobs share them. Every
run appends its row to OUT/results.csv and its per-image foreground IoU to OUT/per_image.csv (so an interrupted
table keeps its rows); the table of means and spreads and each lead's paired bootstrap interval are printed from
all rows at the end (--table-only: just print them). The peers need their own virtual environments (README.md
here); the product never imports this folder.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "peers")]

from peer_common import paired_intervals, pinned_env, read_rows, run_all, run_commands  # noqa: E402  (this folder's shared code)

from checkpoints import load_checkpoint  # noqa: E402  (the product's own files and evaluator, from its folder)
from score_masks import paired_masks, score  # noqa: E402

COLUMNS = ["method", "settings", "split", "set", "seed", "minutes", "foreground_iou", "miou", "wall_s", "details"]
SMP_PYTHON = os.environ.get("PEER_SMP_PYTHON", "/tmp/smp-venv/bin/python")
FROZEN = ROOT / "peers/frozen.json"


def grid(**values: tuple) -> list[dict]:
    return [dict(zip(values, chosen, strict=True)) for chosen in itertools.product(*values.values())]


SEARCH = {  # each method's search on the tuning split, within its own documented options
    "ours": grid(batch=(4, 8), lr=(3e-4, 1e-3, 3e-3)),
    "smp": grid(batch=(4, 8), lr=(3e-4, 1e-3, 3e-3), augment=("ours",)),  # ours' geometry and colour, its pipeline
    "nnunet": grid(memory=(8, 2, 0.5)),  # the memory (GB) its planner sizes patch and batch for; 8 is its default
    "nnunet-default": [{}],  # its default plan as it ships: never searched, a second row beside the searched one
    "pytorch-unet": grid(scale=(0.5, 0.25)),  # its --scale: the one that fits epochs into the budget
}


def ours(data: Path, pred: Path, seed: int, minutes: float, settings: dict) -> list[list]:
    """train.py with its defaults (and settings) for the budget in fp32, then inference.py on the validation images
    with last.pt (never a checkpoint chosen on those images)."""
    run = pred.parent / f"{pred.name}-run"
    checkpoint = run / "checkpoints" / "last.pt"
    chosen = [*(("--batch-size", settings["batch"]) if "batch" in settings else ()), "--precision", "fp32"]
    chosen += [*(("--lr", settings["lr"]) if "lr" in settings else ()), *settings.get("flags", ())]
    train = ["train.py", "--data-root", data, "--time-budget", minutes, "--seed", seed, "--run-dir", run, *chosen]
    infer = ["inference.py", "--input_dir", data / "images/val", "--checkpoint", checkpoint, "--output_dir", pred]
    return [[sys.executable, *train], [sys.executable, *infer, "--overwrite", "--precision", "fp32"]]


def smp(data: Path, pred: Path, seed: int, minutes: float, settings: dict) -> list[list]:
    chosen = [f"--{name}={value}" for name, value in settings.items()]
    return [[SMP_PYTHON, ROOT / "peers/smp_unet.py", data, pred / "masks", minutes * 60, "--seed", seed, *chosen]]


def nnunet(data: Path, pred: Path, seed: int, minutes: float, settings: dict) -> list[list]:
    """nnU-Net has no seed flag: its runs differ by their random draws alone. Its planner sizes patch and batch for
    settings' memory, or for its default (its default plan)."""
    memory = [settings["memory"]] if "memory" in settings else []
    return [["bash", ROOT / "peers/nnunet_2d.sh", data, pred / "masks", minutes * 60, *memory]]


def pytorch_unet(data: Path, pred: Path, seed: int, minutes: float, settings: dict) -> list[list]:
    """Pytorch-UNet has no seed flag either (its split is seeded, its weights are not)."""
    return [["bash", ROOT / "peers/pytorch_unet.sh", data, pred / "masks", minutes * 60, settings.get("scale", 0.5)]]


METHODS = {"ours": ours, "smp": smp, "nnunet": nnunet, "nnunet-default": nnunet, "pytorch-unet": pytorch_unet}


def frozen_settings(method: str) -> dict:
    """The method's setting chosen on the tuning split (--freeze wrote it to peers/frozen.json); a method with nothing
    to search runs as it ships."""
    if SEARCH[method] == [{}]:
        return {}
    return json.loads(FROZEN.read_text())["methods"][method]["settings"]


def variants(methods: list[str], search: bool, flags: list[str]) -> list[tuple[str, dict]]:
    """(method, settings) in the order they run: each method's grid (search) or frozen setting, the methods'
    points taken in turn (ours' first point, smp's first, ours' second, ...) so a slow hour hits them alike; flags
    compare.py does not know are train.py's, for ours."""

    def settings_of(method: str) -> list[tuple[str, dict]]:
        extra = {"flags": flags} if method == "ours" and flags else {}
        return [(method, chosen | extra) for chosen in (SEARCH[method] if search else [frozen_settings(method)])]

    grids = [settings_of(method) for method in methods]
    return [variant for turn in itertools.zip_longest(*grids) for variant in turn if variant]


def run_one(variant: tuple[str, dict], data: Path, seed: int, minutes: float, out: Path, threads: int):
    """One run of a method with its settings: its row and the foreground IoU of each report image."""
    method, settings = variant
    name = "-".join([f"{key}{value}" for key, value in settings.items() if key != "flags"] + settings.get("flags", []))
    pred = out / f"{method}{'-' + name if name else ''}-{data.name}-seed{seed}-{minutes:g}min"
    started = time.monotonic()
    details = run_commands(METHODS[method](data, pred, seed, minutes, settings), pinned_env(threads, minutes))
    wall = time.monotonic() - started
    if method == "ours":
        details = ours_details(pred.parent / f"{pred.name}-run")
    run = {"method": method, "settings": json.dumps(settings, sort_keys=True), "set": data.name, "seed": seed}
    run |= {"minutes": minutes}
    done = {"wall_s": round(wall), "details": json.dumps(details)}
    if (pred / "masks" / "DID_NOT_FINISH").exists():  # no model within the budget: no score, not a score of 0
        return run | done | {"foreground_iou": "", "miou": ""}, []
    pairs = paired_masks(pred / "masks", data / "masks/val")
    images = [run | {"image": t.name, "foreground_iou": foreground_iou(score([(p, t)], binary=True))} for p, t in pairs]
    result = score(pairs, binary=True)
    return run | done | {"foreground_iou": foreground_iou(result), "miou": result["miou"]}, images


def foreground_iou(result: dict) -> float:
    return next((row["iou"] for row in result["rows"] if row["class"] == "1"), float("nan"))


def ours_details(run: Path) -> dict:
    """What ours ran: its optimiser steps and epochs, batch, crop and numerics, from its last checkpoint."""
    state = load_checkpoint(run / "checkpoints/last.pt")
    steps = max((int(s["step"]) for s in state["optimizer"]["state"].values()), default=0)
    chosen = {key: state["args"][key] for key in ("batch_size", "crop_size", "precision", "channels_last")}
    return {"steps": steps, "epochs": state["epoch"], **chosen}


def table(rows: list[dict]) -> str:
    """Mean and spread (min-max) of the foreground IoU per split, set, budget, method and settings."""
    groups: dict[tuple, list[float | None]] = {}
    for row in rows:
        value = float(row["foreground_iou"]) if row["foreground_iou"] not in ("", None) else None
        key = (row.get("split", "report"), row["set"], row["minutes"], row["method"], row.get("settings", "{}"))
        groups.setdefault(key, []).append(value)
    header = "| split | set | minutes | method | settings | runs | foreground IoU, mean | min - max |"
    lines = [header, "| --- " * 8 + "|"]
    for (split, data, minutes, method, settings), found in sorted(groups.items()):
        values, unfinished = [v for v in found if v is not None], found.count(None)
        start = f"| {split} | {data} | {minutes} | {method} | {settings_text(settings)} |"
        if not values:
            lines.append(f"{start} {len(found)} | did not finish | |")
            continue
        dnf = f" ({unfinished} did not finish)" if unfinished else ""
        spread = f"{min(values):.3f} - {max(values):.3f}"
        lines.append(f"{start} {len(values)}{dnf} | {statistics.mean(values):.3f} | {spread} |")
    return "\n".join(lines)


def settings_text(settings: str) -> str:
    chosen = json.loads(settings)
    return ", ".join(f"{key} {value}" for key, value in chosen.items()) or "its defaults"


def freeze(rows: list[dict], source: Path) -> dict:
    """Each method's setting with the best mean foreground IoU over its tuning rows (every set and seed it ran on
    weighs alike; a run that did not finish counts as 0 here, a setting that cannot train in the budget is not
    chosen), and what was searched, as peers/frozen.json holds them."""
    means: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        if row.get("split") == "tune":
            value = float(row["foreground_iou"]) if row["foreground_iou"] else 0.0
            means.setdefault(row["method"], {}).setdefault(row["settings"], []).append(value)
    frozen = {}
    for method, by_setting in sorted(means.items()):
        best = max(by_setting, key=lambda s: statistics.mean(by_setting[s]))
        searched = {settings_text(s): round(statistics.mean(v), 4) for s, v in by_setting.items()}
        frozen[method] = {
            "settings": json.loads(best),
            "tuning_mean": searched[settings_text(best)],
            "searched": searched,
        }
    return {"chosen_on": str(source), "date": datetime.date.today().isoformat(), "methods": frozen}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", type=Path, nargs="+", default=[])
    p.add_argument("--methods", default="ours,smp,nnunet", help=f"comma-separated, of {','.join(METHODS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--out", type=Path, default=ROOT / "runs/peers")
    p.add_argument("--split", choices=("report", "tune"), default="report", help="tune: each set's tuning split")
    p.add_argument("--search", action="store_true", help="each method's SEARCH grid (with --split tune only)")
    p.add_argument("--freeze", action="store_true", help="write OUT's best tuning settings to peers/frozen.json")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch/OpenMP/MKL threads of every method")
    p.add_argument("--table-only", action="store_true")
    args, flags = p.parse_known_args()  # anything else: train.py flags for ours, recorded in its settings
    if args.search and args.split != "tune":
        p.error("--search chooses settings: it runs on --split tune only, never on the images that report")
    if args.freeze:  # the methods searched in OUT replace their entries; the others keep theirs
        chosen = freeze(read_rows(args.out / "results.csv"), args.out)
        chosen["methods"] = json.loads(FROZEN.read_text())["methods"] | chosen["methods"]
        FROZEN.write_text(json.dumps(chosen, indent=1) + "\n")
        print(FROZEN.read_text())
        return 0
    chosen = [] if args.table_only else variants(args.methods.split(","), args.search, flags)
    rows = run_all(args, chosen, run_one, COLUMNS, args.threads)
    if rows:
        print(table(rows))
        print(paired_intervals(read_rows(args.out / "per_image.csv"), "foreground_iou"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
