"""Checkpoint files: what a training checkpoint holds, writing it atomically, reading it safely, finding one."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel

from errors import CheckpointError, MissingCheckpoint
from files import replace_atomically, require_file
from image_io import ImageReading
from instances import ObjectRule
from intensity import Normalization
from labels import LabelMapping
from model import ResidualAttnUNet
from utils import first_line

RUNS = Path("runs")
# Raised when what a checkpoint holds changes meaning; a reader of version N reads N only (current_format).
FORMAT_VERSION = 2


@dataclass(frozen=True)
class DataSpec:
    """How a model sees its data, saved with it so inference sees files the same way: the label mapping, how
    files become its input channels, and how their values are normalised."""

    mapping: LabelMapping
    reading: ImageReading
    normalization: Normalization
    objects: ObjectRule | None = None  # a model trained on instance masks: how its maps become objects

    def to_state(self) -> dict:
        objects = {} if self.objects is None else {"objects": self.objects.to_dict()}
        return {
            "mapping": self.mapping.to_dict(),
            "reading": self.reading.to_dict(),
            "normalization": self.normalization.to_dict(),
            **objects,
        }

    @classmethod
    def from_state(cls, state: dict) -> DataSpec:
        return cls(
            LabelMapping.from_dict(state["mapping"]),
            ImageReading.from_dict(state["reading"]),
            Normalization.from_dict(state["normalization"]),
            ObjectRule.from_dict(state["objects"]) if state.get("objects") else None,
        )


def training_state(
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    ema: AveragedModel | None,
    epoch: int,
    flags: dict,
    spec: DataSpec,
    best_miou: float,
    best_confusion: list[list[int]] | None,
    history: list[dict],
) -> dict:
    """Plain tensors, numbers, strings, lists and dicts only, so it loads with weights_only=True. flags: the run's
    recorded flags (settings.recorded_flags), plain values. The learning rate is a function of the epochs
    done (optimizer.scheduled_lr), so no scheduler state is needed to resume."""
    extra = {} if ema is None else {"ema": ema.module.state_dict(), "ema_updates": int(ema.n_averaged)}
    return {
        "format_version": FORMAT_VERSION,
        "model": model.state_dict(),
        **extra,
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,
        "best_miou": best_miou,
        "best_confusion": best_confusion,  # the best epoch's validation confusion matrix, for the final report
        "history": history,
        **spec.to_state(),
        "model_args": model.config,
        "args": flags,
        "rng": torch.get_rng_state(),  # dropout draws from it; sampling and augmentation are seeded per epoch
    }


def save_checkpoint(state: dict, path: Path) -> None:
    """Serialised in memory first: torch.save reports a failing disk without its cause, Python's write does."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with replace_atomically(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """weights_only=True: a checkpoint from elsewhere can hold tensors and plain data, never code."""
    require_file(path, "checkpoint file", CheckpointError, MissingCheckpoint)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for truncated, foreign or unsafe files
        raise CheckpointError(f"{path}: not a loadable checkpoint ({first_line(err)})") from None
    if not isinstance(state, dict) or "model" not in state or "model_args" not in state:
        raise CheckpointError(f"{path}: not a checkpoint written by train.py")
    return current_format(state, path)


def current_format(state: dict, path: Path) -> dict:
    """The one place where checkpoint formats are told apart: a state in today's format is returned as it is,
    any other is refused in one line naming its version (no earlier format reached a user)."""
    problem = format_problem(state.get("format_version", 1))
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    return state


def format_problem(version) -> str | None:
    """Why a checkpoint (or an ONNX file exported from one) of this format version cannot be read; None: it can."""
    if version == FORMAT_VERSION:
        return None
    return f"checkpoint format version {version}; this version reads {FORMAT_VERSION}"


def training_flags(state: dict) -> dict:
    """The flags the run was trained with (settings.recorded_flags)."""
    return state["args"]


def load_model_weights(
    model: torch.nn.Module, state: dict, path: Path, *, assign: bool = False, key: str = "model"
) -> None:
    """load_state_dict, with one line naming the file and the first weight that is missing, extra or misshapen.
    key: "model", or "ema" for the moving average of an --ema run."""
    weights = state.get(key)
    if not isinstance(weights, dict) or not weights:
        raise CheckpointError(f"{path}: holds no model weights")
    expected = model.state_dict()
    for name, tensor in expected.items():
        found = weights.get(name)
        if not isinstance(found, torch.Tensor):
            raise CheckpointError(f"{path}: no weight {name} for a model of its model_args {state.get('model_args')}")
        if found.shape != tensor.shape:
            raise CheckpointError(
                f"{path}: weight {name} is {tuple(found.shape)}, a model of its model_args needs {tuple(tensor.shape)}"
            )
    extra = next((name for name in weights if name not in expected), None)
    if extra is not None:
        raise CheckpointError(f"{path}: weight {extra} does not belong to a model of its model_args")
    model.load_state_dict(weights, assign=assign)


def model_from_checkpoint(state: dict, path: Path, *, ema: bool = True) -> ResidualAttnUNet:
    """The model its model_args describe, with its weights (the EMA's where the run kept one, unless ema=False);
    built on the meta device, so nothing is initialised only to be overwritten."""
    try:
        with torch.device("meta"):
            model = ResidualAttnUNet(**state["model_args"])
    except (TypeError, ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"{path}: model_args {state.get('model_args')} describe no model ({err})") from None
    load_model_weights(model, state, path, assign=True, key="ema" if ema and "ema" in state else "model")
    return model


def inference_network(
    state: dict,
    path: Path,
    *,
    ema: bool = True,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> ResidualAttnUNet:
    """A checkpoint as a ready inference network: its weights (the EMA's, see model_from_checkpoint) in eval mode,
    BatchNorm folded into the convolutions, cast once to the device and dtype it will run in (autocast would cast
    every weight on every batch)."""
    model = model_from_checkpoint(state, path, ema=ema).eval().fold_batchnorm()
    return model.to(device, dtype, memory_format=memory_format)


def newest_checkpoint(name: str, runs: Path = RUNS) -> Path | None:
    """runs/*/checkpoints/<name> written most recently (by time, not by sorting names)."""
    candidates = list(runs.glob(f"*/checkpoints/{name}"))
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def default_checkpoint(name: str = "best.pt", runs: Path = RUNS) -> Path:
    """For scripts run without --checkpoint: the most recent run's checkpoint."""
    path = newest_checkpoint(name, runs)
    if path is None:
        raise CheckpointError(f"{runs}: no run with checkpoints/{name}; train first or pass --checkpoint")
    return path


def find_resume_checkpoint(resume: str, run_dir: Path | None) -> Path | None:
    """auto: last.pt of the run dir, else of the most recently written run under runs/."""
    if resume != "auto":
        path = Path(resume)
        if not path.is_file():
            raise MissingCheckpoint(f"{path}: --resume names no checkpoint file")
        return path
    if run_dir is not None:
        path = run_dir / "checkpoints" / "last.pt"
        return path if path.is_file() else None
    return newest_checkpoint("last.pt")
