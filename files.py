"""Files and folders: path checks, names as a console or TensorBoard can show them, atomic writes that never
leave half a file, and JSON caches keyed on the files they summarise."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from errors import UserError, WriteError


def printable(text: str) -> str:
    """text with the bytes of a file name that is not valid UTF-8 (lone surrogates to Python) shown as U+FFFD, for
    the writers that need real UTF-8 (TensorBoard, YAML, folder names made from a name)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


# What a path that is not a regular file is, by its type after following links (os.stat's st_mode).
_NOT_FILES = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a named pipe, which would block a reader"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def not_a_file(path: str | Path, mode: int | None = None) -> str | None:
    """Why path cannot be read as a file (a symbolic-link loop, a dangling link, a folder, a FIFO, a device), or
    None for a regular file. Only the inode is looked at: nothing is opened, so a FIFO never blocks the caller.
    mode: st_mode where the caller has it already. A path that does not exist at all is None too: opening it says
    so in the reader's own words."""
    if mode is None:
        try:
            mode = os.stat(path).st_mode
        except OSError as err:
            if err.errno == errno.ELOOP:
                return "a symbolic link loop"
            if os.path.islink(path):
                return "a dangling symbolic link, to nothing"
            return None if isinstance(err, FileNotFoundError) else f"not readable ({err.strerror or err})"
    for test, kind in _NOT_FILES:
        if test(mode):
            return kind
    return None


def require_folder(path: Path, flag: str = "") -> Path:
    """The one wording for a missing folder or a file where a folder belongs; flag names the option."""
    label = f"{flag} {path}" if flag else str(path)
    if path.is_dir():
        return path
    problem = not_a_file(path)
    if problem:
        raise UserError(f"{label}: {problem}, not a folder")
    raise UserError(f"{label}: {'not a folder' if path.exists() else 'no such folder'}")


def require_file(path: Path, what: str, error: type[UserError], missing: type[UserError]) -> Path:
    """path, if it is a regular file (links followed); else error (missing where nothing is there) naming it."""
    problem = not_a_file(path)
    if problem:
        raise error(f"{path}: {problem}, not a regular file")
    if not os.path.isfile(path):
        raise missing(f"{path}: no such {what}")
    return path


def refuse_inside(output: Path, inputs: Path, message: str) -> None:
    """Outputs never land inside an input folder, so inputs are never modified or read back as inputs."""
    target, source = Path(os.path.realpath(output)), Path(os.path.realpath(inputs))  # resolve() raises on link loops
    if target == source or source in target.parents:
        raise UserError(message)


def check_writable_folder(path: Path, flag: str) -> Path:
    """An output folder that can be made and written to: its nearest existing folder takes a temporary file (gone at
    once), so a read-only or forbidden place, or a file or link loop in the way, is one line naming the flag before
    any work, and nothing is created. (A disk that fills later: replace_atomically.)"""
    existing = path
    while not existing.is_dir():
        if os.path.lexists(existing):
            raise UserError(f"{flag} {path}: {existing} is {not_a_file(existing) or 'a file'}, not a folder")
        existing = existing.parent
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise UserError(f"{flag} {path}: cannot write there ({err.strerror or err})") from None
    return path


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
    """A digest of the files' names, sizes, modification and change times and inodes, and of the settings a result
    depends on: a cache key that changes when any of them does. The change time (ctime) moves with every write and
    cannot be set back, so a file rewritten with its old size and modification time (a copy with `cp -p`, `touch -r`)
    still changes the key. Names are hashed as the bytes on disk, so a name that is not valid UTF-8 hashes too."""
    digest = hashlib.sha256(repr(settings).encode())
    for path in paths:
        digest.update(os.fsencode(path.name) + f"\0{_file_state(path)}\n".encode())  # bytes-safe
    return digest.hexdigest()


def _file_state(path: Path) -> tuple | None:
    """files_key's part of one file; of a folder (a zarr store), of every file in it, since rewritten chunks leave
    the folder's own times as they were. None: gone or changed into something else since it was listed (its reader
    will say so)."""
    try:
        found = os.stat(path)
        if not stat.S_ISDIR(found.st_mode):
            return found.st_size, found.st_mtime_ns, found.st_ctime_ns, found.st_ino
        inside = [os.stat(os.path.join(top, name)) for top, _, names in os.walk(path) for name in names]
    except OSError:
        return None
    newest = [max((getattr(f, time) for f in inside), default=0) for time in ("st_mtime_ns", "st_ctime_ns")]
    return len(inside), sum(f.st_size for f in inside), *newest, found.st_ino


def read_json_cache(path: Path, key: str):
    """The value cached under key in path; None if the file is missing, unreadable or holds another key."""
    if not_a_file(path):  # a FIFO under the cache's name would block the read
        return None
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
