"""The numbers in the README: training and inference throughput against what the hardware allows.

All rows come from one run, so their ratios hold on a noisy machine: measured fp32 and bf16
matrix-multiply ceilings, training images/s and achieved GFLOP/s (counted with FlopCounterMode)
for the naive fp32 NCHW eager step, the default fast path and torch.compile, inference over a
folder for a naive per-image loop and for inference.py (PyTorch fp32 and default precision, and
onnxruntime on the CPU), its peak memory on four 24-megapixel photos, and the data loader's time per stage
and images/s per worker process on COCO-sized JPEGs.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode
from torchvision.transforms.v2 import functional as TF

from bench_data import LOADER_PHOTOS, write_checkpoint, write_loader_data
from bench_large import LARGE_CLASSES, large_rows
from bench_loader import LOADER_PIPELINES, STAGES, loader_pair
from bench_measure import isolated, matmul_gflops, peak_memory_mb, timer
from bench_scale import SCALE_CLASSES, SCALE_DISTINCT, SCALE_PHOTO, scale_rows, write_scale_data
from checkpoints import inference_network, load_checkpoint
from cli import (
    ArgumentParser,
    add_device_flag,
    image_size_type,
    non_negative_int,
    positive_int,
    positive_int_upto,
    size_type,
    widths_type,
)
from demo import make_demo_data
from engine import train_step
from image_io import list_images
from intensity import IMAGENET_MEAN, IMAGENET_STD
from losses import build_loss
from model import ResidualAttnUNet
from onnx_model import export_metadata, export_network
from optimizer import build_optimizer
from predictions import Outputs, segment_folder
from predictor import Predictor
from presets import REFERENCE_WIDTHS
from utils import Runtime, keep_freed_cpu_memory, resolve_device, resolve_precision


def get_args_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument(
        "--widths", type=widths_type, default=REFERENCE_WIDTHS, help="encoder widths (default: the reference design's)"
    )
    p.add_argument("--image-size", type=image_size_type, default=256)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--classes", type=positive_int_upto(255), default=10)
    p.add_argument("--steps", type=positive_int, default=4, help="timed training steps per row")
    p.add_argument("--warmup", type=non_negative_int, default=1, help="untimed steps before each row")
    p.add_argument("--images", type=positive_int, default=64, help="images in the inference and loader folder")
    add_device_flag(p)
    p.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile row")
    p.add_argument("--rows", default="", help="comma-separated words: only the training rows whose label has one")
    p.add_argument(
        "--parts",
        default="training,inference,onnx,large,loader,scale",
        help="comma-separated parts to run (onnx: CPU only)",
    )
    p.add_argument("--large-count", type=positive_int, default=4, help="large: how many photos")
    p.add_argument("--large-size", type=size_type, default=(6000, 4000), help="large: photo WIDTHxHEIGHT")
    p.add_argument("--scale-train", type=positive_int, default=5000, help="scale: training image/mask pairs")
    p.add_argument("--scale-val", type=positive_int, default=2000, help="scale: validation image/mask pairs")
    p.add_argument(
        "--scale-coco", type=non_negative_int, default=5000, help="scale: images prepare_masks.py renders (0: none)"
    )
    return p


def training_flops_per_image(args, device) -> float:
    """Forward + backward FLOPs of one image, counted by PyTorch's own FlopCounterMode."""
    model = ResidualAttnUNet(3, args.classes, args.widths).to(device)
    images = torch.randn(1, 3, args.image_size, args.image_size, device=device)
    with FlopCounterMode(display=False) as counter:
        model(images).sum().backward()
    return counter.get_total_flops()


def bench_training(args, runtime: Runtime, compile_model: bool, keep_memory: bool, grad_checkpoint: bool) -> dict:
    torch.manual_seed(0)
    device = runtime.device
    if keep_memory:
        keep_freed_cpu_memory(device)
    model = ResidualAttnUNet(3, args.classes, args.widths).to(device, memory_format=runtime.memory_format)
    model.grad_checkpoint = grad_checkpoint
    parts = {"loss_fn": build_loss("ce"), "optimizer": build_optimizer(model, 1e-4, device)}
    parts.update(scaler=runtime.grad_scaler(), runtime=runtime)
    step_model = torch.compile(model) if compile_model else model
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    images = images.contiguous(memory_format=runtime.memory_format)
    masks = torch.randint(0, args.classes, (args.batch_size, args.image_size, args.image_size), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    first = {}
    with timer(device, first):
        train_step(step_model, images, masks, **parts)
    for _ in range(args.warmup):
        train_step(step_model, images, masks, **parts)
    timing = {}
    with timer(device, timing):
        for _ in range(args.steps):
            loss = train_step(step_model, images, masks, **parts)
        loss.item()
    return {
        "images_per_s": args.batch_size * args.steps / timing["seconds"],
        "first_step_s": first["seconds"],
        "peak_mb": peak_memory_mb(device),
    }


def naive_inference(args, device, folder: Path, checkpoint: Path, output: Path) -> None:
    """The baseline: one image at a time, fp32, NCHW, decode and write in the same thread."""
    state = torch.load(checkpoint, weights_only=True)
    model = ResidualAttnUNet(**state["model_args"]).to(device).eval()
    model.load_state_dict(state["model"])
    output.mkdir(parents=True, exist_ok=True)
    for path in sorted(folder.glob("*.jpg")):
        image = Image.open(path).convert("RGB")
        x = TF.to_dtype(TF.pil_to_tensor(image.resize((args.image_size, args.image_size))), torch.float32, scale=True)
        x = TF.normalize(x, IMAGENET_MEAN, IMAGENET_STD)[None].to(device)
        with torch.no_grad():
            logits = F.interpolate(model(x), size=(image.height, image.width), mode="bilinear")
        Image.fromarray(logits.max(1).indices[0].byte().cpu().numpy()).save(output / f"{path.stem}.png")


def fast_inference(args, device, folder: Path, checkpoint: Path, output: Path, precision: str = "auto") -> None:
    """What inference.py runs with its defaults: batched, native bf16, channels_last, BatchNorm folded."""
    runtime = Runtime.from_flags(device.type, precision, channels_last=True)
    keep_freed_cpu_memory(runtime.device)
    predictor = Predictor.from_checkpoint(checkpoint, runtime)
    segment_folder(predictor, list_images(folder), folder, Outputs(output))


def fp32_inference(args, device, folder: Path, checkpoint: Path, output: Path) -> None:
    """inference.py --precision fp32."""
    fast_inference(args, device, folder, checkpoint, output, precision="fp32")


def onnx_inference(args, device, folder: Path, checkpoint: Path, output: Path) -> None:
    """inference.py --onnx: the same pre- and post-processing, onnxruntime's CPU provider running the network."""
    predictor = Predictor.from_onnx(checkpoint.with_suffix(".onnx"))
    segment_folder(predictor, list_images(folder), folder, Outputs(output))


def timed_inference(run, args, device, folders: dict[str, Path], checkpoint: Path) -> float:
    """Seconds for one pass over the folder, in a process that has already done a pass over one batch."""
    run(args, device, folders["warm-up"], checkpoint, folders["output"] / f"{run.__name__}-warm-up")
    timing = {}
    with timer(device, timing):
        run(args, device, folders["images"], checkpoint, folders["output"] / run.__name__)
    return timing["seconds"]


def bench_inference(args, device, root: Path, images: Path, runs: dict) -> dict:
    """Demo-style JPEGs at 1.25x the model's size, so every path resizes as real inference would.
    runs: row label -> function(args, device, folder, checkpoint, output); each timed in a fresh process."""
    files = sorted(images.glob("*.jpg"))
    checkpoint = root / "bench.pt"
    if not checkpoint.exists():
        write_checkpoint(checkpoint, classes=args.classes, widths=args.widths, image_size=args.image_size)
    folders = {"images": images, "warm-up": root / "warm-up", "output": root / "predictions"}
    folders["warm-up"].mkdir(exist_ok=True)
    for path in files[: args.batch_size]:  # a full batch: oneDNN prepares its kernels per shape
        shutil.copy(path, folders["warm-up"])
    if onnx_inference in runs.values():
        state = load_checkpoint(checkpoint)
        model = inference_network(state, checkpoint)
        export_network(model, checkpoint.with_suffix(".onnx"), metadata=export_metadata(state))
    return {
        label: len(files) / isolated(timed_inference, run, args, device, folders, checkpoint)
        for label, run in runs.items()
    }


def report_inference(speeds: dict, title: str) -> None:
    """Rows of images/s, each against the first."""
    print(f"\n{title:<34} {'images/s':>9} {'speed-up':>9}")
    first = next(iter(speeds.values()))
    for label, speed in speeds.items():
        print(f"{label:<34} {speed:>9.2f} {speed / first:>8.2f}x")


def bench_large_images(args, device: torch.device, root: Path) -> None:
    width, height = args.large_size
    size = dict(count=args.large_count, size=args.large_size, widths=args.widths, crop=args.image_size)
    precision, ceiling, rows = large_rows(root, device, **size)
    title = f"{args.large_count} photos {width}x{height}, {LARGE_CLASSES} classes, crop-trained at {args.image_size} px"
    print(f"\n{title}")
    print(f"{'':<56} {'s/image':>8} {'images/s':>9} {'passes':>7} {'GFLOP/s':>8} {'of ' + precision:>8} {'peak MB':>8}")
    for label, row in rows.items():
        print(
            f"{label:<56} {row['seconds']:>8.2f} {1 / row['seconds']:>9.3f} {row['passes']:>7} {row['gflops']:>8.1f} "
            f"{row['gflops'] / ceiling:>8.0%} {row['peak_mb']:>8.0f}"
        )


def bench_loader(args, device: torch.device, root: Path) -> None:
    images, masks = write_loader_data(root)
    width, height = LOADER_PHOTOS["size"]
    print(f"\ndata loader: {LOADER_PHOTOS['count']} JPEGs {width}x{height} -> {args.image_size} px, ms per image")
    columns = [*STAGES, "images/s", "1 worker", f"colour on {device.type}"]
    print(f"{'augment':<40}" + "".join(f"{column:>19}" for column in columns))
    for augment in ("none", "basic", "strong"):
        for pipeline in LOADER_PIPELINES:
            rows = isolated(loader_pair, images, masks, args.image_size, augment, pipeline, str(device))
            for name, result in rows.items():
                row = "".join(f"{result['ms'][stage]:>19.2f}" for stage in STAGES)
                row += f"{result['images_per_s']:>19.1f}{result['worker_images_per_s']:>19.1f}"
                on_device = f"{result['device_ms']:>19.2f}" if "device_ms" in result else ""
                label = f"{augment}, {pipeline}" + (", torchvision" if name == "torchvision" else "")
                print(f"{label:<40}{row}{on_device}")
            rates = ("images_per_s", "worker_images_per_s")
            speedups = [rows["ours"][rate] / rows["torchvision"][rate] for rate in rates]
            print(f"{'':<40}ours vs torchvision: {speedups[0]:.2f}x in one process, {speedups[1]:.2f}x with one worker")


def bench_scale(args, root: Path) -> None:
    """The reference design's workload shape: start-up at its size, validation's share of an epoch, COCO masks."""
    started = time.perf_counter()
    write_scale_data(root, args.scale_train, args.scale_val)
    made = time.perf_counter() - started
    masks = args.scale_train + args.scale_val
    width, height = SCALE_PHOTO
    print(
        f"\nscale: {args.scale_train} training and {args.scale_val} validation pairs ({width}x{height} JPEG + "
        f"{SCALE_CLASSES}-class PNG; hard links to {SCALE_DISTINCT} distinct files, made in {made:.0f} s)"
    )
    rows = scale_rows(root, isolated, val_images=args.scale_val, coco_images=min(args.scale_coco, args.scale_train))
    print(f"{'train.py start-up':<30} {'label scan s':>13} {'masks/s':>9} {'first step s':>13} {'peak RSS MB':>12}")
    for label in ("first", "cached"):
        row = rows[label]
        rate = masks / row["scan_seconds"]
        print(
            f"{label + (' (no caches)' if label == 'first' else ''):<30} {row['scan_seconds']:>13.1f} {rate:>9.0f} "
            f"{row['first_step_seconds']:>13.1f} {row['startup_rss_mb']:>12.0f}"
        )
    share, first = rows["share"], rows["first"]
    print(
        f"an epoch with the defaults: {first['epoch_crops']} crops at {first['crop_seconds']:.3f} s "
        f"({share['training_s']:.0f} s), {args.scale_val} validation images at {first['image_seconds']:.3f} s "
        f"({share['validation_s']:.0f} s): validation is {share['every_epoch']:.0%} of the run validating every "
        f"epoch, {share['auto']:.0%} with --val-every auto (every {share['auto_every']} epochs)"
    )
    if "coco" in rows:
        coco = rows["coco"]
        print(
            f"prepare_masks.py: {coco['written']} masks in {coco['seconds']:.1f} s "
            f"({coco['written'] / coco['seconds']:.0f} images/s), peak RSS {coco['peak_rss_mb']:.0f} MB"
        )


def report_training(args, device: torch.device) -> None:
    fast_precision = resolve_precision("auto", device)
    ceilings = {"fp32": matmul_gflops(torch.float32, device)}
    # Where bf16 is emulated (a CPU without AVX-512 BF16 or AMX) one 2048^3 product takes minutes; no row uses it.
    ceilings["bf16"] = ceilings["fp16"] = matmul_gflops(torch.bfloat16, device) if fast_precision != "fp32" else None
    flops = training_flops_per_image(args, device)
    bf16 = f"{ceilings['bf16']:.0f} GFLOP/s" if ceilings["bf16"] else "not native here (not measured)"
    print(
        f"matmul ceilings: fp32 {ceilings['fp32']:.0f} GFLOP/s, bf16 {bf16}; "
        f"training step: {flops / 1e9:.1f} GFLOP per image\n"
    )
    baseline, fast = Runtime(device, "fp32", channels_last=False), Runtime(device, fast_precision, channels_last=True)
    rows = [("fp32 NCHW eager (baseline)", baseline, False, False, False)]
    if device.type == "cpu":
        rows.append(("baseline + freed memory kept", baseline, False, True, False))
    rows.append((f"default: {fast_precision} channels_last", fast, False, True, False))
    rows.append(("default + --grad-checkpoint", fast, False, True, True))
    if not args.skip_compile:
        rows.append((f"--compile: {fast_precision} channels_last", fast, True, True, False))
    memory = "peak GPU MB" if device.type == "cuda" else "peak RSS MB"
    print(f"{'training':<34} {'images/s':>9} {'GFLOP/s':>9} {'of ceiling':>11} {'speed-up':>9} {memory:>12}")
    baseline_speed = None
    for label, runtime, compile_model, keep_memory, grad_checkpoint in rows:
        if args.rows and not any(word in label for word in args.rows.split(",")):
            continue
        result = isolated(bench_training, args, runtime, compile_model, keep_memory, grad_checkpoint)
        baseline_speed = baseline_speed or result["images_per_s"]
        achieved = result["images_per_s"] * flops / 1e9
        extra = f"  (first step, compile included: {result['first_step_s']:.1f} s)" if compile_model else ""
        print(
            f"{label:<34} {result['images_per_s']:>9.2f} {achieved:>9.0f} "
            f"{achieved / ceilings[runtime.precision]:>10.0%} {result['images_per_s'] / baseline_speed:>8.2f}x "
            f"{result['peak_mb']:>12.0f}{extra}"
        )


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    parts = set(args.parts.split(","))
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(
        f"device: {device.type} ({name}); widths {','.join(map(str, args.widths))}, {args.image_size} px, "
        f"batch {args.batch_size}, {args.steps} timed steps; torch {torch.__version__}"
    )
    if "training" in parts:
        report_training(args, device)
    root = Path(tempfile.mkdtemp(prefix="bench-"))
    try:
        data = make_demo_data(root / "data", num_train=args.images, num_val=1, size=int(args.image_size * 1.25))
        images = data / "images" / "train"
        if "inference" in parts:
            runs = {"naive per-image fp32 loop": naive_inference, "inference.py (batched, workers)": fast_inference}
            report_inference(bench_inference(args, device, root, images, runs), "inference over a folder")
        if "onnx" in parts and device.type == "cpu":
            runs = {
                "PyTorch fp32": fp32_inference,
                f"PyTorch {resolve_precision('auto', device)} (default)": fast_inference,
                "onnxruntime fp32 (--onnx)": onnx_inference,
            }
            report_inference(bench_inference(args, device, root, images, runs), "inference.py on the CPU")
        if "large" in parts:
            bench_large_images(args, device, root)
        if "loader" in parts:
            bench_loader(args, device, root)
        if "scale" in parts:
            bench_scale(args, root / "scale")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
