"""bench.py's training part: images/s of one training step for the naive fp32 NCHW eager step, the default path
and torch.compile, against the measured matrix-multiply ceilings (FLOPs counted with FlopCounterMode)."""

from __future__ import annotations

import logging

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.measure import isolated, matmul_gflops, peak_memory_mb, timer
from engine import train_step
from losses import build_loss
from model import ResidualAttnUNet
from model_setup import fastest_training_step
from optimizer import build_optimizer
from tuning import Candidate, candidates
from utils import Runtime, keep_freed_cpu_memory, resolve_precision

log = logging.getLogger(__name__)


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


def default_choice(args, device: torch.device) -> Candidate:
    """What train.py's start-up chooses for this model, batch and size here: the same timed steps (in a fresh
    process, as train.py's are in its own), model_setup.fastest_training_step."""
    keep_freed_cpu_memory(device)  # as train.py runs
    runtime = Runtime.from_flags(device.type, "auto", None)
    config = dict(in_channels=3, num_classes=args.classes, widths=args.widths)
    choices = candidates(runtime, "auto", None)
    return fastest_training_step(
        runtime, choices, config, lambda: build_loss("ce"), args.batch_size, args.image_size
    ).chosen


def report_training(args, device: torch.device) -> None:
    native = resolve_precision("auto", device) == "bf16"
    ceilings = {"fp32": matmul_gflops(torch.float32, device)}
    # Where bf16 is emulated (a CPU without AVX-512 BF16 or AMX) one 2048^3 product takes minutes; no row uses it.
    ceilings["bf16"] = ceilings["fp16"] = matmul_gflops(torch.bfloat16, device) if native else None
    flops = training_flops_per_image(args, device)
    bf16 = f"{ceilings['bf16']:.0f} GFLOP/s" if ceilings["bf16"] else "not native here (not measured)"
    log.info(
        f"matmul ceilings: fp32 {ceilings['fp32']:.0f} GFLOP/s, bf16 {bf16}; "
        f"training step: {flops / 1e9:.1f} GFLOP per image\n"
    )
    chosen = isolated(default_choice, args, device)
    default = Runtime(device, chosen.precision, chosen.channels_last)
    baseline = Runtime(device, "fp32", channels_last=False)
    rows = [("fp32 NCHW eager (baseline)", baseline, False, False, False)]
    if device.type == "cpu":
        rows.append(("baseline + freed memory kept", baseline, False, True, False))
    for candidate in candidates(default, "auto", None):  # every precision and layout start-up chooses among
        label = f"{'default: ' if candidate == chosen else ''}{candidate}"
        rows.append((label, Runtime(device, candidate.precision, candidate.channels_last), False, True, False))
    rows.append(("default + --grad-checkpoint", default, False, True, True))
    if not args.skip_compile:
        rows.append((f"--compile: {chosen}", default, True, True, False))
    memory = "peak GPU MB" if device.type == "cuda" else "peak RSS MB"
    log.info(f"{'training':<34} {'images/s':>9} {'GFLOP/s':>9} {'of ceiling':>11} {'speed-up':>9} {memory:>12}")
    baseline_speed = None
    for label, runtime, compile_model, keep_memory, grad_checkpoint in rows:
        if args.rows and not any(word in label for word in args.rows.split(",")):
            continue
        result = isolated(bench_training, args, runtime, compile_model, keep_memory, grad_checkpoint)
        baseline_speed = baseline_speed or result["images_per_s"]
        achieved = result["images_per_s"] * flops / 1e9
        extra = f"  (first step, compile included: {result['first_step_s']:.1f} s)" if compile_model else ""
        log.info(
            f"{label:<34} {result['images_per_s']:>9.2f} {achieved:>9.0f} "
            f"{achieved / ceilings[runtime.precision]:>10.0%} {result['images_per_s'] / baseline_speed:>8.2f}x "
            f"{result['peak_mb']:>12.0f}{extra}"
        )
