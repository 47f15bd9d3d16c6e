"""The optimiser, its learning-rate schedule (a pure function of the epochs done) and the moving average of the
weights: how gradients become weight updates."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
from torch.optim.swa_utils import AveragedModel

# sgd: nnU-Net's (Nesterov momentum 0.99; its recipe pairs it with --lr 1e-2 --schedule poly)
OPTIMIZERS = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": partial(torch.optim.SGD, momentum=0.99, nesterov=True),
}


SCHEDULES = ("cosine", "poly")


POLY_POWER = 0.9  # MMSegmentation's and DeepLab's


def build_optimizer(
    model: torch.nn.Module, lr: float, device: torch.device, *, name: str = "adam", weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """The reference design's Adam by default; the fused kernel where PyTorch has one. Weight decay (L2 for
    adam and sgd, decoupled for adamw) applies to convolution weights only, never to biases, norms or the attention
    gate, as in timm and MMSegmentation."""
    params = list(model.parameters())
    groups = [{"params": params, "weight_decay": 0.0}]  # one group, as checkpoints of the reference recipe hold
    if weight_decay > 0:
        groups = [
            {"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
        ]
    return OPTIMIZERS[name](groups, lr=lr, fused=device.type in ("cuda", "cpu"))


def scheduled_lr(done: float, *, base: float, epochs: float, warmup: int = 0, schedule: str = "cosine") -> float:
    """The learning rate of the step taken after `done` epochs (fractional: it changes every step, as in
    torchvision's segmentation reference), a function of that alone so a resumed run needs nothing else: linear
    warmup to base over the warmup epochs, then cosine (to 0 at `epochs`, as CosineAnnealingLR) or poly decay
    over the rest. epochs may be fractional: a time budget can end the run partway through an epoch."""
    if done < warmup:
        return base * (done + 1) / (warmup + 1)
    progress = min((done - warmup) / max(epochs - warmup, 1e-9), 1.0)
    if schedule == "poly":
        return base * (1 - progress) ** POLY_POWER
    return base * (1 + math.cos(math.pi * progress)) / 2


def ema_model(model: torch.nn.Module, decay: float) -> AveragedModel:
    """An exponential moving average of the weights and BatchNorm statistics. The decay warms up as in timm
    (min(decay, (1 + n) / (10 + n)) after n updates) so short runs are not averaged into their initial weights."""

    def average(ema: list[torch.Tensor], current: list[torch.Tensor], updates: torch.Tensor) -> None:
        n = float(updates)
        weight = 1 - min(decay, (1 + n) / (10 + n))
        if torch.is_floating_point(ema[0]):
            torch._foreach_lerp_(ema, current, weight)
        else:  # BatchNorm's batch counters
            torch._foreach_copy_(ema, current)

    return AveragedModel(model, multi_avg_fn=average, use_buffers=True)


@dataclass(frozen=True)
class UpdateRule:
    """How gradients become weight updates: accumulated over micro-batches, clipped, followed by an EMA."""

    accumulate: int = 1
    clip_grad: float | None = None
    ema: AveragedModel | None = None


ONE_UPDATE_PER_BATCH = UpdateRule()  # no accumulation, no clipping, no EMA
