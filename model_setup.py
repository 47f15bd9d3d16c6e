"""train.py's model and what steps it (engine.Training), from the settings: the network (compiled, DDP-wrapped), the
optimiser, the loss, the weight average, the colour stage; and the memory check of one step."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dataset import SegmentationFolder
from engine import Training
from errors import UserError
from instances import SEPARATION_CHANNELS
from losses import build_loss
from memory import check_training_memory
from model import ResidualAttnUNet
from optimizer import UpdateRule, build_optimizer, ema_model
from settings import ModelSettings, TrainSettings
from utils import Runtime


def build_model(
    settings: ModelSettings, in_channels: int, num_classes: int, runtime: Runtime, extra_outputs: int = 0
) -> tuple[nn.Module, nn.Module]:
    """The model to save (plain) and the one to step (compiled and/or DDP-wrapped); extra_outputs: a separation
    head's (instances)."""
    model = ResidualAttnUNet(in_channels, num_classes, settings.widths, settings.dropout, extra_outputs)
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
    extra = SEPARATION_CHANNELS if train_set.separation else 0
    model, step_model = build_model(settings.model, channels, train_set.num_classes, runtime, extra)
    optimizer = build_optimizer(model, optim.lr, runtime.device, name=optim.optimizer, weight_decay=optim.weight_decay)
    class_weights = train_set.class_weights.to(runtime.device)
    weights = dict(dice_weight=optim.dice_weight, ce_weight=optim.ce_weight)
    loss_fn = build_loss(
        optim.loss, class_weights, **weights, separation=train_set.separation, num_classes=train_set.num_classes
    )
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
