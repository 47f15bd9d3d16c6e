"""Turn COCO instances annotations and an image folder into the index-mask folder train.py reads.

Writes OUT/<image stem>.png (one label value per pixel) and OUT/classes.json, and prints a
summary. Masks that already exist are kept unless --overwrite, so a killed run resumes where it
stopped.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from cli import ArgumentParser, non_negative_int, positive_int, run_cli, setup_logging
from coco import COCO_MODES, prepare_masks
from files import check_writable_folder, refuse_inside
from image_io import DEFAULT_MAX_PIXELS

log = logging.getLogger(__name__)


def get_args_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--images_dir", type=Path, required=True)
    p.add_argument(
        "--annotations_file",
        type=Path,
        required=True,
        help="COCO instances_*.json (polygons, RLE or compressed RLE)",
    )
    p.add_argument("--output_dir", type=Path, required=True, help="mask folder to write")
    p.add_argument(
        "--mode",
        choices=COCO_MODES,
        default="categories",
        help="categories: one value per COCO category; groups: the 9 super-groups; binary: any object",
    )
    p.add_argument("--categories", help="comma-separated category names to keep (categories and binary modes)")
    p.add_argument("--max_images", type=positive_int, help="only the first N images (by id)")
    p.add_argument(
        "--workers", type=non_negative_int, default=os.cpu_count() or 1, help="processes rendering masks (0: inline)"
    )
    p.add_argument("--overwrite", action="store_true", help="re-render masks that already exist")
    p.add_argument(
        "--max-pixels", type=positive_int, default=DEFAULT_MAX_PIXELS, help="larger images are skipped and counted"
    )
    p.add_argument(
        "--crowd-as-object", action="store_true", help="paint iscrowd regions as their class, not 255 (ignored)"
    )
    p.add_argument(
        "--instances_dir",
        type=Path,
        help="also write each image's instance mask here: one id per annotation (16-bit PNG), what train.py's "
        "--train-instances reads",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = get_args_parser().parse_args(argv)
    check_writable_folder(args.output_dir, "--output_dir")
    if args.instances_dir is not None:
        check_writable_folder(args.instances_dir, "--instances_dir")
        refuse_inside(args.instances_dir, args.images_dir, f"{args.instances_dir}: must not be inside --images_dir")
    categories = [c.strip() for c in args.categories.split(",")] if args.categories else None
    summary = prepare_masks(
        args.images_dir,
        args.annotations_file,
        args.output_dir,
        mode=args.mode,
        categories=categories,
        max_images=args.max_images,
        workers=args.workers,
        overwrite=args.overwrite,
        crowd_as_object=args.crowd_as_object,
        max_pixels=args.max_pixels,
        instances_dir=args.instances_dir,
    )
    log.info(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
