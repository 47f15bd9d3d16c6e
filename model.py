"""Residual U-Net with scaled dot-product self-attention at the bottleneck."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch.utils.checkpoint import checkpoint


class ResidualBlock(nn.Module):
    """conv3x3-BN-SiLU-conv3x3-BN plus a shortcut, SiLU after the sum."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.act = nn.SiLU(inplace=True)
        if in_channels == out_channels:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)
            )

    def fold_batchnorm(self) -> None:
        """Inference only: fold each BatchNorm's eval statistics into the convolution before it."""
        self.conv1, self.bn1 = fuse_conv_bn_eval(self.conv1, self.bn1), nn.Identity()
        self.conv2, self.bn2 = fuse_conv_bn_eval(self.conv2, self.bn2), nn.Identity()
        if isinstance(self.shortcut, nn.Sequential):
            self.shortcut = fuse_conv_bn_eval(*self.shortcut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dropout(self.act(self.bn1(self.conv1(x))))
        y = self.bn2(self.conv2(y))
        return self.act(y + self.shortcut(x))


class SelfAttention2d(nn.Module):
    """Non-local attention over all positions; the gate starts at 0 so training starts as a plain U-Net."""

    def __init__(self, channels: int):
        super().__init__()
        key_channels = max(channels // 8, 1)
        self.query = nn.Conv2d(channels, key_channels, 1)
        self.key = nn.Conv2d(channels, key_channels, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # One head, in the (batch, heads, positions, channels) layout the fused kernels and ONNX export expect.
        q = self.query(x).flatten(2).transpose(1, 2)[:, None]  # (b, 1, hw, c/8)
        k = self.key(x).flatten(2).transpose(1, 2)[:, None]
        v = self.value(x).flatten(2).transpose(1, 2)[:, None]  # (b, 1, hw, c)
        attended = F.scaled_dot_product_attention(q, k, v)[:, 0]  # softmax(QK^T / sqrt(d)) V
        return x + self.gate * attended.transpose(1, 2).reshape(b, c, h, w)


class Up(nn.Module):
    """Transposed-conv x2 upsampling, concatenation with the skip, a residual block."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
        self.block = ResidualBlock(2 * out_channels, out_channels, dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.block(torch.cat([self.up(x), skip], dim=1))


DEFAULT_WIDTHS = (16, 32, 64, 128)  # channels per encoder level: the model's and train.py's default (docs/results.md)


class ResidualAttnUNet(nn.Module):
    """Encoder of residual blocks, attention bottleneck, decoder with skip concatenation; the class head and, with
    extra_outputs, a separation head beside it on the same features (instances.py: one pass gives both maps). The
    output is (batch, num_classes + extra_outputs, H, W): the class logits first.

    `config` holds the constructor arguments: they travel in the checkpoint so the model can be rebuilt.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 2,
        widths: tuple[int, ...] = DEFAULT_WIDTHS,
        dropout: float = 0.0,
        extra_outputs: int = 0,
    ):
        super().__init__()
        widths = tuple(widths)
        self.config = {
            "in_channels": in_channels,
            "num_classes": num_classes,
            "widths": list(widths),
            "dropout": dropout,
            **({"extra_outputs": extra_outputs} if extra_outputs else {}),  # semantic models' config as before
        }
        self.encoders = nn.ModuleList()
        channels = in_channels
        for width in widths:
            self.encoders.append(ResidualBlock(channels, width))
            channels = width
        bottleneck = 2 * widths[-1]
        self.bottleneck = nn.Sequential(ResidualBlock(channels, bottleneck, dropout), SelfAttention2d(bottleneck))
        self.decoders = nn.ModuleList()
        channels = bottleneck
        for width in reversed(widths):
            self.decoders.append(Up(channels, width, dropout))
            channels = width
        self.head = nn.Conv2d(channels, num_classes, 1)
        self.separation_head = nn.Conv2d(channels, extra_outputs, 1) if extra_outputs else None
        self.stride = 2 ** len(widths)
        self.grad_checkpoint = False  # set by --grad-checkpoint; not a weight, so not in config

    def fold_batchnorm(self) -> ResidualAttnUNet:
        """For inference (eval mode): BatchNorm folded into the convolutions, same outputs, less work."""
        if self.training:
            raise RuntimeError("fold_batchnorm() needs eval mode: it freezes the running statistics")
        for module in self.modules():
            if isinstance(module, ResidualBlock):
                module.fold_batchnorm()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        # Pad to a multiple of the total stride so any input size works; crop the logits back. Unconditional
        # (a zero pad is a cheap copy), so an exported graph pads whatever size it is given.
        x = F.pad(x, (0, -width % self.stride, 0, -height % self.stride), mode="replicate")
        skips = []
        for encoder in self.encoders:
            x = self._run(encoder, x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self._run(self.bottleneck, x)
        for decoder, skip in zip(self.decoders, reversed(skips), strict=True):
            x = self._run(decoder, x, skip)
        logits = self.head(x) if self.separation_head is None else torch.cat([self.head(x), self.separation_head(x)], 1)
        return logits[..., :height, :width]

    def _run(self, block: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
        """With grad_checkpoint, a block keeps only its inputs for backward and recomputes the rest there:
        activation memory for about a third more compute. (BatchNorm's running statistics then take the
        recomputed forward's update too, a second step of momentum, as in timm and torchvision.)"""
        if self.grad_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(block, *inputs, use_reentrant=False)
        return block(*inputs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
