"""How train.py's flags (train_flags.py) are filled in and resolved into settings: typed flags win, then a
--config file, then the checkpoint being resumed, then --preset and the demo's settings (presets.py), then the
parser's defaults."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from checkpoints import find_resume_checkpoint, load_checkpoint
from cli import (
    ArgumentParser,
)
from config_file import config_file_argv, replayable_flags
from demo import DEMO_ROOTS
from errors import CheckpointError, UserError
from files import printable
from presets import DEMO_SETTINGS, PRESETS
from settings import TrainSettings
from train_flags import get_args_parser

log = logging.getLogger(__name__)

DATA_FLAGS = ("data_root", "train_images", "train_masks", "val_images", "val_masks", "train_coco", "val_coco")
DATA_FLAGS += ("train_instances", "val_instances")
RESUME_KEYS = ("args", "epoch", "history", "best_miou", "mapping", "optimizer", "scaler", "rng")
# They fix the model, its classes or the shape of the optimiser's state.
MUST_MATCH_CHECKPOINT = (
    *("widths", "binary", "ignore_value", "coco_mode", "optimizer", "weight_decay", "separation"),
    *("in_channels", "normalize", "tiff_page"),
)
NEW_RUN_ONLY = {"preset", "time_budget"}  # a resumed run keeps its recipe and the epochs its budget fixed


def explicit_flags(parser: ArgumentParser, argv: list[str] | None) -> set[str]:
    """The flags the user typed, so demo and resume settings never override them.

    argparse fills in a default only where the namespace lacks the attribute, so a namespace
    pre-filled with a marker keeps the marker exactly where nothing was typed.
    """
    unset = object()
    probe = argparse.Namespace(**{name: unset for name in vars(parser.parse_args([]))})
    parser.parse_args(argv, probe)
    return {name for name, value in vars(probe).items() if value is not unset}


def flag_text(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def apply_checkpoint_flags(args: argparse.Namespace, given: set[str], checkpoint: dict) -> None:
    """Flags not typed again are taken from the checkpoint; typed ones that fix the model must agree with it."""
    path, saved = checkpoint["path"], checkpoint["args"]
    for name in MUST_MATCH_CHECKPOINT:
        ours, theirs = flag_text(getattr(args, name)), flag_text(saved.get(name))
        if name in given and ours != theirs:
            raise CheckpointError(f"{path}: trained with --{name.replace('_', '-')} {theirs}, not {ours}")
    for name, value in saved.items():
        if name not in given and name not in ("resume", "run_dir") and hasattr(args, name):
            setattr(args, name, Path(value) if name in DATA_FLAGS and value is not None else value)
    if args.run_dir is None:
        args.run_dir = path.parent.parent


def resumed_checkpoint(args: argparse.Namespace, given: set[str]) -> dict | None:
    """The checkpoint --resume names, with its flags applied to args; None for a new run."""
    if not args.resume:
        return None
    path = find_resume_checkpoint(args.resume, args.run_dir)
    if path is None:
        log.info("--resume auto: no checkpoint found, starting a new run")
        return None
    checkpoint = load_checkpoint(path)
    missing = [key for key in RESUME_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path}: not a training checkpoint, cannot resume from it (no {missing[0]})")
    checkpoint["path"] = path
    apply_checkpoint_flags(args, given, checkpoint)
    return checkpoint


def check_crop_flags(args: argparse.Namespace, parser: ArgumentParser) -> None:
    low, high = args.scale_range
    if low > high:
        raise UserError(f"--scale-range {low:g} {high:g}: LOW must not exceed HIGH")
    needs_crop = [
        name
        for name in ("scale_range", "base_size")
        if flag_text(getattr(args, name)) != flag_text(parser.get_default(name))  # set, not only typed
    ]
    if needs_crop and not args.crop_size:
        raise UserError(f"--{needs_crop[0].replace('_', '-')} applies to --crop-size training only")


def apply_preset(args: argparse.Namespace, values: dict, given: set[str]) -> None:
    """Each preset value not typed (or set by --config) replaces the parser's default."""
    for name, value in values.items():
        if name not in given:
            setattr(args, name, value)


def replay_values(flags: dict) -> dict:
    """A run's recorded flags as config.yaml holds them: those --config can set, less the demo's style for a run on
    other data, and less --epochs for a --time-budget run (the replay finds how many fit on its own machine)."""
    left_out = {"demo_style"} if not flags["demo"] else set()
    left_out |= {"epochs"} if flags["time_budget"] else set()
    replayable = set(replayable_flags(get_args_parser())) - left_out
    return {name: value for name, value in flags.items() if name in replayable}


def parse_args(argv: list[str] | None = None) -> tuple[TrainSettings, dict | None]:
    """The settings: typed flags, then from --config, the checkpoint being resumed, a preset or the demo's, then
    the parser's defaults; and the checkpoint being resumed (None for a new run)."""
    parser = get_args_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    config_path = parser.parse_known_args(argv)[0].config
    if config_path is not None:
        argv = config_file_argv(config_path, parser) + argv  # later tokens win: typed flags override the file
    args = parser.parse_args(argv)
    given = explicit_flags(parser, argv)
    checkpoint = resumed_checkpoint(args, given)
    typed_for_a_new_run = sorted(NEW_RUN_ONLY & given) if checkpoint else []
    if typed_for_a_new_run:
        flag = typed_for_a_new_run[0].replace("_", "-")
        raise UserError(f"--{flag} sets up a new run; --resume continues {checkpoint['path']} as it was set up")
    args.demo = not any(getattr(args, flag, None) for flag in DATA_FLAGS)
    if "demo_style" in given and not args.demo:
        raise UserError("--demo-style chooses the built-in demo; it does not apply with data flags")
    if checkpoint is None:
        apply_preset(args, DEMO_SETTINGS if args.demo else {}, given)
        apply_preset(args, PRESETS.get(args.preset, {}), given)
    if {"epochs", "time_budget"} <= given:
        raise UserError("--epochs and --time-budget: give one (a time budget sets the epochs)")
    check_crop_flags(args, parser)
    if args.run_dir is None:
        data = DEMO_ROOTS[args.demo_style] if args.demo else Path(os.path.realpath(args.data_root or args.train_images))
        name = data.name
        args.run_dir = Path("runs") / f"{printable(name)}-{time.strftime('%Y%m%d-%H%M%S')}"
    if printable(str(args.run_dir)) != str(args.run_dir):
        raise UserError(f"--run-dir {args.run_dir}: not a UTF-8 name, which TensorBoard's event files need")
    if checkpoint is None and (args.run_dir / "checkpoints" / "last.pt").exists():
        raise UserError(
            f"{args.run_dir}: already holds a run; pass --resume auto to continue it or choose another --run-dir"
        )
    args.widths, args.scale_range = tuple(args.widths), tuple(args.scale_range)
    return TrainSettings.from_flags(vars(args)), checkpoint
