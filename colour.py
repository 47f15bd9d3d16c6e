"""Colour augmentation and normalisation of a whole training batch, where the model runs.

A loader worker only draws each sample's colour random numbers (as torchvision's ColorJitter, RandomApply and
GaussianBlur draw them, in the same order, so a seed makes the same sample); the pixel work runs once per batch on
the training device. The workers then hand over uint8 crops, a quarter of the bytes of normalised float ones, and
spend none of their time on colour.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from intensity import Normalization, unit_range

JITTER = 0.3  # brightness, contrast, saturation: factors drawn from 1 +- 0.3
STRONG_HUE = 0.05
BLUR = {"kernel_size": 5, "sigma": (0.1, 2.0), "p": 0.3}  # strong only


@dataclass(frozen=True)
class AugmentLevel:
    """What one --augment level does: the geometry's flips and rotation (transforms.build_geometry) and the colour
    stage's jitter, hue turn and blur (BatchColour)."""

    hflip: bool
    vflip: bool
    degrees: float
    jitter: (
        bool  # photos: ColorJitter's brightness, contrast, saturation; other images: per-channel brightness, contrast
    )
    hue: float
    blur: bool
    resized_crop_scale: float  # --crop-size 0: the smallest share of the image a random resized crop keeps


AUGMENT_LEVELS = {  # --augment's choices, in the order the flag lists them
    "none": AugmentLevel(
        hflip=False, vflip=False, degrees=0.0, jitter=False, hue=0.0, blur=False, resized_crop_scale=1
    ),
    "basic": AugmentLevel(
        hflip=True, vflip=False, degrees=15.0, jitter=True, hue=0.0, blur=False, resized_crop_scale=0.5
    ),
    "strong": AugmentLevel(
        hflip=True, vflip=True, degrees=15.0, jitter=True, hue=STRONG_HUE, blur=True, resized_crop_scale=0.25
    ),
}


class ColourDraws(NamedTuple):
    """One sample's colour random numbers by name (a DataLoader collates them field by field into a batch's, each
    with a leading batch dimension). Fields a dataset's images do not use hold zeros."""

    order: torch.Tensor  # photos: ColorJitter's order of its four adjustments (fn_idx: BRIGHTNESS, ...), long
    photo_factors: torch.Tensor  # photos: the brightness, contrast, saturation and hue factors, by the same numbers
    channel_brightness: torch.Tensor  # other images: a brightness factor per channel
    channel_contrast: torch.Tensor  # other images: a contrast factor per channel
    blur_sigma: torch.Tensor  # strong: the Gaussian blur's sigma; 0: not blurred

    def to_host(self) -> ColourDraws:
        return ColourDraws(*(field.cpu() for field in self))

    def one(self) -> ColourDraws:
        """A single sample's draws as a batch of one."""
        return ColourDraws(*(field[None] for field in self))


def blend(images: torch.Tensor, other: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """torchvision's float blend, factor * image + (1 - factor) * other clipped to 0..1, with a factor per sample."""
    return torch.lerp(other, images, factors).clamp_(0, 1)


def adjust_hue(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """One sample at a time: the hue turn goes through HSV, which torchvision has no batched form of."""
    return torch.stack([TF.adjust_hue(image, float(factor)) for image, factor in zip(images, factors, strict=True)])


BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # ColorJitter's fn_idx numbers


class BatchColour:
    """--augment's colour stage and the normalisation: draw() per sample in the loader, __call__ per batch.

    8-bit RGB photos get torchvision's ColorJitter (its four adjustments in each sample's own random order);
    other images brightness and contrast per channel (x -> b * (m + c * (x - m)), m the channel's mean: hue and
    saturation mean nothing there); `strong` adds a Gaussian blur to 30% of the samples.
    """

    def __init__(self, level: AugmentLevel, normalization: Normalization, *, photo: bool = True):
        self.normalization = normalization
        self.jitter, self.active_ops = None, []
        if level.jitter and photo:
            self.jitter = v2.ColorJitter(JITTER, JITTER, JITTER, level.hue)
            spreads = (self.jitter.brightness, self.jitter.contrast, self.jitter.saturation, self.jitter.hue)
            self.active_ops = [op for op, spread in enumerate(spreads) if spread is not None]
        self.channel_jitter = level.jitter and not photo
        self.blur = v2.GaussianBlur(BLUR["kernel_size"], BLUR["sigma"]) if level.blur else None

    def draw(self, channels: int) -> ColourDraws:
        """One sample's random numbers, drawn as torchvision's classes draw them, in their order."""
        zeros = torch.zeros(4, dtype=torch.float64)
        order, photo_factors, brightness, contrast = torch.zeros(4, dtype=torch.long), zeros, zeros[:0], zeros[:0]
        if self.jitter is not None:
            params = self.jitter.make_params([])
            order = params["fn_idx"].long()
            factors = [params[f"{name}_factor"] for name in ("brightness", "contrast", "saturation", "hue")]
            photo_factors = torch.tensor([0.0 if factor is None else factor for factor in factors], dtype=torch.float64)
        elif self.channel_jitter:
            brightness, contrast = torch.empty(2, channels).uniform_(1 - JITTER, 1 + JITTER).double()
        sigma = 0.0
        if self.blur is not None:
            blurred = bool(torch.rand(1) < BLUR["p"])  # RandomApply's draw, then GaussianBlur's
            sigma = self.blur.make_params([])["sigma"][0] if blurred else 0.0
        return ColourDraws(order, photo_factors, brightness, contrast, torch.tensor(sigma, dtype=torch.float64))

    def __call__(self, images: torch.Tensor, draws: ColourDraws) -> torch.Tensor:
        """(B, C, H, W) pixels as the loader gives them (uint8, or float) and a batch's draws -> the model's float32
        input, on the images' device."""
        images = unit_range(images)  # float32 pixels come as they are: nothing below writes into them
        draws = draws.to_host()  # the schedule is read on the host
        if self.jitter is not None:
            images = self._jitter_photos(images, draws)
        elif self.channel_jitter:
            images = self._jitter_channels(images, draws)
        if self.blur is not None:
            images = self._blur(images, draws.blur_sigma)
        return self.normalization(images)

    def _jitter_photos(self, images: torch.Tensor, draws: ColourDraws) -> torch.Tensor:
        """Step k applies each sample's k-th adjustment. Brightness, contrast and saturation are each a blend with
        another image (black, the grey mean, the grey image), so a step is one blend over the whole batch; a sample
        whose step is the hue turn (strong only) blends with factor 1 (unchanged) and is turned on its own; without a
        hue turn (basic) there are three steps."""
        order, factors = draws.order, draws.photo_factors.float()
        order = order[torch.isin(order, torch.tensor(self.active_ops))].view(len(order), -1)  # hue 0: no step
        blend_factors = factors.gather(1, order).where(order != HUE, 1.0)
        steps = torch.stack([blend_factors, (order == CONTRAST).float(), (order == SATURATION).float()])
        steps = steps.to(images.device)  # (3, B, steps): the schedule crosses to the device in one copy
        for step in range(order.shape[1]):
            factor, contrast, saturation = (values[:, step].view(-1, 1, 1, 1) for values in steps)
            grey = TF.rgb_to_grayscale(images)
            images = blend(images, grey * saturation + grey.mean((-3, -2, -1), keepdim=True) * contrast, factor)
            turned = (order[:, step] == HUE).nonzero().flatten()
            if len(turned):
                on_device = turned.to(images.device)
                images[on_device] = adjust_hue(images[on_device], factors[turned, HUE])
        return images

    def _jitter_channels(self, images: torch.Tensor, draws: ColourDraws) -> torch.Tensor:
        brightness, contrast = (
            factors.to(images.device, torch.float32)[..., None, None]
            for factors in (draws.channel_brightness, draws.channel_contrast)
        )
        mean = images.mean((-2, -1), keepdim=True)
        return brightness * (mean + contrast * (images - mean))

    def _blur(self, images: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        blurred = sigmas.nonzero().flatten().tolist()
        images = images.clone() if blurred else images
        for index in blurred:
            sigma = float(sigmas[index])
            images[index] = TF.gaussian_blur(images[index], [BLUR["kernel_size"]] * 2, [sigma, sigma])
        return images
