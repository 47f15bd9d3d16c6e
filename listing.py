"""Folders -> the image files in them: one listing for every reader (training, inference, export's check,
score_masks.py), which names and leaves out the entries that are no files (link loops, dangling links, folders,
FIFOs, devices) without opening them, and enters folders that loop once."""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from files import not_a_file
from image_io import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)

ZARR_SUFFIX = ".zarr"  # zarr and OME-Zarr folders: slides (slides.py), listed for inference only


@dataclass(frozen=True)
class Listing:
    """A folder's image files, and the entries named like images that are no files (link loops, dangling links,
    folders, FIFOs, devices), each with what it is: skipped, never opened."""

    files: list[Path]
    not_files: list[tuple[Path, str]]

    def warn(self, folder: Path) -> None:
        """One line for the entries left out, naming the first few."""
        if self.not_files:
            named = "; ".join(f"{path.name}: {why}" for path, why in self.not_files[:3])
            count = len(self.not_files)
            log.warning("%s: %d entries named like images are no files, skipped (%s)", folder, count, named)


def image_listing(folder: Path, recursive: bool = False, slides: bool = False) -> Listing:
    """The image files in folder (and its subfolders, each entered once however links loop), in Path order.
    Directory entries know their type without a stat each, and names sort as strings: a COCO-size folder lists in
    well under a second. Symbolic links are followed to what they name. slides: zarr folders (*.zarr) are listed
    as images too (inference.py reads them as slides); they are never entered."""
    files, not_files = [], []
    for top, names in _folders(folder, recursive):
        for name, mode in names:
            path = os.path.join(top, name)
            problem = not_a_file(path, mode)
            if slides and problem == "a folder" and name.lower().endswith(ZARR_SUFFIX):
                files.append(path)
            elif problem:
                not_files.append((Path(path), problem))
            else:
                files.append(path)
    files.sort(key=lambda name: name.split(os.sep))  # one folder: the names' order is Path's
    return Listing([Path(name) for name in files], not_files)


def _folders(folder: Path, recursive: bool):
    """(folder, [(image name, st_mode or None)]) for folder and, if recursive, each folder below it once. A mode is
    known without a stat for plain files (the entry's type); links and odd entries are left to not_a_file."""
    seen, todo = set(), [str(folder)]
    while todo:
        top = todo.pop()
        try:
            found = os.stat(top)
            identity = (found.st_dev, found.st_ino)
            if identity in seen:
                continue
            seen.add(identity)
            with os.scandir(top) as entries:
                entries = list(entries)
        except OSError as err:
            if top == str(folder):
                raise
            log.warning("%s: folder not read (%s)", top, err.strerror or err)
            continue
        names = []
        for entry in entries:
            plain = entry.is_file(follow_symlinks=False)  # no stat: the entry's type
            zarr_folder = entry.name.lower().endswith(ZARR_SUFFIX)
            if recursive and not plain and not zarr_folder and _is_folder(entry):
                todo.append(entry.path)
            elif is_image_name(entry.name) or zarr_folder:
                names.append((entry.name, stat.S_IFREG if plain else None))
        yield top, names


def _is_folder(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a link loop
        return False


def list_images(folder: Path, recursive: bool = False, slides: bool = False) -> list[Path]:
    """image_listing's files; the entries that are no files are named in one warning."""
    listing = image_listing(folder, recursive, slides)
    listing.warn(folder)
    return listing.files


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS  # as Path.suffix: the last dot's extension
