"""What start-up chose for the settings left to it (auto, or no flag) and why: one printed line, and the same
words as comments at the top of config.yaml, beside the values they chose (comments: a replay reads the values)."""

from __future__ import annotations

from checkpoints import DataSpec
from loaders import workers_reason
from schedule import budget_reason, validation_reason
from settings import TrainSettings
from tuning import Measured
from utils import Runtime, precision_reason


def startup_choices(
    settings: TrainSettings, spec: DataSpec, runtime: Runtime, workers: int, measured: Measured
) -> list[str]:
    """One entry per setting that start-up chose, "name value (why)", in the order they were chosen."""
    data, samples, optim, run = settings.data, settings.samples, settings.optim, settings.run
    chosen = []
    if run.device == "auto":
        chosen.append(f"device {runtime.device.type} (a CUDA GPU where there is one, else Apple MPS, else the CPU)")
    if measured.seconds:
        open_ = [
            name
            for name, typed in (("precision", run.precision != "auto"), ("layout", run.channels_last is not None))
            if not typed
        ]
        chosen.append(f"{' and '.join(open_)} {measured.describe('a training step')}")
    elif run.precision == "auto":  # one precision runs natively here; --channels-last was given
        chosen.append(f"precision {runtime.precision} ({precision_reason(runtime.precision, runtime.device)})")
    if samples.workers == "auto":
        chosen.append(f"workers {workers} ({workers_reason(runtime)})")
    if data.in_channels == "auto":
        chosen.append(f"in_channels {spec.reading.channels} (the first training image's)")
    if data.normalize == "auto":
        name = spec.normalization.name
        why = "8-bit RGB photos" if name == "imagenet" else "not 8-bit RGB: the training images' own mean and std"
        chosen.append(f"normalize {name} ({why})")
    if data.instances == "auto" and spec.objects is not None:
        chosen.append(
            f"instances: separate objects learnt from the instance masks found ({spec.objects.separation} map and "
            "seeded watershed beside the classes)"
        )
    if run.val_every == "auto":
        chosen.append(f"val_every {validation_reason()}")
    if optim.time_budget:
        chosen.append(f"epochs {budget_reason(optim.time_budget)}")
    return chosen
