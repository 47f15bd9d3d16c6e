"""bench.py's inference and onnx parts: images/s over a folder for a naive per-image loop and for inference.py
(PyTorch fp32 and default precision, onnxruntime), each pass timed in a fresh process."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from benchmarks.data import write_checkpoint
from benchmarks.measure import isolated, timer
from checkpoints import inference_network, load_checkpoint
from intensity import IMAGENET_MEAN, IMAGENET_STD
from listing import list_images
from model import ResidualAttnUNet
from onnx_model import export_metadata, export_network
from predictions import Outputs, segment_folder
from predictor import Predictor
from utils import Runtime, keep_freed_cpu_memory, resolve_precision

log = logging.getLogger(__name__)


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
    log.info(f"\n{title:<34} {'images/s':>9} {'speed-up':>9}")
    first = next(iter(speeds.values()))
    for label, speed in speeds.items():
        log.info(f"{label:<34} {speed:>9.2f} {speed / first:>8.2f}x")


def report_folder(args, device: torch.device, root: Path, images: Path, parts: set[str]) -> None:
    """The inference part (a naive loop against inference.py) and, on the CPU, the onnx part."""
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
