"""Train the residual self-attention U-Net: flags -> data, model, optimiser -> the epoch loop.

With no data flags it builds the demo dataset under data/demo (--demo-style texture: data/demo-texture)
and trains on that.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, replace

import torch.distributed as dist

from checkpoints import DataSpec
from cli import run_cli, setup_logging
from config import parse_args, replay_values
from data_setup import data_spec, prepare_data, training_loaders, validation_pixels, validation_sampling
from engine import Training, Validation, train_one_epoch, validate
from files import check_writable_folder
from model import count_parameters
from model_setup import build_training, check_memory, measured_runtime
from planner import startup_choices
from records import epoch_record
from reporter import Reporter, batch_text, input_text
from schedule import EpochPace, Plan, TimeBudget, next_plan, time_budget
from settings import TrainSettings, recorded_flags
from stopping import EarlyStopping, GracefulStop, NonFiniteLoss
from utils import Runtime, keep_freed_cpu_memory, seed_everything

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """What the epochs so far found, saved with every checkpoint: each epoch's record, early stopping (which holds
    the best validation mIoU) and the best validation's confusion matrix (for the final per-class report)."""

    history: list[dict]
    early: EarlyStopping
    best_confusion: list[list[int]] | None = None

    @classmethod
    def resumed(cls, checkpoint: dict | None, patience: int) -> Progress:
        if checkpoint is None:
            return cls([], EarlyStopping(patience))
        early = EarlyStopping(patience, best=checkpoint["best_miou"])
        return cls(checkpoint["history"], early, checkpoint.get("best_confusion"))

    @property
    def epoch(self) -> int:
        return self.history[-1]["epoch"] if self.history else 0


def save_epoch(
    training: Training,
    progress: Progress,
    plan: Plan,
    validation: Validation | None,
    skipped: list[str],
    *,
    report: Reporter,
    settings: TrainSettings,
    spec: DataSpec,
    runtime: Runtime,
) -> None:
    """After an epoch (progress.history[-1]): the best mIoU so far, the checkpoints (last.pt; best.pt where it
    improved; a numbered one every --save-every epochs and at the end) with the flags as planned so far (and the
    precision and layout the run measured, which --resume keeps), the console line, TensorBoard and results.csv."""
    epoch, early = progress.epoch, progress.early
    improved = validation is not None and early.update(validation.metrics["miou"])
    if improved:
        progress.best_confusion = validation.matrix.matrix.cpu().tolist()
    numbered = epoch % settings.run.save_every == 0 or epoch == plan.epochs or early.should_stop
    discovered = dict(in_channels=spec.reading.channels, normalize=spec.normalization.name)
    discovered.update(precision=runtime.precision, channels_last=runtime.channels_last)
    flags = recorded_flags(settings, **discovered, epochs=plan.epochs, val_every=plan.val_every)
    found = dict(history=progress.history, best_miou=early.best, best_confusion=progress.best_confusion)
    report.save(training.state(epoch=epoch, flags=flags, spec=spec, **found), improved=improved, numbered=numbered)
    report.epoch(progress.history, validation, skipped, figures=numbered)


def fit(
    training: Training,
    loaders: tuple,
    progress: Progress,
    *,
    settings: TrainSettings,
    spec: DataSpec,
    report: Reporter,
    budget: TimeBudget | None,
    runtime: Runtime,
) -> int | None:
    """The epoch loop: train, validate (see Plan), save, report. An exit status if it ends early, None when done."""
    (train_loader, val_loader), optim, samples = loaders, settings.optim, settings.samples
    plan, sampling = Plan.start(optim.epochs, settings.run.val_every), validation_sampling(samples)
    images = len(train_loader) * samples.batch_size * runtime.ddp.world_size  # an epoch's, for images/s
    epoch = start_epoch = progress.epoch
    with GracefulStop() as stop:
        while epoch < plan.epochs:
            epoch += 1
            started, pace = time.monotonic(), EpochPace(plan, epoch, len(train_loader), optim, runtime, budget)
            train_loader.sampler.set_epoch(epoch)
            train_loss, skipped = train_one_epoch(
                training, train_loader, runtime=runtime, stop=stop, pace=pace, first=epoch == start_epoch + 1
            )
            train_seconds = time.monotonic() - started
            if stop.requested:
                return report.stopped(stop, report.during_epoch(epoch))
            validation = None
            if pace.plan.validates(epoch):
                validation = validate(training, val_loader, spec=spec, sampling=sampling, runtime=runtime, epoch=epoch)
            seconds = getattr(validation, "seconds", None)
            plan = report.replanned(
                *next_plan(pace.plan, budget, epoch, train_seconds, seconds, runtime=runtime, cut=stop.out_of_time)
            )
            if validation is None and epoch == plan.epochs:  # a time budget made this epoch the last
                validation = validate(training, val_loader, spec=spec, sampling=sampling, runtime=runtime, epoch=epoch)
            timing = dict(seconds=(train_seconds, time.monotonic() - started), images=images)
            progress.history.append(
                epoch_record(epoch, train_loss=train_loss, lr=pace.lr(0), validation=validation, **timing)
            )
            save_epoch(
                training,
                progress,
                plan,
                validation,
                skipped,
                report=report,
                settings=settings,
                spec=spec,
                runtime=runtime,
            )
            if budget is not None:  # what the epoch spent neither training nor validating: checkpoints, figures
                budget.bookkeeping = time.monotonic() - started - train_seconds - getattr(validation, "seconds", 0)
            if stop.requested:
                return report.stopped(stop, f"after epoch {epoch}")
            if progress.early.should_stop:
                report.early_stopped(progress.early.best, optim.early_stop)
                break
    report.class_report(progress.best_confusion, progress.history, progress.early.best)
    return None


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()  # a time budget counts from here
    setup_logging()
    settings, checkpoint = parse_args(argv)
    run = settings.run
    runtime = Runtime.from_flags(run.device, run.precision, run.channels_last, dist_timeout=run.dist_timeout)
    try:
        # a timestamped run folder must be the same on every rank
        settings = replace(settings, run=replace(run, run_dir=runtime.ddp.broadcast(run.run_dir)))
        return train(settings, checkpoint, runtime, started=started)
    finally:
        if runtime.ddp.enabled:
            dist.destroy_process_group()


def train(settings: TrainSettings, checkpoint: dict | None, runtime: Runtime, *, started: float) -> int:
    data, samples, optim, run = settings.data, settings.samples, settings.optim, settings.run
    if not runtime.ddp.is_main:
        logging.getLogger().setLevel(logging.ERROR)
    else:
        check_writable_folder(run.run_dir, "--run-dir")
    keep_freed_cpu_memory(runtime.device)
    seed_everything(run.seed)
    train_set, val_set = prepare_data(settings, checkpoint, runtime)
    spec = data_spec(train_set)
    loaders = training_loaders(settings, train_set, val_set, runtime)
    runtime, measured = measured_runtime(settings, train_set, runtime)
    training = build_training(settings, train_set, runtime)
    memory_note = check_memory(training, settings, runtime)
    if checkpoint:
        training.restore(checkpoint)
    progress = Progress.resumed(checkpoint, optim.early_stop)
    report = Reporter(
        run.run_dir,
        active=runtime.ddp.is_main,
        purge_step=progress.epoch + 1 if checkpoint else None,
        class_names=spec.mapping.names,
        epochs=optim.epochs,
        display_channel=data.display_channel,
    )
    if checkpoint:
        log.info(f"resumed from {checkpoint['path']} at epoch {progress.epoch}")
    batch = batch_text(samples.batch_size, optim.accumulate, runtime.ddp.world_size)
    log.info(
        f"{len(train_set)} training and {len(val_set)} validation images, {spec.mapping.num_classes} classes "
        f"({', '.join(spec.mapping.names)}); {input_text(spec)}; "
        f"{count_parameters(training.model) / 1e6:.2f} M parameters; "
        f"{runtime.describe()}; {batch}; {memory_note}"
    )
    chosen = startup_choices(settings, spec, runtime, workers=loaders[0].num_workers, measured=measured)
    if chosen:
        log.info(f"start-up chose: {'; '.join(chosen)}")
    flags = recorded_flags(settings, in_channels=spec.reading.channels, normalize=spec.normalization.name)
    report.config(replay_values(flags), chosen)
    budget = None
    if optim.time_budget and not checkpoint:
        validation_cost = dict(
            validation_pixels=validation_pixels(samples, val_set), step_pixels=samples.batch_size * samples.side**2
        )
        budget = time_budget(optim.time_budget, started, len(loaders[0]), **validation_cost)
    try:
        status = fit(
            training, loaders, progress, settings=settings, spec=spec, report=report, budget=budget, runtime=runtime
        )
    except NonFiniteLoss as err:
        return report.non_finite(err)
    if status is not None:
        return status
    report.finish(progress.history, flags, progress.early.best, val_set.images_dir)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
