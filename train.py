"""Train the residual self-attention U-Net: flags -> data, model, optimiser -> the epoch loop.

With no data flags it builds the demo dataset under data/demo (--demo-style texture: data/demo-texture)
and trains on that.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import replace
from functools import partial

import torch.distributed as dist

from checkpoints import DataSpec
from cli import run_cli
from config import parse_args, replay_values
from files import check_writable_folder
from model import count_parameters
from planner import startup_choices
from records import epoch_record
from reporter import Reporter, batch_text, input_text
from settings import TrainSettings, recorded_flags
from stopping import EarlyStopping, GracefulStop, NonFiniteLoss, TimeBudget, validation_interval
from trainer import (
    EpochPace,
    Plan,
    Training,
    Validation,
    build_training,
    check_memory,
    time_budget,
    validation_sampling,
)
from training_data import data_spec, prepare_data, training_loaders
from utils import Runtime, keep_freed_cpu_memory, seed_everything


def replanned(
    plan: Plan,
    budget: TimeBudget | None,
    epoch: int,
    train_seconds: float,
    validation: Validation | None,
    *,
    report: Reporter,
    runtime: Runtime,
    cut: bool = False,
) -> Plan:
    """After an epoch: the validation interval (--val-every auto, from the first validation's cost) and the
    horizon a --time-budget fits now, each the same on every rank and said when it changes. cut: this epoch ended
    before the loader's end (the horizon or the budget's clock, agreed by every rank), which makes it the last."""
    val_every, horizon = plan.val_every, plan.horizon
    if val_every == "auto":
        val_every = runtime.ddp.broadcast(validation_interval(train_seconds, validation.seconds))
        report.print(
            f"--val-every auto: {f'every {val_every} epochs' if val_every > 1 else 'every epoch'} "
            f"(training {train_seconds:.1f} s, validation {validation.seconds:.1f} s an epoch)"
        )
    if budget is not None and cut:
        report.epochs = epoch
        report.print(f"--time-budget {budget.seconds / 60:g} min: epoch {epoch} cut short, the last")
        return Plan(epoch, val_every)
    if budget is not None:
        seconds = validation.seconds if validation else None
        horizon = runtime.ddp.broadcast(budget.epochs_that_fit(epoch, train_seconds, seconds, val_every))
    new_plan = Plan(horizon, val_every)
    if budget is not None and (epoch == 1 or horizon != plan.horizon):
        report.epochs = new_plan.epochs
        report.print(
            f"--time-budget {budget.seconds / 60:g} min: {horizon:.4g} epochs fit (planned after epoch {epoch})"
        )
    return new_plan


def save_epoch(
    training: Training,
    report: Reporter,
    early: EarlyStopping,
    plan: Plan,
    validation: Validation | None,
    skipped: list[str],
    *,
    best_confusion: list[list[int]] | None,
    history: list[dict],
    settings: TrainSettings,
    rules: DataSpec,
) -> list[list[int]] | None:
    """After an epoch (history[-1]): the best mIoU so far, the checkpoints (last.pt; best.pt where it improved; a
    numbered one every --save-every epochs and at the end) with the flags as planned so far, the console line,
    TensorBoard and results.csv. Returns the best validation's confusion matrix."""
    epoch = history[-1]["epoch"]
    improved = validation is not None and early.update(validation.metrics["miou"])
    best_confusion = validation.matrix.matrix.cpu().tolist() if improved else best_confusion
    numbered = epoch % settings.run.save_every == 0 or epoch == plan.epochs or early.should_stop
    discovered = dict(in_channels=rules.reading.channels, normalize=rules.normalization.name)
    flags = recorded_flags(settings, **discovered, epochs=plan.epochs, val_every=plan.val_every)
    progress = dict(rules=rules, best_miou=early.best, best_confusion=best_confusion, history=history)
    report.save(training.state(epoch=epoch, flags=flags, **progress), improved=improved, numbered=numbered)
    report.epoch(history, validation, skipped, figures=numbered)
    return best_confusion


def fit(
    training: Training,
    loaders: tuple,
    *,
    settings: TrainSettings,
    rules: DataSpec,
    report: Reporter,
    history: list[dict],
    early: EarlyStopping,
    best_confusion: list[list[int]] | None,
    budget: TimeBudget | None,
    runtime: Runtime,
) -> int | None:
    """The epoch loop: train, validate (see Plan), save, report. An exit status if it ends early, None when done."""
    train_loader, val_loader = loaders
    optim, samples = settings.optim, settings.samples
    plan = Plan(float(optim.epochs), settings.run.val_every)
    validate = partial(
        training.validate, val_loader, rules=rules, sampling=validation_sampling(samples), runtime=runtime
    )
    train_epoch = partial(training.train_epoch, train_loader, runtime=runtime)
    pace = partial(EpochPace, steps=len(train_loader), optim=optim, runtime=runtime, budget=budget)
    images = len(train_loader) * samples.batch_size * runtime.ddp.world_size  # an epoch's, for images/s
    replan = partial(replanned, report=report, runtime=runtime)
    save = partial(save_epoch, training, report, early, history=history, settings=settings, rules=rules)
    epoch = start_epoch = history[-1]["epoch"] if history else 0
    with GracefulStop() as stop:
        while epoch < plan.epochs:
            epoch += 1
            started, epoch_pace = time.monotonic(), pace(plan, epoch)
            train_loader.sampler.set_epoch(epoch)
            try:
                train_loss, skipped = train_epoch(
                    epoch=epoch, stop=stop, first=epoch == start_epoch + 1, pace=epoch_pace
                )
            except NonFiniteLoss as err:
                return report.non_finite(err)
            train_seconds = time.monotonic() - started
            if stop.requested:
                return report.stopped(stop, report.during_epoch(epoch))
            validation = validate(epoch=epoch) if epoch_pace.plan.validates(epoch) else None
            plan = replan(epoch_pace.plan, budget, epoch, train_seconds, validation, cut=stop.out_of_time)
            if validation is None and epoch == plan.epochs:  # a time budget made this epoch the last
                validation = validate(epoch=epoch)
            pace_record = dict(seconds=(train_seconds, time.monotonic() - started), images=images)
            history.append(
                epoch_record(epoch, train_loss=train_loss, lr=epoch_pace.lr(0), validation=validation, **pace_record)
            )
            best_confusion = save(plan, validation, skipped, best_confusion=best_confusion)
            if budget is not None:  # what the epoch spent neither training nor validating: checkpoints, figures
                budget.bookkeeping = time.monotonic() - started - train_seconds - getattr(validation, "seconds", 0)
            if stop.requested:
                return report.stopped(stop, f"after epoch {epoch}")
            if early.should_stop:
                report.early_stopped(early.best, optim.early_stop)
                break
    report.class_report(best_confusion, history, early.best)
    return None


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()  # a time budget counts from here
    logging.basicConfig(format="%(message)s", level=logging.INFO)
    settings, checkpoint = parse_args(argv)
    run = settings.run
    runtime = Runtime.from_flags(
        run.device, run.precision, run.channels_last, dist_timeout=run.dist_timeout, training=True
    )
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
    rules = data_spec(train_set)
    loaders = training_loaders(settings, train_set, val_set, runtime)
    training = build_training(settings, train_set, runtime)
    memory_note = check_memory(training, settings, runtime)
    if checkpoint:
        training.restore(checkpoint)
    history, start_epoch = (checkpoint["history"], checkpoint["epoch"]) if checkpoint else ([], 0)
    report = Reporter(
        run.run_dir,
        active=runtime.ddp.is_main,
        purge_step=start_epoch + 1 if checkpoint else None,
        class_names=rules.mapping.names,
        epochs=optim.epochs,
        display_channel=data.display_channel,
    )
    if checkpoint:
        report.print(f"resumed from {checkpoint['path']} at epoch {start_epoch}")
    batch = batch_text(samples.batch_size, optim.accumulate, runtime.ddp.world_size)
    report.print(
        f"{len(train_set)} training and {len(val_set)} validation images, {rules.mapping.num_classes} classes "
        f"({', '.join(rules.mapping.names)}); {input_text(rules)}; "
        f"{count_parameters(training.model) / 1e6:.2f} M parameters; "
        f"{runtime.describe()}; {batch}; {memory_note}"
    )
    chosen = startup_choices(settings, rules, runtime, workers=loaders[0].num_workers)
    if chosen:
        report.print(f"start-up chose: {'; '.join(chosen)}")
    flags = recorded_flags(settings, in_channels=rules.reading.channels, normalize=rules.normalization.name)
    report.config(replay_values(flags), chosen)
    early = EarlyStopping(optim.early_stop, best=checkpoint["best_miou"] if checkpoint else -1.0)
    best_confusion = checkpoint.get("best_confusion") if checkpoint else None
    status = fit(
        training,
        loaders,
        settings=settings,
        rules=rules,
        report=report,
        history=history,
        early=early,
        best_confusion=best_confusion,
        budget=time_budget(settings, val_set, len(loaders[0]), started)
        if optim.time_budget and not checkpoint
        else None,
        runtime=runtime,
    )
    if status is not None:
        return status
    report.finish(history, flags, early.best, val_set.images_dir)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
