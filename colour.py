"""Colour augmentation and normalisation of a whole training batch, where the model runs.

A loader worker only draws each sample's colour random numbers (as torchvision's ColorJitter, RandomApply and
GaussianBlur draw them, in the same order, so a seed makes the same sample); the pixel work runs once per batch on
the training device. The workers then hand over uint8 crops, a quarter of the bytes of normalised float ones, and
spend none of their time on colour.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from intensity import Normalization, unit_range

JITTER = 0.3  # brightness, contrast, saturation: factors drawn from 1 +- 0.3
STRONG_HUE = 0.05
BLUR = {"kernel_size": 5, "sigma": (0.1, 2.0), "p": 0.3}  # strong only


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

    def __init__(self, augment: str, normalization: Normalization, *, photo: bool = True):
        self.normalization = normalization
        strong = augment == "strong"
        self.jitter, self.active_ops = None, []
        if augment != "none" and photo:
            self.jitter = v2.ColorJitter(JITTER, JITTER, JITTER, STRONG_HUE if strong else 0.0)
            spreads = (self.jitter.brightness, self.jitter.contrast, self.jitter.saturation, self.jitter.hue)
            self.active_ops = [op for op, spread in enumerate(spreads) if spread is not None]
        self.channel_jitter = augment != "none" and not photo
        self.blur = v2.GaussianBlur(BLUR["kernel_size"], BLUR["sigma"]) if strong else None

    def draw(self, channels: int) -> torch.Tensor:
        """One sample's random numbers, float64: photos [order x4, brightness, contrast, saturation, hue], other
        images [brightness x C, contrast x C]; then, with a blur, its sigma (0: not blurred)."""
        draws = []
        if self.jitter is not None:
            params = self.jitter.make_params([])
            factors = [params[f"{name}_factor"] for name in ("brightness", "contrast", "saturation", "hue")]
            draws = [*params["fn_idx"].tolist(), *(0.0 if factor is None else factor for factor in factors)]
        elif self.channel_jitter:
            draws = torch.empty(2 * channels).uniform_(1 - JITTER, 1 + JITTER).tolist()
        if self.blur is not None:
            blurred = bool(torch.rand(1) < BLUR["p"])  # RandomApply's draw, then GaussianBlur's
            draws.append(self.blur.make_params([])["sigma"][0] if blurred else 0.0)
        return torch.tensor(draws, dtype=torch.float64)

    def __call__(self, images: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) pixels as the loader gives them (uint8, or float) and (B, K) draws -> the model's float32
        input, on the images' device."""
        images = unit_range(images)  # float32 pixels come as they are: nothing below writes into them
        draws = draws.cpu()  # the schedule is read on the host
        if self.jitter is not None:
            images = self._jitter_photos(images, draws)
        elif self.channel_jitter:
            images = self._jitter_channels(images, draws)
        if self.blur is not None:
            images = self._blur(images, draws[:, -1])
        return self.normalization(images)

    def _jitter_photos(self, images: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        """Step k applies each sample's k-th adjustment. Brightness, contrast and saturation are each a blend with
        another image (black, the grey mean, the grey image), so a step is one blend over the whole batch; a sample
        whose step is the hue turn (strong only) blends with factor 1 (unchanged) and is turned on its own; without a
        hue turn (basic) there are three steps."""
        order, factors = draws[:, :4].long(), draws[:, 4:8].float()
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

    def _jitter_channels(self, images: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        channels = images.shape[1]
        factors = draws[:, : 2 * channels].to(images.device, torch.float32).view(-1, 2, channels, 1, 1)
        brightness, contrast = factors[:, 0], factors[:, 1]
        mean = images.mean((-2, -1), keepdim=True)
        return brightness * (mean + contrast * (images - mean))

    def _blur(self, images: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        blurred = sigmas.nonzero().flatten().tolist()
        images = images.clone() if blurred else images
        for index in blurred:
            sigma = float(sigmas[index])
            images[index] = TF.gaussian_blur(images[index], [BLUR["kernel_size"]] * 2, [sigma, sigma])
        return images
