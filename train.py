"""Train the residual self-attention U-Net: flags -> data, model, optimiser -> the epoch loop.

With no data flags it builds the demo dataset under data/demo and trains on that.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, RandomSampler
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from coco import MODES, prepare_masks
from dataset import (
    IGNORE_INDEX,
    EpochSampler,
    LabelMapping,
    SegmentationFolder,
    SkipBadSamples,
    make_demo_data,
    make_weighted_sampler,
)
from losses import LOSSES, build_loss
from metrics import ConfusionMatrix
from model import ResidualAttnUNet, count_parameters
from plots import confusion_matrix_figure, curves_figure, sample_panel, save_figure
from utils import (
    ArgumentParser,
    CheckpointError,
    UserError,
    autocast,
    init_worker,
    load_checkpoint,
    resolve_device,
    resolve_precision,
    run_cli,
    save_checkpoint,
    seed_everything,
)

DEMO_ROOT = Path("data/demo")
COCO_CACHE = Path("data/coco_masks")
DEMO_IMAGES = {"num_train": 600, "num_val": 150, "size": 96}
DEMO_SETTINGS = {"image_size": 96, "widths": (16, 32, 64, 128), "epochs": 30, "batch_size": 16}
DATA_FLAGS = ("data_root", "train_images", "train_masks", "val_images", "val_masks", "train_coco", "val_coco")
MUST_MATCH_CHECKPOINT = ("widths", "binary", "ignore_value", "coco_mode")  # they fix the model or its classes
PANEL_SAMPLES = 4


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def non_negative_int(text: str) -> int:
    return 0 if text.strip() == "0" else positive_int(text)


def widths_type(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(part) for part in text.split(","))
    except ValueError:
        widths = ()
    if not widths or any(w <= 0 for w in widths):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of positive integers, e.g. 64,128,256,512"
        )
    return widths


def get_args_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = p.add_argument_group("data (none given: the built-in demo under data/demo)")
    data.add_argument("--data-root", type=Path, help="reads DIR/images/{train,val} and DIR/masks/{train,val}")
    data.add_argument("--train-images", type=Path, help="training image folder (overrides --data-root)")
    data.add_argument("--train-masks", type=Path, help="training mask folder (overrides --data-root)")
    data.add_argument("--val-images", type=Path, help="validation image folder (overrides --data-root)")
    data.add_argument("--val-masks", type=Path, help="validation mask folder (overrides --data-root)")
    data.add_argument(
        "--train-coco", type=Path, help="COCO instances json for the training images (masks rendered once, cached)"
    )
    data.add_argument("--val-coco", type=Path, help="COCO instances json for the validation images")
    data.add_argument(
        "--coco-mode",
        choices=MODES,
        default="categories",
        help="classes rendered from COCO: one per category, the 9 super-groups, or binary",
    )
    data.add_argument("--binary", action="store_true", help="every nonzero, non-ignore mask value becomes class 1")
    data.add_argument("--ignore-value", type=int, default=255, help="mask value that marks pixels to ignore")
    data.add_argument(
        "--ignore-unknown-labels",
        action="store_true",
        help="ignore validation mask values the training set never had, instead of stopping",
    )
    data.add_argument(
        "--image-size", type=positive_int, default=256, help="images and masks are resized to this square"
    )
    data.add_argument(
        "--augment",
        choices=("none", "basic", "strong"),
        default="basic",
        help="joint image/mask augmentation of the training set",
    )
    data.add_argument(
        "--sampler",
        choices=("weighted", "uniform"),
        default="weighted",
        help="weighted: images holding rare classes are drawn more often",
    )
    data.add_argument("--workers", type=non_negative_int, default=2, help="DataLoader worker processes")
    data.add_argument("--strict", action="store_true", help="stop at a bad sample instead of skipping it")
    data.add_argument(
        "--train-subset", type=positive_int, help="train on the first N training images only (classes from all)"
    )

    model = p.add_argument_group("model and optimisation")
    model.add_argument(
        "--widths", type=widths_type, default=(64, 128, 256, 512), help="encoder widths, comma-separated"
    )
    model.add_argument("--dropout", type=float, default=0.0, help="Dropout2d in the bottleneck and decoder blocks")
    model.add_argument("--loss", choices=LOSSES, default="ce")
    model.add_argument("--epochs", type=positive_int, default=50)
    model.add_argument("--batch-size", type=positive_int, default=8)
    model.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate, cosine-annealed to 0 over --epochs")
    model.add_argument(
        "--early-stop",
        type=non_negative_int,
        default=0,
        help="stop after N epochs without a better val mIoU (0: never)",
    )

    run = p.add_argument_group("hardware and bookkeeping")
    run.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto")
    run.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16", "fp16"),
        default="auto",
        help="auto: bf16 autocast on GPUs and CPUs with native bf16, fp32 elsewhere",
    )
    run.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="NHWC memory format (faster convolutions on CPU and CUDA)",
    )
    run.add_argument("--compile", action="store_true", help="torch.compile the model")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--run-dir", type=Path, help="default runs/<data>-<time>: events, checkpoints/, samples/")
    run.add_argument("--save-every", type=positive_int, default=10, help="checkpoint and sample panel every N epochs")
    run.add_argument(
        "--resume",
        metavar="PATH|auto",
        help="continue from a checkpoint; auto: last.pt of --run-dir, or of the newest run in runs/",
    )
    return p


def explicit_flags(parser: ArgumentParser, argv: list[str] | None) -> set[str]:
    """The flags the user typed, so demo and resume settings never override them.

    argparse fills in a default only where the namespace lacks the attribute, so a namespace
    pre-filled with a marker keeps the marker exactly where nothing was typed.
    """
    unset = object()
    probe = argparse.Namespace(**{name: unset for name in vars(parser.parse_args([]))})
    parser.parse_args(argv, probe)
    return {name for name, value in vars(probe).items() if value is not unset}


def flag_text(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def find_resume_checkpoint(resume: str, run_dir: Path | None) -> Path | None:
    """auto: last.pt of the run dir, else of the most recently written run under runs/."""
    if resume != "auto":
        path = Path(resume)
        if not path.is_file():
            raise CheckpointError(f"{path}: --resume names no checkpoint file")
        return path
    if run_dir is not None:
        path = run_dir / "checkpoints" / "last.pt"
        return path if path.is_file() else None
    candidates = list(Path("runs").glob("*/checkpoints/last.pt"))
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, dict | None]:
    """Flags, filled in from the demo settings or from the checkpoint being resumed."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    given = explicit_flags(parser, argv)
    checkpoint = None
    if args.resume:
        path = find_resume_checkpoint(args.resume, args.run_dir)
        if path is None:
            print("--resume auto: no checkpoint found, starting a new run")
        else:
            checkpoint = load_checkpoint(path)
            checkpoint["path"] = path
            saved = checkpoint["args"]
            for name in MUST_MATCH_CHECKPOINT:
                ours, theirs = flag_text(getattr(args, name)), flag_text(saved.get(name))
                if name in given and ours != theirs:
                    raise CheckpointError(f"{path}: trained with --{name.replace('_', '-')} {theirs}, not {ours}")
            for name, value in saved.items():
                if name not in given and name not in ("resume", "run_dir") and hasattr(args, name):
                    setattr(args, name, Path(value) if name in DATA_FLAGS and value is not None else value)
            args.widths = tuple(args.widths)
            if args.run_dir is None:
                args.run_dir = path.parent.parent
    args.demo = not any(getattr(args, flag, None) for flag in DATA_FLAGS)
    if args.demo and checkpoint is None:
        for name, value in DEMO_SETTINGS.items():
            if name not in given:
                setattr(args, name, value)
    if args.run_dir is None:
        name = "demo" if args.demo else (args.data_root or args.train_images).resolve().name
        args.run_dir = Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if checkpoint is None and (args.run_dir / "checkpoints" / "last.pt").exists():
        raise UserError(
            f"{args.run_dir}: already holds a run; pass --resume auto to continue it or choose another --run-dir"
        )
    return args, checkpoint


@dataclass
class DataPaths:
    train_images: Path
    train_masks: Path
    val_images: Path
    val_masks: Path


def coco_mask_dir(annotations: Path, images: Path, mode: str) -> Path:
    """Masks rendered from a COCO file, cached under data/coco_masks keyed on the file and mode."""
    stat = annotations.stat() if annotations.is_file() else None
    key = hashlib.sha256(
        f"{annotations.resolve()}|{images.resolve()}|{mode}|"
        f"{stat and stat.st_size}|{stat and stat.st_mtime_ns}".encode()
    ).hexdigest()[:12]
    masks = COCO_CACHE / f"{annotations.stem}-{mode}-{key}"
    summary = prepare_masks(images, annotations, masks, mode, workers=0)
    print(f"{annotations}: {summary.line()} -> {masks}")
    return masks


def data_paths(args: argparse.Namespace) -> DataPaths:
    """The four folders, rendering COCO annotations into cached mask folders where given."""
    root = DEMO_ROOT if args.demo else args.data_root
    if root is not None and not root.is_dir():
        raise UserError(f"--data-root {root}: {'not a folder' if root.exists() else 'no such folder'}")
    paths = {}
    for split in ("train", "val"):
        for kind in ("images", "masks"):
            flag = f"{split}_{kind}"
            paths[flag] = getattr(args, flag) or (root / kind / split if root else None)
        coco_file = getattr(args, f"{split}_coco")
        if coco_file is not None and paths[f"{split}_images"] is not None:
            paths[f"{split}_masks"] = coco_mask_dir(coco_file, paths[f"{split}_images"], args.coco_mode)
        for kind in ("images", "masks"):
            if paths[f"{split}_{kind}"] is None:
                raise UserError(f"--{split}-{kind} is needed (or --data-root, or --{split}-coco with --{split}-images)")
    return DataPaths(**paths)


def build_datasets(
    args: argparse.Namespace, mapping: LabelMapping | None
) -> tuple[SegmentationFolder, SegmentationFolder]:
    paths = data_paths(args)
    train_set = SegmentationFolder(
        paths.train_images,
        paths.train_masks,
        args.image_size,
        mapping,
        args.ignore_value,
        args.binary,
        args.augment,
        limit=args.train_subset,
    )
    val_set = SegmentationFolder(
        paths.val_images,
        paths.val_masks,
        args.image_size,
        train_set.mapping,
        args.ignore_value,
        args.binary,
        "none",
        "ignore" if args.ignore_unknown_labels else "error",
    )
    if args.batch_size > len(train_set):
        raise UserError(f"--batch-size {args.batch_size} is larger than the {len(train_set)} training images")
    return train_set, val_set


def build_loaders(args, train_set, val_set, device) -> tuple[DataLoader, DataLoader]:
    """Weighted or uniform sampling whose order and augmentation are fixed by (seed, epoch)."""
    generator = torch.Generator()
    if args.sampler == "weighted":
        sampler = make_weighted_sampler(train_set, generator)
    else:
        sampler = RandomSampler(train_set, generator=generator)
    loader_options = dict(
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        worker_init_fn=init_worker,
        persistent_workers=args.workers > 0,
        prefetch_factor=4 if args.workers > 0 else None,
    )
    train_loader = DataLoader(
        SkipBadSamples(train_set, args.strict),
        args.batch_size,
        sampler=EpochSampler(sampler, generator, args.seed),
        drop_last=True,
        **loader_options,
    )
    val_loader = DataLoader(
        SkipBadSamples(val_set, args.strict, replace=False), args.batch_size, shuffle=False, **loader_options
    )
    return train_loader, val_loader


class GracefulStop:
    """SIGINT/SIGTERM ask the loop to stop after the current step; a second Ctrl-C stops at once."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self) -> "GracefulStop":
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._request)
        return self

    def _request(self, signum, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)


class NonFiniteLoss(RuntimeError):
    pass


def train_one_epoch(
    model, loader, loss_fn, optimizer, scaler, device, precision, memory_format, epoch: int, stop: GracefulStop
) -> tuple[float, list[str]]:
    """One pass over the sampler; returns the mean loss and the bad samples that were skipped."""
    model.train()
    total_loss = torch.zeros((), device=device)
    first_bad_step = torch.zeros((), dtype=torch.long, device=device)
    skipped: list[str] = []
    steps = 0
    bar = tqdm(loader, desc=f"epoch {epoch} train", leave=False, dynamic_ncols=True)
    for steps, (images, masks, skipped_here) in enumerate(bar, 1):
        skipped.extend(line for s in skipped_here for line in s.splitlines())
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        masks = masks.to(device, non_blocking=True)
        with autocast(device, precision):
            logits = model(images)
        loss = loss_fn(logits, masks)
        # Recorded on the device and read at log points only: no host sync per step.
        first_bad_step = torch.where((first_bad_step == 0) & ~torch.isfinite(loss), steps, first_bad_step)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        total_loss += loss.detach()
        if steps % 10 == 0 or steps == len(loader) or stop.requested:
            if first_bad_step.item():
                raise NonFiniteLoss(f"non-finite loss at epoch {epoch}, step {first_bad_step.item()}")
            bar.set_postfix(loss=f"{total_loss.item() / steps:.4f}")  # a host sync point
        if stop.requested:
            break
    return total_loss.item() / max(steps, 1), skipped


@torch.inference_mode()
def evaluate(model, loader, loss_fn, num_classes: int, device, precision, memory_format, epoch: int):
    """Loss and confusion matrix over the whole validation set, the first batch for a panel, bad files."""
    model.eval()
    matrix = ConfusionMatrix(num_classes, device=device)
    total_loss = torch.zeros((), device=device)
    total_pixels = torch.zeros((), device=device)
    first_batch, skipped = None, []
    for images, masks, skipped_here in tqdm(loader, desc=f"epoch {epoch} val", leave=False, dynamic_ncols=True):
        skipped.extend(line for s in skipped_here for line in s.splitlines())
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        masks = masks.to(device, non_blocking=True)
        with autocast(device, precision):
            logits = model(images)
        # Weighted by labelled pixels, so the loss is over the set, and an all-ignore batch adds nothing.
        pixels = (masks != IGNORE_INDEX).sum()
        total_loss += torch.where(pixels > 0, loss_fn(logits, masks) * pixels, 0.0)
        total_pixels += pixels
        preds = logits.argmax(1)
        matrix.update(preds, masks)
        if first_batch is None:
            first_batch = (images[:PANEL_SAMPLES].cpu(), masks[:PANEL_SAMPLES].cpu(), preds[:PANEL_SAMPLES].cpu())
    matrix.reduce()
    return (total_loss / total_pixels.clamp_min(1)).item(), matrix, first_batch, skipped


def checkpoint_state(model, optimizer, scheduler, scaler, epoch, args, mapping, best_miou, history) -> dict:
    """Plain tensors, numbers, strings, lists and dicts only, so it loads with weights_only=True."""
    plain_args = {
        k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()
    }
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,
        "best_miou": best_miou,
        "history": history,
        "mapping": mapping.to_dict(),
        "model_args": {
            "in_channels": 3,
            "num_classes": mapping.num_classes,
            "widths": list(args.widths),
            "dropout": args.dropout,
        },
        "image_size": args.image_size,
        "args": plain_args,
        "rng": torch.get_rng_state(),  # dropout draws from it; sampling and augmentation are seeded per epoch
    }


def skip_report(train_skipped: list[str], val_skipped: list[str]) -> str:
    parts = [
        f"{split} skipped {len(set(bad))} bad samples: {'; '.join(sorted(set(bad))[:5])}"
        for split, bad in (("train", train_skipped), ("val", val_skipped))
        if bad
    ]
    return ("  " + "  ".join(parts)) if parts else ""


def log_epoch(
    writer: SummaryWriter,
    epoch: int,
    train_loss: float,
    val_loss: float,
    metrics: dict,
    class_names: list[str],
    lr: float,
) -> None:
    writer.add_scalar("loss/train", train_loss, epoch)
    writer.add_scalar("loss/val", val_loss, epoch)
    writer.add_scalar("val/miou", metrics["miou"], epoch)
    writer.add_scalar("val/mdice", metrics["mdice"], epoch)
    writer.add_scalar("val/pixel_acc", metrics["pixel_acc"], epoch)
    writer.add_scalar("lr", lr, epoch)
    for name, iou in zip(class_names, metrics["iou"].tolist()):
        writer.add_scalar(f"iou/{name}", iou, epoch)


def save_figures(
    writer: SummaryWriter, run_dir: Path, epoch: int, first_batch, matrix: ConfusionMatrix, class_names: list[str]
) -> None:
    """The sample panel and confusion matrix, as PNGs under samples/ and in TensorBoard."""
    (run_dir / "samples").mkdir(parents=True, exist_ok=True)
    for tag, fig in (
        ("samples", sample_panel(*first_batch, class_names)),
        ("confusion_matrix", confusion_matrix_figure(matrix.matrix, class_names)),
    ):
        fig.savefig(run_dir / "samples" / f"{tag}_epoch_{epoch:03d}.png", dpi=100)
        writer.add_figure(tag, fig, epoch)  # also closes the figure


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(message)s", level=logging.INFO)
    args, checkpoint = parse_args(argv)
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    seed_everything(args.seed)
    if args.demo:
        print(
            f"demo run: data {DEMO_ROOT} ({DEMO_IMAGES['num_train']} train, {DEMO_IMAGES['num_val']} val images), "
            f"image size {args.image_size}, widths {','.join(map(str, args.widths))}, {args.epochs} epochs, "
            f"batch {args.batch_size}"
        )
        make_demo_data(DEMO_ROOT, **DEMO_IMAGES)

    mapping = LabelMapping.from_dict(checkpoint["mapping"]) if checkpoint else None
    train_set, val_set = build_datasets(args, mapping)
    mapping, class_names = train_set.mapping, train_set.mapping.names
    train_loader, val_loader = build_loaders(args, train_set, val_set, device)

    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = ResidualAttnUNet(3, mapping.num_classes, args.widths, args.dropout).to(device, memory_format=memory_format)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, fused=device.type in ("cuda", "cpu"))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    loss_fn = build_loss(args.loss, train_set.class_weights.to(device)).to(device)
    start_epoch, best_miou, history = 0, -1.0, []
    if checkpoint:
        if checkpoint["model_args"]["num_classes"] != mapping.num_classes:
            raise CheckpointError(
                f"{checkpoint['path']}: has {checkpoint['model_args']['num_classes']} classes, "
                f"the data {mapping.num_classes}"
            )
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        torch.set_rng_state(checkpoint["rng"])
        start_epoch, best_miou, history = checkpoint["epoch"], checkpoint["best_miou"], checkpoint["history"]
        print(f"resumed from {checkpoint['path']} at epoch {start_epoch}")
    step_model = torch.compile(model) if args.compile else model

    run_dir = args.run_dir
    ckpt_dir = run_dir / "checkpoints"
    print(
        f"{len(train_set)} training and {len(val_set)} validation images, {mapping.num_classes} classes "
        f"({', '.join(class_names)}); {count_parameters(model) / 1e6:.2f} M parameters; "
        f"{device.type}, {precision}, {'channels_last' if args.channels_last else 'NCHW'}"
    )
    writer = SummaryWriter(str(run_dir), purge_step=start_epoch + 1 if checkpoint else None)
    epochs_without_gain = 0
    with GracefulStop() as stop:
        for epoch in range(start_epoch + 1, args.epochs + 1):
            started = time.time()
            train_loader.sampler.set_epoch(epoch)
            lr = optimizer.param_groups[0]["lr"]
            try:
                train_loss, skipped = train_one_epoch(
                    step_model, train_loader, loss_fn, optimizer, scaler, device, precision, memory_format, epoch, stop
                )
            except NonFiniteLoss as err:
                print(
                    f"error: {err}; stopped without saving. last good checkpoint: {ckpt_dir / 'last.pt'} "
                    f"(try a lower --lr or --precision fp32)",
                    file=sys.stderr,
                )
                return 1
            if stop.requested:
                saved = (
                    f"{ckpt_dir / 'last.pt'} holds epoch {epoch - 1}"
                    if epoch > start_epoch + 1 or checkpoint
                    else "no epoch had finished, nothing was saved"
                )
                print(
                    f"stopped by signal {stop.signum} during epoch {epoch}; {saved}; continue with "
                    f"--resume auto --run-dir {run_dir}",
                    file=sys.stderr,
                )
                return stop.exit_code
            val_loss, matrix, first_batch, val_skipped = evaluate(
                step_model, val_loader, loss_fn, mapping.num_classes, device, precision, memory_format, epoch
            )
            scheduler.step()
            metrics = matrix.compute()
            history.append(
                {
                    "epoch": epoch,
                    "train_loss": train_loss,
                    "val_loss": val_loss,
                    "miou": metrics["miou"],
                    "mdice": metrics["mdice"],
                    "pixel_acc": metrics["pixel_acc"],
                    "lr": lr,
                }
            )
            log_epoch(writer, epoch, train_loss, val_loss, metrics, class_names, lr)
            improved = metrics["miou"] > best_miou
            best_miou = max(best_miou, metrics["miou"])
            epochs_without_gain = 0 if improved else epochs_without_gain + 1
            stopping = args.early_stop and epochs_without_gain >= args.early_stop
            state = checkpoint_state(model, optimizer, scheduler, scaler, epoch, args, mapping, best_miou, history)
            save_checkpoint(state, ckpt_dir / "last.pt")
            if improved:
                save_checkpoint(state, ckpt_dir / "best.pt")
            if epoch % args.save_every == 0 or epoch == args.epochs or stopping:
                save_checkpoint(state, ckpt_dir / f"epoch_{epoch:03d}.pt")
                save_figures(writer, run_dir, epoch, first_batch, matrix, class_names)
            print(
                f"epoch {epoch}/{args.epochs}  train loss {train_loss:.4f}  val loss {val_loss:.4f}  "
                f"mIoU {metrics['miou']:.4f}  mDice {metrics['mdice']:.4f}  pixel acc {metrics['pixel_acc']:.4f}  "
                f"lr {lr:.2e}  {time.time() - started:.1f}s" + skip_report(skipped, val_skipped)
            )
            if stop.requested:
                print(
                    f"stopped by signal {stop.signum} after epoch {epoch}; continue with "
                    f"--resume auto --run-dir {run_dir}",
                    file=sys.stderr,
                )
                return stop.exit_code
            if stopping:
                print(f"early stop: no better val mIoU for {args.early_stop} epochs (best {best_miou:.4f})")
                break
    if history:
        save_figure(curves_figure(history), run_dir / "curves.png")
        hparams = {k: str(v) if isinstance(v, (Path, tuple, list)) or v is None else v for k, v in vars(args).items()}
        writer.add_hparams(hparams, {"hparam/best_miou": best_miou}, run_name="hparams")
    writer.close()
    print(
        f"\nbest val mIoU {best_miou:.4f}\n"
        f"TensorBoard logs: {run_dir}\ncheckpoints: {ckpt_dir} (best.pt, last.pt)\n"
        f"sample images: {run_dir / 'samples'}\ncurves: {run_dir / 'curves.png'}\nnext:\n"
        f"  tensorboard --logdir {run_dir.parent}\n"
        f"  python inference.py --input_dir {val_set.images_dir} --checkpoint {ckpt_dir / 'best.pt'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
