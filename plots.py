"""Figures that explain a run: sample panels, the confusion matrix, training curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from intensity import display_rgb  # noqa: E402
from utils import colours  # noqa: E402

IGNORE_COLOUR = np.array([255, 255, 255], dtype=np.uint8)


def colourise(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) uint8 colours; ignored pixels (and any index past the classes) white."""
    table = np.tile(IGNORE_COLOUR, (256, 1))
    table[:num_classes] = colours(num_classes)
    return table[labels.astype(np.int64).clip(0, 255)]


def legend_handles(class_names: list[str]) -> list[Patch]:
    palette = colours(len(class_names))
    return [Patch(color=c / 255, label=name) for c, name in zip(palette, class_names, strict=True)]


def sample_panel(
    images: list[torch.Tensor],
    targets: list[torch.Tensor],
    preds: list[torch.Tensor],
    class_names: list[str],
    *,
    display_channel: int | None = None,
) -> Figure:
    """One row per sample (each at its own size): image (intensity.display_rgb) | ground truth | prediction."""
    rows, k = len(images), len(class_names)
    fig, axes = plt.subplots(rows, 3, figsize=(7.5, 2.5 * rows + 0.6), squeeze=False)
    for row in range(rows):
        for col, (title, picture) in enumerate(
            (
                ("image", display_rgb(images[row], display_channel)),
                ("ground truth", colourise(targets[row].cpu().numpy(), k)),
                ("prediction", colourise(preds[row].cpu().numpy(), k)),
            )
        ):
            axes[row, col].imshow(picture, interpolation="nearest")
            axes[row, col].set_axis_off()
            if row == 0:
                axes[row, col].set_title(title)
    fig.legend(handles=legend_handles(class_names), loc="lower center", ncol=min(k, 6), frameon=False)
    fig.tight_layout(rect=(0, 0.6 / (2.5 * rows + 0.6), 1, 1))
    return fig


def confusion_matrix_figure(matrix: torch.Tensor, class_names: list[str]) -> Figure:
    """Rows (ground truth) normalised to 1, so rare classes are as readable as common ones."""
    m = matrix.double().cpu()
    normalised = (m / m.sum(1, keepdim=True).clamp_min(1)).numpy()
    k = len(class_names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * k, 0.8 + 0.6 * k))
    ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(
                j,
                i,
                f"{normalised[i, j]:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if normalised[i, j] > 0.5 else "black",
            )
    ax.set_xticks(range(k), class_names, rotation=45, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    fig.tight_layout()
    return fig


def curves_figure(history: list[dict]) -> Figure:
    """Training loss per epoch, validation loss and mIoU per validated epoch."""
    epochs = [h["epoch"] for h in history]
    validated = [h for h in history if "miou" in h]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    left.plot(epochs, [h["train_loss"] for h in history], label="train")
    left.plot([h["epoch"] for h in validated], [h["val_loss"] for h in validated], marker=".", label="validation")
    left.set_xlabel("epoch")
    left.set_ylabel("loss")
    left.legend()
    right.plot([h["epoch"] for h in validated], [h["miou"] for h in validated], marker=".", color="tab:green")
    right.set_xlabel("epoch")
    right.set_ylabel("validation mIoU")
    right.set_ylim(0, 1)
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
