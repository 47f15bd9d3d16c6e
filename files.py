"""Files and folders: path checks, names as a console or TensorBoard can show them, atomic writes that never
leave half a file, and JSON caches keyed on the files they summarise."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from errors import UserError, WriteError


def printable(text: str) -> str:
    """text with the bytes of a file name that is not valid UTF-8 (lone surrogates to Python) shown as U+FFFD, for
    the writers that need real UTF-8 (TensorBoard, YAML, folder names made from a name)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def require_folder(path: Path, flag: str = "") -> Path:
    """The one wording for a missing folder or a file where a folder belongs; flag names the option."""
    label = f"{flag} {path}" if flag else str(path)
    if not path.exists():
        raise UserError(f"{label}: no such folder")
    if not path.is_dir():
        raise UserError(f"{label}: not a folder")
    return path


def refuse_inside(output: Path, inputs: Path, message: str) -> None:
    """Outputs never land inside an input folder, so inputs are never modified or read back as inputs."""
    target, source = output.resolve(), inputs.resolve()
    if target == source or source in target.parents:
        raise UserError(message)


def _fsync_folder(folder: Path) -> None:
    """Makes a rename inside folder survive a power cut; some systems cannot sync a folder, which is fine there."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def replace_atomically(path: Path) -> Iterator[Path]:
    """Yields a temporary name beside path, renamed onto path once written and synced to disk.

    A crash, a kill or a power cut leaves the old file or the new one under path, never a half-written or
    empty one. A failing write (disk full, read-only, no permission) raises WriteError naming path and the
    cause, leaves the old file as it was, and no temporary behind.
    """
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}-{threading.get_ident()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    except OSError as err:
        raise WriteError(f"{path}: cannot write ({err.strerror or err})") from None
    finally:
        tmp.unlink(missing_ok=True)


def files_key(paths: list[Path], *settings) -> str:
    """A digest of the files' names, sizes and modification times and of the settings a result depends on: a
    cache key that changes when any of them does. Names are hashed as the bytes on disk, so a name that is not
    valid UTF-8 hashes too."""
    digest = hashlib.sha256(repr(settings).encode())
    for path in paths:
        stat = path.stat()
        digest.update(os.fsencode(path.name) + f"\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())  # bytes-safe
    return digest.hexdigest()


def read_json_cache(path: Path, key: str):
    """The value cached under key in path; None if the file is missing, unreadable or holds another key."""
    try:
        cached = json.loads(path.read_text())
        return cached["value"] if cached.get("key") == key else None
    except (OSError, ValueError, KeyError, AttributeError):
        return None


def write_json_cache(path: Path, key: str, value) -> None:
    """A cache that cannot be written (a read-only data folder) only costs the next run the work again."""
    try:
        with replace_atomically(path) as tmp:
            tmp.write_text(json.dumps({"key": key, "value": value}))
    except WriteError:
        logging.getLogger(__name__).info("%s: cannot write this cache; the next run computes it again", path)
