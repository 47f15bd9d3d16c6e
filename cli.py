"""Command-line plumbing every script shares: one-line errors, checked argument types, the hardware flags."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from utils import UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error instead of the usage dump: the mistake is the whole message."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def run_cli(main: Callable[[], int | None]) -> int:
    """Run a script's main(); user mistakes become one line on stderr and exit status 2."""
    try:
        return main() or 0
    except (UserError, FileNotFoundError, FileExistsError, NotADirectoryError) as err:
        message = str(err).strip()
        if "Original Traceback" in message:  # re-raised from a DataLoader worker: keep its last line
            message = message.splitlines()[-1].split(": ", 1)[-1]
        print(f"error: {message}", file=sys.stderr)
        return 2


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


def add_device_flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto")


def add_hardware_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--device, --precision and --channels-last, the same in train.py and inference.py."""
    add_device_flag(parser)
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16", "fp16"),
        default="auto",
        help="auto: bf16 on GPUs and CPUs with native bf16, fp32 elsewhere",
    )
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="NHWC memory format (faster convolutions on CPU and CUDA)",
    )
