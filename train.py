"""Train the residual self-attention U-Net: flags -> data, model, optimiser -> the epoch loop.

With no data flags it builds the demo dataset under data/demo (--demo-style texture: data/demo-texture)
and trains on that.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from checkpoints import DataSpec, load_model_weights, training_state
from cli import run_cli
from coco import cached_masks
from colour import BatchColour
from config import parse_args, replay_values
from dataset import SegmentationFolder, choose_reading
from demo import DEMO_IMAGES, DEMO_ROOTS, make_demo_data
from engine import evaluate, train_one_epoch
from errors import CheckpointError, UserError
from files import require_folder
from intensity import check_display_channel
from loaders import build_loaders
from losses import build_loss
from memory import check_training_memory
from model import ResidualAttnUNet, count_parameters
from optimizer import UpdateRule, build_optimizer, ema_model, scheduled_lr
from predictor import Predictor, Sampling
from records import epoch_record
from reporter import Reporter, batch_text, input_text, skip_report
from settings import DataSettings, ModelSettings, OptimSettings, SampleSettings, TrainSettings, recorded_flags
from stopping import EarlyStopping, GracefulStop, NonFiniteLoss, TimeBudget
from transforms import Crop
from utils import Runtime, keep_freed_cpu_memory, seed_everything


@dataclass
class DataPaths:
    train_images: Path
    train_masks: Path
    val_images: Path
    val_masks: Path


def data_paths(data: DataSettings) -> DataPaths:
    """The four folders, rendering COCO annotations into cached mask folders where given."""
    root = DEMO_ROOTS[data.demo_style] if data.demo else data.data_root
    if root is not None:
        require_folder(root, "--data-root")
    paths = {}
    for split in ("train", "val"):
        for kind in ("images", "masks"):
            flag = f"{split}_{kind}"
            paths[flag] = getattr(data, flag) or (root / kind / split if root else None)
        coco_file = getattr(data, f"{split}_coco")
        if coco_file is not None and paths[f"{split}_images"] is not None:
            images = paths[f"{split}_images"]
            paths[f"{split}_masks"] = cached_masks(coco_file, images, data.coco_mode, max_pixels=data.max_pixels)
        for kind in ("images", "masks"):
            if paths[f"{split}_{kind}"] is None:
                raise UserError(f"--{split}-{kind} is needed (or --data-root, or --{split}-coco with --{split}-images)")
    return DataPaths(**paths)


def build_datasets(
    data: DataSettings, samples: SampleSettings, rules: DataSpec | None
) -> tuple[SegmentationFolder, SegmentationFolder]:
    """The training set finds the label mapping and normalisation (unless resuming); validation reuses them.
    The input channels and normalisation they chose are the training set's reading and normalization."""
    paths = data_paths(data)
    reading, normalize = choose_reading(
        paths.train_images, data.in_channels, data.normalize, page=data.tiff_page, convert=data.convert_channels
    )
    check_display_channel(data.display_channel, reading.channels)
    labels = dict(ignore_value=data.ignore_value, binary=data.binary, max_pixels=data.max_pixels, reading=reading)
    crop = Crop(samples.crop_size, samples.scale_range, samples.base_size) if samples.crop_size else None
    train_set = SegmentationFolder(
        paths.train_images,
        paths.train_masks,
        samples.image_size,
        crop=crop,
        mapping=rules.mapping if rules else None,
        normalization=rules.normalization if rules else None,
        normalize=normalize,
        augment=samples.augment,
        limit=data.train_subset,
        **labels,
    )
    val_set = SegmentationFolder(
        paths.val_images,
        paths.val_masks,
        None,  # validation sees each image at its own size, as inference does
        mapping=train_set.mapping,
        normalization=train_set.normalization,
        unknown_labels="ignore" if data.ignore_unknown_labels else "error",
        **labels,
    )
    return train_set, val_set


def prepare_data(
    settings: TrainSettings, checkpoint: dict | None, runtime: Runtime
) -> tuple[SegmentationFolder, SegmentationFolder]:
    """Rank 0 builds the demo, renders COCO masks and scans labels first; the others then read its caches."""
    data, samples = settings.data, settings.samples
    rules = DataSpec.from_state(checkpoint) if checkpoint else None
    if data.demo and runtime.ddp.is_main:
        print(
            f"demo run: data {DEMO_ROOTS[data.demo_style]} ({DEMO_IMAGES['num_train']} train, "
            f"{DEMO_IMAGES['num_val']} val images), image size {samples.image_size}, "
            f"widths {','.join(map(str, settings.model.widths))}, {settings.optim.epochs} epochs, "
            f"batch {samples.batch_size}"
        )
    for turn in ("main", "others"):
        if (turn == "main") == runtime.ddp.is_main:
            if data.demo:
                make_demo_data(DEMO_ROOTS[data.demo_style], **DEMO_IMAGES, style=data.demo_style)
            datasets = build_datasets(data, samples, rules)
        runtime.ddp.barrier()
    return datasets


@dataclass
class Training:
    """The model and everything that steps it: what a checkpoint saves and --resume restores."""

    model: torch.nn.Module  # plain: what is saved and validated
    step_model: torch.nn.Module  # compiled and/or DDP-wrapped: what is trained
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loss_fn: torch.nn.Module
    updates: UpdateRule  # accumulation, clipping, the EMA
    colour: BatchColour  # the training samples' colour stage, run per batch on the device
    compiled: bool = False  # the first step's time (compilation included) is worth printing

    def state(self, **progress) -> dict:
        """progress: epoch, flags, rules, best_miou, best_confusion, history (see checkpoints.training_state)."""
        return training_state(
            model=self.model, optimizer=self.optimizer, scaler=self.scaler, ema=self.updates.ema, **progress
        )

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def train_epoch(self, loader, *, runtime: Runtime, epoch: int, stop: GracefulStop, first: bool):
        """first: the first epoch of this process, which says what the first step cost (with compile) and how
        much of the epoch waited for data."""
        return train_one_epoch(
            self.step_model,
            loader,
            loss_fn=self.loss_fn,
            optimizer=self.optimizer,
            scaler=self.scaler,
            colour=self.colour,
            runtime=runtime,
            epoch=epoch,
            stop=stop,
            updates=self.updates,
            time_first_step=first and self.compiled,
            report_data_wait=first,
        )

    def validate(self, loader, *, rules: DataSpec, sampling: Sampling, runtime: Runtime, epoch: int):
        """The EMA's weights where there is one: what best.pt's users (inference, export) will run."""
        model = self.model if self.updates.ema is None else self.updates.ema.module
        model.eval()
        predictor = Predictor.for_validation(model, rules.mapping, sampling, runtime, rules.normalization)
        return evaluate(predictor, loader, num_classes=rules.mapping.num_classes, runtime=runtime, epoch=epoch)

    def restore(self, checkpoint: dict) -> None:
        path, classes = checkpoint["path"], checkpoint["model_args"].get("num_classes")
        if classes != self.model.config["num_classes"]:
            raise CheckpointError(f"{path}: has {classes} classes, the data {self.model.config['num_classes']}")
        load_model_weights(self.model, checkpoint, path)
        parts = {
            "optimizer": self.optimizer.load_state_dict,
            "scaler": self.scaler.load_state_dict,
            "rng": torch.set_rng_state,
        }
        for name, load in parts.items():
            try:
                load(checkpoint[name])
            except (KeyError, TypeError, ValueError, RuntimeError) as err:
                raise CheckpointError(f"{path}: its {name} state does not fit this run ({err})") from None
        ema = self.updates.ema
        if ema is not None and "ema" in checkpoint:  # else the average starts from the resumed weights
            load_model_weights(ema.module, checkpoint, path, key="ema")
            ema.n_averaged.fill_(int(checkpoint["ema_updates"]))


def build_model(
    settings: ModelSettings, in_channels: int, num_classes: int, runtime: Runtime
) -> tuple[nn.Module, nn.Module]:
    """The model to save (plain) and the one to step (compiled and/or DDP-wrapped)."""
    model = ResidualAttnUNet(in_channels, num_classes, settings.widths, settings.dropout)
    model.grad_checkpoint = settings.grad_checkpoint
    if settings.sync_bn:
        if runtime.device.type != "cuda" or not runtime.ddp.enabled:
            raise UserError("--sync-bn needs a torchrun job on CUDA GPUs (SyncBatchNorm does not run on the CPU)")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(runtime.device, memory_format=runtime.memory_format)
    step_model = torch.compile(model) if settings.compile else model
    if runtime.ddp.enabled:
        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        step_model = DistributedDataParallel(step_model, device_ids=device_ids)
    return model, step_model


def check_memory(training: Training, settings: TrainSettings, runtime: Runtime) -> str:
    """memory.check_training_memory for a step at the chosen batch and size: a one-line error if it cannot fit."""
    return check_training_memory(
        training.model,
        training.loss_fn,
        runtime,
        batch_size=settings.samples.batch_size,
        side=settings.samples.side,
        size_flag="--crop-size" if settings.samples.crop_size else "--image-size",
        grad_checkpoint=settings.model.grad_checkpoint,
    )


def build_training(settings: TrainSettings, train_set: SegmentationFolder, runtime: Runtime) -> Training:
    optim = settings.optim
    channels = train_set.reading.channels
    model, step_model = build_model(settings.model, channels, train_set.num_classes, runtime)
    optimizer = build_optimizer(model, optim.lr, runtime.device, name=optim.optimizer, weight_decay=optim.weight_decay)
    class_weights = train_set.class_weights.to(runtime.device)
    loss_fn = build_loss(optim.loss, class_weights, dice_weight=optim.dice_weight, ce_weight=optim.ce_weight)
    ema = ema_model(model, optim.ema) if optim.ema else None
    return Training(
        model=model,
        step_model=step_model,
        optimizer=optimizer,
        scaler=runtime.grad_scaler(),
        loss_fn=loss_fn.to(runtime.device),
        updates=UpdateRule(accumulate=optim.accumulate, clip_grad=optim.clip_grad, ema=ema),
        colour=train_set.transform.colour,
        compiled=settings.model.compile,
    )


def learning_rate(optim: OptimSettings, epochs: int, epoch: int) -> float:
    """epochs: the run's, which a time budget fixes after the first epoch."""
    return scheduled_lr(epoch, base=optim.lr, epochs=epochs, warmup=optim.warmup_epochs, schedule=optim.schedule)


def validation_sampling(samples: SampleSettings) -> Sampling:
    """What inference.py will do with this model by default, unless --val-mode says otherwise."""
    sampling = Sampling.for_training(samples.image_size, samples.crop_size, samples.base_size)
    return replace(sampling, mode=samples.val_mode) if samples.val_mode else sampling


def planned_epochs(
    budget: TimeBudget, planned: int, epoch: int, epoch_seconds: float, *, report: Reporter, runtime: Runtime
) -> int:
    """After each epoch of a --time-budget run: the epochs that fit now (the same on every rank), said when they
    change; the checkpoints record them, so --resume keeps the plan."""
    epochs = runtime.ddp.broadcast(budget.epochs_that_fit(epoch, epoch_seconds))
    if epoch == 1 or epochs != planned:
        report.epochs = epochs
        report.print(
            f"--time-budget {budget.seconds / 60:g} min: {epochs} epochs fit (planned after epoch {epoch}, "
            f"{epoch_seconds:.1f} s an epoch)"
        )
    return epochs


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
    """The epoch loop: train, validate, save, report. An exit status if it ends early, None when it is done."""
    train_loader, val_loader = loaders
    optim, samples = settings.optim, settings.samples
    epochs = optim.epochs  # until a time budget fixes them
    epoch = start_epoch = history[-1]["epoch"] if history else 0
    with GracefulStop() as stop:
        while epoch < epochs:
            epoch += 1
            started, lr = time.monotonic(), learning_rate(optim, epochs, epoch)
            training.set_lr(lr)
            train_loader.sampler.set_epoch(epoch)
            try:
                train_loss, skipped = training.train_epoch(
                    train_loader, runtime=runtime, epoch=epoch, stop=stop, first=epoch == start_epoch + 1
                )
            except NonFiniteLoss as err:
                return report.non_finite(err)
            train_seconds = time.monotonic() - started
            if stop.requested:
                return report.stopped(stop, report.during_epoch(epoch))
            val_loss, matrix, panel, val_skipped = training.validate(
                val_loader, rules=rules, sampling=validation_sampling(samples), runtime=runtime, epoch=epoch
            )
            metrics = matrix.compute()
            images = len(train_loader) * samples.batch_size * runtime.ddp.world_size
            seconds = (train_seconds, time.monotonic() - started)
            record = epoch_record(
                epoch, losses=(train_loss, val_loss), metrics=metrics, lr=lr, seconds=seconds, images=images
            )
            history.append(record)
            if budget is not None:
                epochs = planned_epochs(
                    budget, epochs, epoch, time.monotonic() - started, report=report, runtime=runtime
                )
            improved = early.update(metrics["miou"])
            best_confusion = matrix.matrix.cpu().tolist() if improved else best_confusion
            numbered = epoch % settings.run.save_every == 0 or epoch == epochs or early.should_stop
            flags = recorded_flags(
                settings, in_channels=rules.reading.channels, normalize=rules.normalization.name, epochs=epochs
            )
            progress = dict(rules=rules, best_miou=early.best, best_confusion=best_confusion, history=history)
            report.save(training.state(epoch=epoch, flags=flags, **progress), improved=improved, numbered=numbered)
            if numbered:
                report.figures(epoch, panel, matrix)
            report.epoch(history, metrics["iou"], skip_report(skipped, val_skipped))
            if stop.requested:
                return report.stopped(stop, f"after epoch {epoch}")
            if early.should_stop:
                report.print(f"early stop: no better val mIoU for {optim.early_stop} epochs (best {early.best:.4f})")
                break
    report.class_report(best_confusion, history, early.best)
    return None


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()  # a time budget counts from here
    logging.basicConfig(format="%(message)s", level=logging.INFO)
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
    keep_freed_cpu_memory(runtime.device)
    seed_everything(run.seed)
    train_set, val_set = prepare_data(settings, checkpoint, runtime)
    rules = DataSpec(train_set.mapping, train_set.reading, train_set.normalization)
    loaders = build_loaders(
        train_set,
        val_set,
        batch_size=samples.batch_size,
        workers=samples.workers,
        weighted=samples.sampler == "weighted",
        seed=run.seed,
        strict=data.strict,
        runtime=runtime,
        min_epoch_samples=samples.min_epoch_samples,
    )
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
    flags = recorded_flags(
        settings, in_channels=rules.reading.channels, normalize=rules.normalization.name, epochs=optim.epochs
    )
    report.config(replay_values(flags))
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
        budget=TimeBudget(optim.time_budget * 60, started) if optim.time_budget and not checkpoint else None,
        runtime=runtime,
    )
    if status is not None:
        return status
    report.finish(history, flags, early.best, val_set.images_dir)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
