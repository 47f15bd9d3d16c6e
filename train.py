"""Train the residual self-attention U-Net: flags -> data, model, optimiser -> the epoch loop.

With no data flags it builds the demo dataset under data/demo (--demo-style texture: data/demo-texture)
and trains on that.
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
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from coco import MODES, prepare_masks
from dataset import (
    DEMO_STYLES,
    IGNORE_INDEX,
    DistributedWeightedSampler,
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
    Distributed,
    UserError,
    autocast,
    init_distributed,
    init_worker,
    keep_freed_cpu_memory,
    load_checkpoint,
    resolve_precision,
    run_cli,
    save_checkpoint,
    seed_everything,
)

DEMO_ROOTS = {"colour": Path("data/demo"), "texture": Path("data/demo-texture")}
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
    data = p.add_argument_group("data (none given: the built-in demo under data/demo or data/demo-texture)")
    data.add_argument(
        "--demo-style",
        choices=DEMO_STYLES,
        default="colour",
        help="the demo's classes differ in colour and texture, or (texture) in texture and outline only: harder, "
        "a small slice overfits",
    )
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
    model.add_argument("--loss", choices=LOSSES, default="ce", help="weighted_ce: class weights from mask statistics")
    model.add_argument("--dice-weight", type=float, default=1.0, help="weight of the Dice term of dice_ce")
    model.add_argument("--ce-weight", type=float, default=1.0, help="weight of the cross-entropy term of dice_ce")
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
    run.add_argument(
        "--sync-bn", action="store_true", help="under torchrun on GPUs: BatchNorm statistics over all ranks"
    )
    run.add_argument(
        "--dist-timeout",
        type=positive_int,
        default=600,
        help="seconds a rank waits for the others before the job fails (torchrun)",
    )
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
    if "demo_style" in given and not args.demo:
        raise UserError("--demo-style chooses the built-in demo; it does not apply with data flags")
    if args.demo and checkpoint is None:
        for name, value in DEMO_SETTINGS.items():
            if name not in given:
                setattr(args, name, value)
    if args.run_dir is None:
        name = DEMO_ROOTS[args.demo_style].name if args.demo else (args.data_root or args.train_images).resolve().name
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
    root = DEMO_ROOTS[args.demo_style] if args.demo else args.data_root
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


def build_loaders(args, train_set, val_set, device, ddp: Distributed) -> tuple[DataLoader, DataLoader]:
    """Weighted or uniform sampling fixed by (seed, epoch); under DDP each rank takes its own share.

    Validation is split into disjoint shards (no padding), so the all-reduced confusion matrix
    counts every validation image exactly once.
    """
    generator = torch.Generator()
    if ddp.world_size > 1 and args.sampler == "weighted":
        sampler = DistributedWeightedSampler(train_set.sample_weights(), ddp.world_size, ddp.rank, args.seed)
    elif ddp.world_size > 1:
        sampler = DistributedSampler(train_set, ddp.world_size, ddp.rank, shuffle=True, seed=args.seed)
    elif args.sampler == "weighted":
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
        sampler=EpochSampler(sampler, args.seed, generator, ddp.rank),
        drop_last=True,
        **loader_options,
    )
    val_shard = range(ddp.rank, len(val_set), ddp.world_size)
    val_loader = DataLoader(
        SkipBadSamples(val_set, args.strict, replace=False), args.batch_size, sampler=val_shard, **loader_options
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

    def agreed(self, ddp: Distributed, device: torch.device) -> bool:
        """Under DDP every rank stops after the same step, or one would wait for the others for ever."""
        if not ddp.enabled:
            return self.requested
        flag = torch.tensor(float(self.requested), device=device)
        ddp.all_reduce_sum(flag)
        if flag.item() and self.signum is None:
            self.signum = signal.SIGTERM
        return bool(flag.item())

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)


class NonFiniteLoss(RuntimeError):
    pass


def train_step(model, images, masks, loss_fn, optimizer, scaler, device, precision) -> torch.Tensor:
    """Forward in the chosen precision, loss in fp32, backward, update; the loss stays on the device."""
    with autocast(device, precision):
        logits = model(images)
    loss = loss_fn(logits, masks)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


def train_one_epoch(
    model,
    loader,
    loss_fn,
    optimizer,
    scaler,
    device,
    precision,
    memory_format,
    epoch: int,
    stop: GracefulStop,
    ddp: Distributed = Distributed(),
    time_first_step: bool = False,
) -> tuple[float, list[str]]:
    """One pass over the sampler; returns the mean loss and the bad samples that were skipped.

    time_first_step: say how long the first step took, which with --compile holds the compilation.
    """
    model.train()
    total_loss = torch.zeros((), device=device)
    first_bad_step = torch.zeros((), dtype=torch.long, device=device)
    skipped: list[str] = []
    steps = 0
    bar = tqdm(loader, desc=f"epoch {epoch} train", leave=False, dynamic_ncols=True, disable=not ddp.is_main)
    for steps, (images, masks, skipped_here) in enumerate(bar, 1):
        skipped.extend(line for s in skipped_here for line in s.splitlines())
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        masks = masks.to(device, non_blocking=True)
        step_started = time.perf_counter()
        loss = train_step(model, images, masks, loss_fn, optimizer, scaler, device, precision)
        if time_first_step and steps == 1 and ddp.is_main:
            loss.item()  # waits for the step: once per run
            tqdm.write(f"first step, torch.compile included: {time.perf_counter() - step_started:.1f} s")
        # Recorded on the device and read at log points only: no host sync per step.
        first_bad_step = torch.where((first_bad_step == 0) & ~torch.isfinite(loss), steps, first_bad_step)
        total_loss += loss
        if steps % 10 == 0 or steps == len(loader) or stop.requested:
            if first_bad_step.item():
                raise NonFiniteLoss(f"non-finite loss at epoch {epoch}, step {first_bad_step.item()}")
            bar.set_postfix(loss=f"{total_loss.item() / steps:.4f}")  # a host sync point
        if stop.agreed(ddp, device):
            break
    return total_loss.item() / max(steps, 1), skipped


@torch.inference_mode()
def evaluate(
    model,
    loader,
    loss_fn,
    num_classes: int,
    device,
    precision,
    memory_format,
    epoch: int,
    ddp: Distributed = Distributed(),
):
    """Loss and confusion matrix over the whole validation set (all ranks), a first batch, bad files."""
    model.eval()
    matrix = ConfusionMatrix(num_classes, device=device)
    total_loss = torch.zeros((), device=device)
    total_pixels = torch.zeros((), device=device)
    first_batch, skipped = None, []
    bar = tqdm(loader, desc=f"epoch {epoch} val", leave=False, dynamic_ncols=True, disable=not ddp.is_main)
    for images, masks, skipped_here in bar:
        skipped.extend(line for s in skipped_here for line in s.splitlines())
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        masks = masks.to(device, non_blocking=True)
        with autocast(device, precision):
            logits = model(images)
        # Weighted by labelled pixels, so the loss is over the set, and an all-ignore batch adds nothing.
        pixels = (masks != IGNORE_INDEX).sum()
        total_loss += torch.where(pixels > 0, loss_fn(logits, masks) * pixels, 0.0)
        total_pixels += pixels
        preds = logits.max(1).indices  # same as argmax(1), which is ~15x slower on CPUs
        matrix.update(preds, masks)
        if first_batch is None:
            first_batch = (images[:PANEL_SAMPLES].cpu(), masks[:PANEL_SAMPLES].cpu(), preds[:PANEL_SAMPLES].cpu())
    matrix.reduce()
    ddp.all_reduce_sum(total_loss)
    ddp.all_reduce_sum(total_pixels)
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


class Reporter:
    """Everything a run leaves behind: console, TensorBoard, checkpoints, figures. Rank 0 only."""

    def __init__(self, run_dir: Path, active: bool, purge_step: int | None):
        self.run_dir, self.active = run_dir, active
        self.checkpoints = run_dir / "checkpoints"
        self.writer = SummaryWriter(str(run_dir), purge_step=purge_step) if active else None

    def print(self, *args, **kwargs) -> None:
        if self.active:
            print(*args, **kwargs)

    def epoch(
        self, epoch: int, epochs: int, record: dict, metrics: dict, class_names: list[str], seconds: float, skipped: str
    ) -> None:
        if not self.active:
            return
        for tag, key in (
            ("loss/train", "train_loss"),
            ("loss/val", "val_loss"),
            ("val/miou", "miou"),
            ("val/mdice", "mdice"),
            ("val/pixel_acc", "pixel_acc"),
            ("lr", "lr"),
        ):
            self.writer.add_scalar(tag, record[key], epoch)
        for name, iou in zip(class_names, metrics["iou"].tolist()):
            self.writer.add_scalar(f"iou/{name}", iou, epoch)
        print(
            f"epoch {epoch}/{epochs}  train loss {record['train_loss']:.4f}  val loss {record['val_loss']:.4f}  "
            f"mIoU {record['miou']:.4f}  mDice {record['mdice']:.4f}  pixel acc {record['pixel_acc']:.4f}  "
            f"lr {record['lr']:.2e}  {seconds:.1f}s" + skipped
        )

    def save(self, state: dict, improved: bool, numbered: bool) -> None:
        if not self.active:
            return
        save_checkpoint(state, self.checkpoints / "last.pt")
        if improved:
            save_checkpoint(state, self.checkpoints / "best.pt")
        if numbered:
            save_checkpoint(state, self.checkpoints / f"epoch_{state['epoch']:03d}.pt")

    def figures(self, epoch: int, first_batch, matrix: ConfusionMatrix, class_names: list[str]) -> None:
        """The sample panel and confusion matrix, as PNGs under samples/ and in TensorBoard."""
        if not self.active:
            return
        (self.run_dir / "samples").mkdir(parents=True, exist_ok=True)
        for tag, fig in (
            ("samples", sample_panel(*first_batch, class_names)),
            ("confusion_matrix", confusion_matrix_figure(matrix.matrix, class_names)),
        ):
            fig.savefig(self.run_dir / "samples" / f"{tag}_epoch_{epoch:03d}.png", dpi=100)
            self.writer.add_figure(tag, fig, epoch)  # also closes the figure

    def finish(self, history: list[dict], args: argparse.Namespace, best_miou: float, val_images: Path) -> None:
        if not self.active:
            return
        if history:
            save_figure(curves_figure(history), self.run_dir / "curves.png")
            hparams = {
                k: str(v) if isinstance(v, (Path, tuple, list)) or v is None else v for k, v in vars(args).items()
            }
            self.writer.add_hparams(hparams, {"hparam/best_miou": best_miou}, run_name="hparams")
        self.writer.close()
        print(
            f"\nbest val mIoU {best_miou:.4f}\n"
            f"TensorBoard logs: {self.run_dir}\ncheckpoints: {self.checkpoints} (best.pt, last.pt)\n"
            f"sample images: {self.run_dir / 'samples'}\ncurves: {self.run_dir / 'curves.png'}\nnext:\n"
            f"  tensorboard --logdir {self.run_dir.parent}\n"
            f"  python inference.py --input_dir {val_images} --checkpoint {self.checkpoints / 'best.pt'}"
        )

    def stopped(self, stop: GracefulStop, when: str) -> int:
        """Say how to continue after SIGINT/SIGTERM; returns the exit status (130 or 143)."""
        self.print(
            f"stopped by {signal.Signals(stop.signum).name} {when}; "
            f"continue with --resume auto --run-dir {self.run_dir}",
            file=sys.stderr,
        )
        if self.writer is not None:
            self.writer.close()
        return stop.exit_code


def prepare_data(args, checkpoint: dict | None, ddp: Distributed) -> tuple[SegmentationFolder, SegmentationFolder]:
    """Rank 0 builds the demo, renders COCO masks and scans labels first; the others then read its caches."""
    mapping = LabelMapping.from_dict(checkpoint["mapping"]) if checkpoint else None
    for turn in ("main", "others"):
        if (turn == "main") == ddp.is_main:
            if args.demo:
                make_demo_data(DEMO_ROOTS[args.demo_style], **DEMO_IMAGES, style=args.demo_style)
            datasets = build_datasets(args, mapping)
        ddp.barrier()
    return datasets


def build_model(args, num_classes: int, device: torch.device, ddp: Distributed):
    """The model to save (plain) and the one to step (compiled and/or DDP-wrapped)."""
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = ResidualAttnUNet(3, num_classes, args.widths, args.dropout)
    if args.sync_bn:
        if device.type != "cuda" or not ddp.enabled:
            raise UserError("--sync-bn needs a torchrun job on CUDA GPUs (SyncBatchNorm does not run on the CPU)")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device, memory_format=memory_format)
    step_model = torch.compile(model) if args.compile else model
    if ddp.enabled:
        step_model = DistributedDataParallel(step_model, device_ids=[device.index] if device.type == "cuda" else None)
    return model, step_model, memory_format


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(message)s", level=logging.INFO)
    args, checkpoint = parse_args(argv)
    ddp, device = init_distributed(args.device, args.dist_timeout)
    try:
        return train(args, checkpoint, ddp, device)
    finally:
        if ddp.enabled:
            dist.destroy_process_group()


def train(args: argparse.Namespace, checkpoint: dict | None, ddp: Distributed, device: torch.device) -> int:
    args.run_dir = ddp.broadcast(args.run_dir)  # a timestamped name must be the same on every rank
    if not ddp.is_main:
        logging.getLogger().setLevel(logging.ERROR)
    precision = resolve_precision(args.precision, device)
    keep_freed_cpu_memory(device)
    seed_everything(args.seed)
    if args.demo and ddp.is_main:
        print(
            f"demo run: data {DEMO_ROOTS[args.demo_style]} ({DEMO_IMAGES['num_train']} train, "
            f"{DEMO_IMAGES['num_val']} val images), "
            f"image size {args.image_size}, widths {','.join(map(str, args.widths))}, {args.epochs} epochs, "
            f"batch {args.batch_size}"
        )
    train_set, val_set = prepare_data(args, checkpoint, ddp)
    mapping, class_names = train_set.mapping, train_set.mapping.names
    train_loader, val_loader = build_loaders(args, train_set, val_set, device, ddp)
    model, step_model, memory_format = build_model(args, mapping.num_classes, device, ddp)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, fused=device.type in ("cuda", "cpu"))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    loss_fn = build_loss(
        args.loss, train_set.class_weights.to(device), dice_weight=args.dice_weight, ce_weight=args.ce_weight
    ).to(device)
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
    report = Reporter(args.run_dir, ddp.is_main, purge_step=start_epoch + 1 if checkpoint else None)
    if checkpoint:
        report.print(f"resumed from {checkpoint['path']} at epoch {start_epoch}")
    report.print(
        f"{len(train_set)} training and {len(val_set)} validation images, {mapping.num_classes} classes "
        f"({', '.join(class_names)}); {count_parameters(model) / 1e6:.2f} M parameters; "
        f"{device.type}, {precision}, {'channels_last' if args.channels_last else 'NCHW'}"
        + (f"; {ddp.world_size} processes, batch {args.batch_size} each" if ddp.enabled else "")
    )
    last = report.checkpoints / "last.pt"
    epochs_without_gain = 0
    with GracefulStop() as stop:
        for epoch in range(start_epoch + 1, args.epochs + 1):
            started = time.time()
            train_loader.sampler.set_epoch(epoch)
            lr = optimizer.param_groups[0]["lr"]
            try:
                train_loss, skipped = train_one_epoch(
                    step_model,
                    train_loader,
                    loss_fn,
                    optimizer,
                    scaler,
                    device,
                    precision,
                    memory_format,
                    epoch,
                    stop,
                    ddp,
                    time_first_step=args.compile and epoch == start_epoch + 1,
                )
            except NonFiniteLoss as err:
                print(
                    f"error: {err}; stopped without saving. last good checkpoint: {last} "
                    f"(try a lower --lr or --precision fp32)",
                    file=sys.stderr,
                )
                return 1
            if stop.requested:
                saved = (
                    f"{last} holds epoch {epoch - 1}"
                    if epoch > start_epoch + 1 or checkpoint
                    else "no epoch had finished, nothing was saved"
                )
                return report.stopped(stop, f"during epoch {epoch}; {saved}")
            val_loss, matrix, first_batch, val_skipped = evaluate(
                model, val_loader, loss_fn, mapping.num_classes, device, precision, memory_format, epoch, ddp
            )
            scheduler.step()
            metrics = matrix.compute()
            record = {
                "epoch": epoch,
                "train_loss": train_loss,
                "val_loss": val_loss,
                "miou": metrics["miou"],
                "mdice": metrics["mdice"],
                "pixel_acc": metrics["pixel_acc"],
                "lr": lr,
            }
            history.append(record)
            improved = metrics["miou"] > best_miou
            best_miou = max(best_miou, metrics["miou"])
            epochs_without_gain = 0 if improved else epochs_without_gain + 1
            stopping = args.early_stop and epochs_without_gain >= args.early_stop
            numbered = epoch % args.save_every == 0 or epoch == args.epochs or stopping
            report.save(
                checkpoint_state(model, optimizer, scheduler, scaler, epoch, args, mapping, best_miou, history),
                improved,
                numbered,
            )
            if numbered:
                report.figures(epoch, first_batch, matrix, class_names)
            report.epoch(
                epoch,
                args.epochs,
                record,
                metrics,
                class_names,
                time.time() - started,
                skip_report(skipped, val_skipped),
            )
            if stop.requested:
                return report.stopped(stop, f"after epoch {epoch}")
            if stopping:
                report.print(f"early stop: no better val mIoU for {args.early_stop} epochs (best {best_miou:.4f})")
                break
    report.finish(history, args, best_miou, val_set.images_dir)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
