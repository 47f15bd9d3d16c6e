"""Command-line plumbing every script shares: one-line errors, checked argument types, the hardware flags."""

from __future__ import annotations

import argparse
import codecs
import logging
import math
import sys
from collections.abc import Callable

from tqdm import tqdm

from errors import UserError, one_line
from image_io import MAX_MASK_VALUE

log = logging.getLogger(__name__)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error instead of the usage dump, and one flag style for every script: each flag is
    documented in one spelling (--input_dir, --data-root) and typed in either (--input-dir, --data_root)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else [str(arg) for arg in args]
        ended = args.index("--") if "--" in args else len(args)  # after a bare --, every token is a value
        spelled = [self._known_spelling(arg) for arg in args[:ended]] + args[ended:]
        return super().parse_known_args(spelled, namespace)

    def _known_spelling(self, token: str) -> str:
        """--name or --name=value in the spelling this parser knows, where only the other one is typed."""
        name, equals, value = token.partition("=")
        if not name.startswith("--") or name in self._option_string_actions:
            return token
        for other in (name.replace("_", "-"), "--" + name[2:].replace("-", "_")):
            if other in self._option_string_actions:
                return other + equals + value
        return token


def _replace_unprintable(err: UnicodeEncodeError) -> tuple[bytes, int]:
    """Codec error handler: what the console cannot show prints as U+FFFD (or '?' where even that cannot be
    encoded). File names that are not valid UTF-8 reach Python as lone surrogates, which no console encodes.
    Returned as bytes: encoders accept only ASCII text from a handler."""
    try:
        mark = "\ufffd".encode(err.encoding)
    except (UnicodeError, LookupError):
        mark = b"?"
    return mark * (err.end - err.start), err.end


codecs.register_error("replace_unprintable", _replace_unprintable)


def printable_output() -> None:
    """Printing a path never fails: stdout and stderr replace what they cannot encode (the file is still read)."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace_unprintable")


class Console(logging.Handler):
    """The one voice of every script: a line per record, informational ones on stdout and warnings and errors on
    stderr (the streams looked up as each is written, so a caller's redirection holds), through tqdm.write so a
    progress bar on the console stays whole."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            tqdm.write(self.format(record), file=stream)
        except Exception:  # logging's own rule: a failing handler never breaks the program
            self.handleError(record)


def setup_logging() -> None:
    """Once per process (a second call changes nothing): the root logger says INFO and above through Console. Every
    module talks to the user with logging.getLogger(__name__); a non-main torchrun rank raises the level to ERROR."""
    root = logging.getLogger()
    if not any(isinstance(handler, Console) for handler in root.handlers):
        root.addHandler(Console())
        root.setLevel(logging.INFO)


def run_cli(main: Callable[[], int | None]) -> int:
    """Run a script's main(); user mistakes, and what the file system refuses (OSError: a link loop, a full disk),
    become one line on stderr and exit status 2."""
    printable_output()
    try:
        return main() or 0
    except (UserError, OSError) as err:
        message = str(err).strip()
        if "Original Traceback" in message:  # re-raised from a DataLoader worker: keep its last line
            message = message.splitlines()[-1].split(": ", 1)[-1]
        setup_logging()
        log.error("error: %s", one_line(message))
        return 2


MAX_WIDTH = 4096  # channels per level; wider is a typo, and would allocate without end
MAX_IN_CHANNELS = 1024  # hyperspectral cubes have a few hundred bands
MAX_IMAGE_SIZE = 8192  # px; larger is a typo for a square training size, and would allocate without end


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


def positive_int_upto(high: int) -> Callable[[str], int]:
    """An argparse type: a positive integer no larger than high."""

    def parse(text: str) -> int:
        value = positive_int(text)
        if value > high:
            raise argparse.ArgumentTypeError(f"{text!r} is larger than {high}")
        return value

    return parse


def int_in(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer from low to high, both included."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer from {low} to {high}")
        return value

    return parse


def float_in(low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False):
    """An argparse type: a finite number in the interval; low_open/high_open leave out that end."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (math.isfinite(value) and above and below):
            raise argparse.ArgumentTypeError(f"{text!r} is not a number in {interval}")
        return value

    return parse


def widths_type(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(part) for part in text.split(","))
    except ValueError:
        widths = ()
    if not widths or any(not 0 < w <= MAX_WIDTH for w in widths):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers from 1 to {MAX_WIDTH}, e.g. 64,128,256,512"
        )
    return widths


def size_type(text: str) -> tuple[int, int]:
    """WIDTHxHEIGHT in pixels, e.g. 6000x4000."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        width = height = 0
    if width <= 0 or height <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT in pixels, e.g. 6000x4000")
    return width, height


WORKERS_HELP = (
    "DataLoader worker processes; auto: none on the CPU, whose cores the training step already fills; on a GPU the "
    "cores this process may use, less one for the training loop, up to 8"
)


def auto_or(parse: Callable[[str], int], what: str) -> Callable[[str], int | str]:
    """An argparse type: the word auto (a choice made at run time), or what parse takes (what: its name in
    the error)."""

    def parse_or_auto(text: str) -> int | str:
        if text == "auto":
            return text
        try:
            return parse(text)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"{text!r} is not auto or {what}") from None

    return parse_or_auto


workers_type = auto_or(non_negative_int, "a whole number >= 0")  # auto: loaders.loader_workers
val_every_type = auto_or(positive_int, "a positive integer")  # auto: schedule.validation_interval
in_channels_type = auto_or(positive_int_upto(MAX_IN_CHANNELS), f"an integer from 1 to {MAX_IN_CHANNELS}")


def add_channel_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--convert-channels and --display-channel, the same in train.py and inference.py."""
    parser.add_argument(
        "--convert-channels",
        action="store_true",
        help="images whose channel count is not the model's are converted instead of refused: colour to grey "
        "(luminance) for 1-channel models, a grey channel repeated, or the first N channels of a file with more",
    )
    parser.add_argument(
        "--display-channel",
        type=int_in(0, MAX_IN_CHANNELS - 1),
        metavar="K",
        help="sample panels and overlays show channel K as grey (default: the first three channels as RGB)",
    )


image_size_type = positive_int_upto(MAX_IMAGE_SIZE)
crop_size_type = int_in(0, MAX_IMAGE_SIZE)  # 0: no crops, whole images squashed to --image-size
seed_type = int_in(0, 2**32 - 1)  # what NumPy's seeding accepts
mask_value_type = int_in(0, MAX_MASK_VALUE)


def add_device_flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto")


def add_ema_flag(parser: argparse.ArgumentParser) -> None:
    """--ema/--no-ema, the same in inference.py and export.py."""
    parser.add_argument(
        "--ema",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the moving average of the weights where the run kept one (train.py --ema); --no-ema: the trained ones",
    )


def add_hardware_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--device, --precision and --channels-last, the same in train.py and inference.py."""
    add_device_flag(parser)
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16", "fp16"),
        default="auto",
        help="auto: bf16 where it runs natively (GPUs, CPUs with AVX-512 BF16 or AMX) and start-up measures it faster, "
        "fp32 elsewhere",
    )
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        help="NHWC memory format, or NCHW with --no-channels-last; default: start-up times both on the real model "
        "and keeps the faster",
    )
