"""Checkpoint files: what a training checkpoint holds, writing it atomically, reading it safely, finding one."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from labels import LabelMapping
from utils import UserError, replace_atomically

RUNS = Path("runs")


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message names the file."""


def plain_args(args: argparse.Namespace) -> dict:
    """Flags as strings, numbers and lists, so the checkpoint loads with weights_only=True."""
    return {
        k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()
    }


def training_state(
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    scaler: torch.amp.GradScaler,
    epoch: int,
    args: argparse.Namespace,
    mapping: LabelMapping,
    best_miou: float,
    history: list[dict],
) -> dict:
    """Plain tensors, numbers, strings, lists and dicts only, so it loads with weights_only=True."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,
        "best_miou": best_miou,
        "history": history,
        "mapping": mapping.to_dict(),
        "model_args": model.config,
        "image_size": args.image_size,
        "args": plain_args(args),
        "rng": torch.get_rng_state(),  # dropout draws from it; sampling and augmentation are seeded per epoch
    }


def save_checkpoint(state: dict, path: Path) -> None:
    with replace_atomically(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """weights_only=True: a checkpoint from elsewhere can hold tensors and plain data, never code."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for truncated, foreign or unsafe files
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: not a loadable checkpoint ({first_line})") from None
    if not isinstance(state, dict) or "model" not in state or "model_args" not in state:
        raise CheckpointError(f"{path}: not a checkpoint written by train.py")
    return state


def newest_checkpoint(name: str, runs: Path = RUNS) -> Path | None:
    """runs/*/checkpoints/<name> written most recently (by time, not by sorting names)."""
    candidates = list(runs.glob(f"*/checkpoints/{name}"))
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None
