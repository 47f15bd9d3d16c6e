"""What a training run leaves behind: console lines, TensorBoard events, checkpoints, figures. Rank 0 only."""

from __future__ import annotations

import logging
import signal
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from checkpoints import DataSpec, save_checkpoint
from config_file import write_config
from engine import Validation
from files import printable
from metrics import ConfusionMatrix
from plots import confusion_matrix_figure, curves_figure, sample_panel, save_figure
from records import OBJECT_COLUMNS, confusion_from, format_report, write_report, write_results
from schedule import Plan
from stopping import GracefulStop

log = logging.getLogger(__name__)


def batch_text(batch_size: int, accumulate: int, world_size: int) -> str:
    """The batch per update, when accumulation or several processes make it more than --batch-size."""
    if accumulate == 1 and world_size == 1:
        return f"batch {batch_size}"
    parts = [f"{batch_size} per step"]
    parts += [f"x {accumulate} accumulated"] if accumulate > 1 else []
    parts += [f"x {world_size} processes"] if world_size > 1 else []
    return f"batch {' '.join(parts)} = {batch_size * accumulate * world_size} per update"


SCALARS = {
    "loss/train": "train_loss",
    "loss/val": "val_loss",
    "val/miou": "miou",
    "val/mdice": "mdice",
    "val/pixel_acc": "pixel_acc",
    "lr": "lr",
    **{f"objects/{key}": key for key in OBJECT_COLUMNS},  # runs that learn objects
}


def input_text(spec: DataSpec) -> str:
    """The start-up line's words for the model's input: channels and normalisation."""
    channels, normalization = spec.reading.channels, spec.normalization
    clipped = ", clipped to the 0.5-99.5 percentiles" if normalization.low is not None else ""
    return f"{channels} input channel{'s' * (channels != 1)}, {normalization.name} normalisation{clipped}"


def skip_report(train_skipped: list[str], val_skipped: list[str]) -> str:
    parts = [
        f"{split} skipped {len(set(bad))} bad samples: {'; '.join(sorted(set(bad))[:5])}"
        for split, bad in (("train", train_skipped), ("val", val_skipped))
        if bad
    ]
    return ("  " + "  ".join(parts)) if parts else ""


class Reporter:
    """Every method does nothing on ranks other than 0, so the loop needs no rank checks."""

    def __init__(
        self,
        run_dir: Path,
        *,
        active: bool,
        purge_step: int | None,
        class_names: list[str],
        epochs: int,
        display_channel: int | None = None,
    ):
        """display_channel: the sample panels show that channel as grey (default: the first three as RGB)."""
        self.run_dir, self.active, self.class_names, self.epochs = run_dir, active, class_names, epochs
        self.display_channel = display_channel
        self.checkpoints = run_dir / "checkpoints"
        self.writer = SummaryWriter(str(run_dir), purge_step=purge_step) if active else None

    def replanned(self, plan: Plan, said: list[str]) -> Plan:
        """A plan made after an epoch (schedule.next_plan): its lines said, the epochs it spans shown from now on."""
        self.epochs = plan.epochs
        for line in said:
            log.info(line)
        return plan

    def config(self, values: dict, chosen: list[str]) -> None:
        """config.yaml: the resolved flags (config.replay_values), which `train.py --config` replays, under what
        start-up chose and why (planner.startup_choices) as comments."""
        if self.active:
            write_config(values, self.run_dir / "config.yaml", ["start-up chose:", *chosen] if chosen else [])

    def epoch(self, history: list[dict], validation: Validation | None, skipped: list[str], *, figures: bool) -> None:
        """The console line, TensorBoard scalars and results.csv of the epoch just finished (history[-1]), and with
        figures its sample panel and confusion matrix; an epoch not validated (validation None) has no validation
        scalars or figures, and says so."""
        if not self.active:
            return
        record = history[-1]
        epoch = record["epoch"]
        for tag, key in SCALARS.items():
            if key in record:
                self.writer.add_scalar(tag, record[key], epoch)
        if validation is not None:
            for name, iou in zip(self.class_names, validation.metrics["iou"].tolist(), strict=True):
                self.writer.add_scalar(f"iou/{name}", iou, epoch)
            if figures:
                self.figures(epoch, validation.panel, validation.matrix)
        scores = (
            f"val loss {record['val_loss']:.4f}  mIoU {record['miou']:.4f}  mDice {record['mdice']:.4f}  "
            f"pixel acc {record['pixel_acc']:.4f}"
            if record["validated"]
            else "not validated"
        )
        if "ap50" in record:
            scores += f"  objects AP50 {record['ap50']:.4f}  AP50-95 {record['ap50_95']:.4f}  PQ {record['pq']:.4f}"
        log.info(
            f"epoch {epoch}/{self.epochs}  train loss {record['train_loss']:.4f}  {scores}  "
            f"lr {record['lr']:.2e}  {record['seconds']:.1f}s ({record['images_per_s']:.1f} images/s)"
            + skip_report(skipped, validation.skipped if validation else [])
        )
        write_results(history, self.run_dir / "results.csv")

    def save(self, state: dict, *, improved: bool, numbered: bool) -> None:
        if not self.active:
            return
        save_checkpoint(state, self.checkpoints / "last.pt")
        if improved:
            save_checkpoint(state, self.checkpoints / "best.pt")
        if numbered:
            save_checkpoint(state, self.checkpoints / f"epoch_{state['epoch']:03d}.pt")

    def figures(self, epoch: int, first_batch: tuple, matrix: ConfusionMatrix) -> None:
        """The sample panel and confusion matrix, as PNGs under samples/ and in TensorBoard."""
        if not self.active:
            return
        (self.run_dir / "samples").mkdir(parents=True, exist_ok=True)
        for tag, fig in (
            ("samples", sample_panel(*first_batch, self.class_names, display_channel=self.display_channel)),
            ("confusion_matrix", confusion_matrix_figure(matrix.matrix, self.class_names)),
        ):
            fig.savefig(self.run_dir / "samples" / f"{tag}_epoch_{epoch:03d}.png", dpi=100)
            self.writer.add_figure(tag, fig, epoch)  # also closes the figure

    def class_report(self, best_confusion: list[list[int]] | None, history: list[dict], best_miou: float) -> None:
        """Per-class scores of the best epoch (what best.pt holds), printed and written as report.csv/.json."""
        if not self.active or best_confusion is None:
            return
        rows = write_report(confusion_from(best_confusion), self.class_names, self.run_dir)
        epoch = next((h["epoch"] for h in history if h.get("miou") == best_miou), "?")
        log.info(f"\nbest epoch {epoch} (best.pt), per class on the validation set:\n{format_report(rows)}")

    def finish(self, history: list[dict], flags: dict, best_miou: float, val_images: Path) -> None:
        """flags: the run's recorded flags, TensorBoard's hyperparameters beside the best mIoU."""
        if not self.active:
            return
        if history:
            save_figure(curves_figure(history), self.run_dir / "curves.png")
            hparams = {
                k: printable(str(v)) if isinstance(v, (str, Path, tuple, list)) or v is None else v
                for k, v in flags.items()
            }
            self.writer.add_hparams(hparams, {"hparam/best_miou": best_miou}, run_name="hparams")
        self.writer.close()
        log.info(
            f"\nbest val mIoU {best_miou:.4f}\n"
            f"TensorBoard logs: {self.run_dir}\ncheckpoints: {self.checkpoints} (best.pt, last.pt)\n"
            f"sample images: {self.run_dir / 'samples'}\ncurves: {self.run_dir / 'curves.png'}\n"
            f"records: {self.run_dir / 'results.csv'}, report.csv, report.json, config.yaml\nnext:\n"
            f"  tensorboard --logdir {self.run_dir.parent}\n"
            f"  python inference.py --input_dir {val_images} --checkpoint {self.checkpoints / 'best.pt'}"
        )

    def during_epoch(self, epoch: int) -> str:
        """When a stop came mid-epoch: what last.pt holds."""
        last = self.checkpoints / "last.pt"
        saved = f"{last} holds epoch {epoch - 1}" if epoch > 1 else "no epoch had finished, nothing was saved"
        return f"during epoch {epoch}; {saved}"

    def stopped(self, stop: GracefulStop, when: str) -> int:
        """Say how to continue after SIGINT/SIGTERM; returns the exit status (130 or 143)."""
        if self.active:
            log.warning(
                f"stopped by {signal.Signals(stop.signum).name} {when}; "
                f"continue with --resume auto --run-dir {self.run_dir}"
            )
        if self.writer is not None:
            self.writer.close()
        return stop.exit_code

    def early_stopped(self, best_miou: float, patience: int) -> None:
        log.info(f"early stop: no better val mIoU in {patience} validations (best {best_miou:.4f})")

    def non_finite(self, err: Exception) -> int:
        """A diverged run: nothing of the epoch is saved; returns the exit status 1."""
        log.error(
            f"error: {err}; stopped without saving. last good checkpoint: {self.checkpoints / 'last.pt'} "
            f"(try a lower --lr or --precision fp32)"
        )
        return 1
