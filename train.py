"""Train the residual self-attention U-Net: flags -> data, model, optimiser -> the epoch loop.

With no data flags it builds the demo dataset under data/demo (--demo-style texture: data/demo-texture)
and trains on that.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from checkpoints import DataRules, load_model_weights, training_state
from cli import run_cli
from coco import cached_masks
from colour import BatchColour
from config import parse_args
from dataset import SegmentationFolder, choose_reading
from demo import DEMO_IMAGES, DEMO_ROOTS, make_demo_data
from engine import (
    EarlyStopping,
    GracefulStop,
    NonFiniteLoss,
    TimeBudget,
    Updates,
    build_optimizer,
    ema_model,
    evaluate,
    scheduled_lr,
    train_one_epoch,
)
from errors import CheckpointError, UserError
from intensity import check_display_channel
from loaders import build_loaders
from losses import build_loss
from memory import check_training_memory
from model import ResidualAttnUNet, count_parameters
from predictor import Predictor, Sampling
from records import epoch_record
from reporter import Reporter, batch_text, input_text, skip_report
from utils import Runtime, keep_freed_cpu_memory, require_folder, seed_everything


@dataclass
class DataPaths:
    train_images: Path
    train_masks: Path
    val_images: Path
    val_masks: Path


def data_paths(args: argparse.Namespace) -> DataPaths:
    """The four folders, rendering COCO annotations into cached mask folders where given."""
    root = DEMO_ROOTS[args.demo_style] if args.demo else args.data_root
    if root is not None:
        require_folder(root, "--data-root")
    paths = {}
    for split in ("train", "val"):
        for kind in ("images", "masks"):
            flag = f"{split}_{kind}"
            paths[flag] = getattr(args, flag) or (root / kind / split if root else None)
        coco_file = getattr(args, f"{split}_coco")
        if coco_file is not None and paths[f"{split}_images"] is not None:
            images = paths[f"{split}_images"]
            paths[f"{split}_masks"] = cached_masks(coco_file, images, args.coco_mode, max_pixels=args.max_pixels)
        for kind in ("images", "masks"):
            if paths[f"{split}_{kind}"] is None:
                raise UserError(f"--{split}-{kind} is needed (or --data-root, or --{split}-coco with --{split}-images)")
    return DataPaths(**paths)


def build_datasets(args: argparse.Namespace, rules: DataRules | None) -> tuple[SegmentationFolder, SegmentationFolder]:
    """The training set finds the label mapping and normalisation (unless resuming); validation reuses them."""
    paths = data_paths(args)
    reading, args.normalize = choose_reading(
        paths.train_images, args.in_channels, args.normalize, page=args.tiff_page, convert=args.convert_channels
    )
    args.in_channels = reading.channels
    check_display_channel(args.display_channel, reading.channels)
    labels = dict(ignore_value=args.ignore_value, binary=args.binary, max_pixels=args.max_pixels, reading=reading)
    crop = dict(crop_size=args.crop_size, scale_range=args.scale_range, base_size=args.base_size)
    train_set = SegmentationFolder(
        paths.train_images,
        paths.train_masks,
        args.image_size,
        crop=crop,
        mapping=rules.mapping if rules else None,
        normalization=rules.normalization if rules else None,
        normalize=args.normalize,
        augment=args.augment,
        limit=args.train_subset,
        **labels,
    )
    val_set = SegmentationFolder(
        paths.val_images,
        paths.val_masks,
        None,  # validation sees each image at its own size, as inference does
        mapping=train_set.mapping,
        normalization=train_set.normalization,
        unknown_labels="ignore" if args.ignore_unknown_labels else "error",
        **labels,
    )
    return train_set, val_set


def prepare_data(args, checkpoint: dict | None, runtime: Runtime) -> tuple[SegmentationFolder, SegmentationFolder]:
    """Rank 0 builds the demo, renders COCO masks and scans labels first; the others then read its caches."""
    rules = DataRules.from_state(checkpoint) if checkpoint else None
    if args.demo and runtime.ddp.is_main:
        print(
            f"demo run: data {DEMO_ROOTS[args.demo_style]} ({DEMO_IMAGES['num_train']} train, "
            f"{DEMO_IMAGES['num_val']} val images), image size {args.image_size}, "
            f"widths {','.join(map(str, args.widths))}, {args.epochs} epochs, batch {args.batch_size}"
        )
    for turn in ("main", "others"):
        if (turn == "main") == runtime.ddp.is_main:
            if args.demo:
                make_demo_data(DEMO_ROOTS[args.demo_style], **DEMO_IMAGES, style=args.demo_style)
            datasets = build_datasets(args, rules)
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
    updates: Updates  # accumulation, clipping, the EMA
    colour: BatchColour  # the training samples' colour stage, run per batch on the device
    compiled: bool = False  # the first step's time (compilation included) is worth printing

    def state(self, **progress) -> dict:
        """progress: epoch, args, rules, best_miou, best_confusion, history (see checkpoints.training_state)."""
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

    def validate(self, loader, *, rules: DataRules, sampling: Sampling, runtime: Runtime, epoch: int):
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


def build_model(args: argparse.Namespace, num_classes: int, runtime: Runtime) -> tuple[nn.Module, nn.Module]:
    """The model to save (plain) and the one to step (compiled and/or DDP-wrapped)."""
    model = ResidualAttnUNet(args.in_channels, num_classes, args.widths, args.dropout)
    model.grad_checkpoint = args.grad_checkpoint
    if args.sync_bn:
        if runtime.device.type != "cuda" or not runtime.ddp.enabled:
            raise UserError("--sync-bn needs a torchrun job on CUDA GPUs (SyncBatchNorm does not run on the CPU)")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(runtime.device, memory_format=runtime.memory_format)
    step_model = torch.compile(model) if args.compile else model
    if runtime.ddp.enabled:
        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        step_model = DistributedDataParallel(step_model, device_ids=device_ids)
    return model, step_model


def check_memory(training: Training, args: argparse.Namespace, runtime: Runtime) -> str:
    """memory.check_training_memory for a step at the chosen batch and size: a one-line error if it cannot fit."""
    return check_training_memory(
        training.model,
        training.loss_fn,
        runtime,
        batch_size=args.batch_size,
        side=args.crop_size or args.image_size,
        size_flag="--crop-size" if args.crop_size else "--image-size",
        grad_checkpoint=args.grad_checkpoint,
    )


def build_training(args: argparse.Namespace, train_set: SegmentationFolder, runtime: Runtime) -> Training:
    model, step_model = build_model(args, train_set.num_classes, runtime)
    optimizer = build_optimizer(model, args.lr, runtime.device, name=args.optimizer, weight_decay=args.weight_decay)
    class_weights = train_set.class_weights.to(runtime.device)
    loss_fn = build_loss(args.loss, class_weights, dice_weight=args.dice_weight, ce_weight=args.ce_weight)
    ema = ema_model(model, args.ema) if args.ema else None
    return Training(
        model=model,
        step_model=step_model,
        optimizer=optimizer,
        scaler=runtime.grad_scaler(),
        loss_fn=loss_fn.to(runtime.device),
        updates=Updates(accumulate=args.accumulate, clip_grad=args.clip_grad, ema=ema),
        colour=train_set.transform.colour,
        compiled=args.compile,
    )


def learning_rate(args: argparse.Namespace, epoch: int) -> float:
    return scheduled_lr(epoch, base=args.lr, epochs=args.epochs, warmup=args.warmup_epochs, schedule=args.schedule)


def validation_sampling(args: argparse.Namespace) -> Sampling:
    """What inference.py will do with this model by default, unless --val-mode says otherwise."""
    sampling = Sampling.from_training_flags(vars(args))
    return replace(sampling, mode=args.val_mode) if args.val_mode else sampling


def fix_epochs_to_budget(
    args: argparse.Namespace, budget: TimeBudget, first_epoch_seconds: float, *, report: Reporter, runtime: Runtime
) -> None:
    """After the first epoch of a --time-budget run: the epochs that fit become --epochs, saved with the run."""
    args.epochs = runtime.ddp.broadcast(budget.epochs_that_fit(first_epoch_seconds))
    report.epochs = args.epochs
    report.print(f"--time-budget {args.time_budget:g} min: {args.epochs} epochs fit (estimated from the first)")


def fit(
    training: Training,
    loaders: tuple,
    *,
    args: argparse.Namespace,
    rules: DataRules,
    report: Reporter,
    history: list[dict],
    early: EarlyStopping,
    best_confusion: list[list[int]] | None,
    budget: TimeBudget | None,
    runtime: Runtime,
) -> int | None:
    """The epoch loop: train, validate, save, report. An exit status if it ends early, None when it is done."""
    train_loader, val_loader = loaders
    epoch = start_epoch = history[-1]["epoch"] if history else 0
    with GracefulStop() as stop:
        while epoch < args.epochs:
            epoch += 1
            started, lr = time.time(), learning_rate(args, epoch)
            training.set_lr(lr)
            train_loader.sampler.set_epoch(epoch)
            try:
                train_loss, skipped = training.train_epoch(
                    train_loader, runtime=runtime, epoch=epoch, stop=stop, first=epoch == start_epoch + 1
                )
            except NonFiniteLoss as err:
                return report.non_finite(err)
            train_seconds = time.time() - started
            if stop.requested:
                return report.stopped(stop, report.during_epoch(epoch))
            val_loss, matrix, samples, val_skipped = training.validate(
                val_loader, rules=rules, sampling=validation_sampling(args), runtime=runtime, epoch=epoch
            )
            metrics = matrix.compute()
            images = len(train_loader) * args.batch_size * runtime.ddp.world_size
            seconds = (train_seconds, time.time() - started)
            record = epoch_record(
                epoch, losses=(train_loss, val_loss), metrics=metrics, lr=lr, seconds=seconds, images=images
            )
            history.append(record)
            if budget is not None and epoch == 1:
                fix_epochs_to_budget(args, budget, history[-1]["seconds"], report=report, runtime=runtime)
            improved = early.update(metrics["miou"])
            best_confusion = matrix.matrix.cpu().tolist() if improved else best_confusion
            numbered = epoch % args.save_every == 0 or epoch == args.epochs or early.should_stop
            progress = dict(rules=rules, best_miou=early.best, best_confusion=best_confusion, history=history)
            report.save(training.state(epoch=epoch, args=args, **progress), improved=improved, numbered=numbered)
            if numbered:
                report.figures(epoch, samples, matrix)
            report.epoch(history, metrics["iou"], skip_report(skipped, val_skipped))
            if stop.requested:
                return report.stopped(stop, f"after epoch {epoch}")
            if early.should_stop:
                report.print(f"early stop: no better val mIoU for {args.early_stop} epochs (best {early.best:.4f})")
                break
    report.class_report(best_confusion, history, early.best)
    return None


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(message)s", level=logging.INFO)
    args, checkpoint = parse_args(argv)
    runtime = Runtime.from_flags(args.device, args.precision, args.channels_last, dist_timeout=args.dist_timeout)
    try:
        return train(args, checkpoint, runtime)
    finally:
        if runtime.ddp.enabled:
            dist.destroy_process_group()


def train(args: argparse.Namespace, checkpoint: dict | None, runtime: Runtime) -> int:
    started = time.monotonic()
    args.run_dir = runtime.ddp.broadcast(args.run_dir)  # a timestamped name must be the same on every rank
    if not runtime.ddp.is_main:
        logging.getLogger().setLevel(logging.ERROR)
    keep_freed_cpu_memory(runtime.device)
    seed_everything(args.seed)
    train_set, val_set = prepare_data(args, checkpoint, runtime)
    rules = DataRules(train_set.mapping, train_set.reading, train_set.normalization)
    loaders = build_loaders(
        train_set,
        val_set,
        batch_size=args.batch_size,
        workers=args.workers,
        weighted=args.sampler == "weighted",
        seed=args.seed,
        strict=args.strict,
        runtime=runtime,
        min_epoch_samples=args.min_epoch_samples,
    )
    training = build_training(args, train_set, runtime)
    memory_note = check_memory(training, args, runtime)
    if checkpoint:
        training.restore(checkpoint)
    history, start_epoch = (checkpoint["history"], checkpoint["epoch"]) if checkpoint else ([], 0)
    report = Reporter(
        args.run_dir,
        active=runtime.ddp.is_main,
        purge_step=start_epoch + 1 if checkpoint else None,
        class_names=rules.mapping.names,
        epochs=args.epochs,
        display_channel=args.display_channel,
    )
    if checkpoint:
        report.print(f"resumed from {checkpoint['path']} at epoch {start_epoch}")
    report.print(
        f"{len(train_set)} training and {len(val_set)} validation images, {rules.mapping.num_classes} classes "
        f"({', '.join(rules.mapping.names)}); {input_text(rules)}; "
        f"{count_parameters(training.model) / 1e6:.2f} M parameters; "
        f"{runtime.describe()}; {batch_text(args, runtime)}; {memory_note}"
    )
    report.config(args)
    early = EarlyStopping(args.early_stop, best=checkpoint["best_miou"] if checkpoint else -1.0)
    best_confusion = checkpoint.get("best_confusion") if checkpoint else None
    status = fit(
        training,
        loaders,
        args=args,
        rules=rules,
        report=report,
        history=history,
        early=early,
        best_confusion=best_confusion,
        budget=TimeBudget(args.time_budget * 60, started) if args.time_budget and not checkpoint else None,
        runtime=runtime,
    )
    if status is not None:
        return status
    report.finish(history, args, early.best, val_set.images_dir)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
