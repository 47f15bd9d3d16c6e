import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

import coco
import train
from checkpoints import load_checkpoint
from coco import class_table, compressed_counts, prepare_masks, render_mask
from conftest import ROOT, TINY_TRAIN_FLAGS
from errors import CocoError

CATEGORIES = [
    {"id": 1, "name": "person"},
    {"id": 3, "name": "car"},
    {"id": 44, "name": "bottle"},
    {"id": 90, "name": "toothbrush"},
]


def square(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def annotation(category, segmentation, crowd=0):
    return {"id": 1, "image_id": 1, "category_id": category, "segmentation": segmentation, "iscrowd": crowd}


def test_demo_coco_file_renders_the_demo_masks(tiny_demo, tmp_path):
    summary = prepare_masks(tiny_demo / "images/val", tiny_demo / "annotations/instances_val.json", tmp_path / "m")
    assert summary.written == 8 and not summary.skipped and not summary.missing_images
    agree = total = 0
    for own in sorted((tiny_demo / "masks/val").glob("*.png")):
        rendered = np.asarray(Image.open(tmp_path / "m" / own.name))
        agree += (rendered == np.asarray(Image.open(own))).sum()
        total += rendered.size
    assert agree / total >= 0.99
    classes = json.loads((tmp_path / "m" / "classes.json").read_text())
    assert classes["classes"] == {"0": "background", "1": "ellipse", "2": "rectangle", "3": "triangle", "4": "star"}


def test_category_ids_with_gaps_map_to_contiguous_values():
    table = class_table(CATEGORIES, "categories")
    assert table.values == {1: 1, 3: 2, 44: 3, 90: 4}
    assert table.names[4] == "toothbrush"
    mask, _, used, _ = render_mask(10, 10, [annotation(90, square(1, 1, 5, 5))], table)
    assert used == 1 and mask[2, 2] == 4


def test_crowd_rle_is_ignored_and_compressed_rle_renders():
    table = class_table(CATEGORIES, "categories")
    crowd = np.zeros((10, 10), np.uint8, order="F")
    crowd[:3] = 1
    uncompressed = {"size": [10, 10], "counts": rle_counts(crowd)}
    compressed = mask_utils.encode(np.asfortranarray((np.arange(100).reshape(10, 10) % 10 > 6).astype(np.uint8)))
    compressed["counts"] = compressed["counts"].decode()
    mask, _, used, skipped = render_mask(
        10, 10, [annotation(1, uncompressed, crowd=1), annotation(3, compressed)], table
    )
    assert used == 2 and not skipped
    assert (mask[:3, :7] == 255).all()
    assert (mask[:, 7:] == 2).all()  # the object is painted over the crowd region
    mask, _, _, _ = render_mask(10, 10, [annotation(1, uncompressed, crowd=1)], table, crowd_as_object=True)
    assert (mask[:3] == 1).all()


def rle_counts(binary):
    """Uncompressed COCO RLE counts (column-major runs, starting with zeros)."""
    flat = binary.ravel(order="F")
    counts, current, run = [], 0, 0
    for value in flat:
        if value == current:
            run += 1
        else:
            counts.append(run)
            current, run = value, 1
    counts.append(run)
    return counts


def test_malformed_annotations_are_skipped_and_counted():
    table = class_table(CATEGORIES, "categories")
    anns = [
        annotation(1, [[1, 1, 5, 1]]),
        annotation(1, [[1, 1, 5, 1, 5]]),
        annotation(7, square(0, 0, 3, 3)),
        annotation(1, {"size": [10, 10], "counts": "not an rle!"}),
        annotation(3, square(2, 2, 6, 6)),
    ]
    mask, _, used, skipped = render_mask(10, 10, anns, table)
    assert used == 1
    assert skipped == {"malformed polygon": 2, "category id not in categories": 1, "bad RLE": 1}
    assert mask[3, 3] == 2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compressed_counts_read_pycocotools_strings_as_its_decoder_does(seed):
    binary = (np.random.default_rng(seed).random((37, 23)) > 0.6).astype(np.uint8)
    binary[:5] = 1  # long runs need several characters
    encoded = mask_utils.encode(np.asfortranarray(binary))
    assert compressed_counts(encoded["counts"].decode()) == rle_counts(binary)


def hostile_annotations(height, width):
    good = annotation(3, square(2, 2, 6, 6))
    valid = mask_utils.encode(np.asfortranarray(np.ones((height, width), np.uint8)))["counts"].decode()
    return [
        annotation(1, [[1e12, 1, 5, 1, 5, 5]]),
        annotation(1, [[float("nan"), 1, 5, 1, 5, 5]]),
        annotation(1, [[1, 1, "5", 1, 5, 5]]),
        annotation(1, {"size": [height, width], "counts": valid[:-1] + "~~"}),  # characters past the alphabet
        annotation(1, {"size": [height, width], "counts": valid[:-1] + "o"}),  # a run that never ends
        annotation(1, {"size": [height, width], "counts": [height * width, 5]}),  # runs past the image
        annotation(1, {"size": [height, width], "counts": [-5, height * width + 5]}),
        annotation(1, {"size": [height * 2, width], "counts": valid}),
        good,
    ]


def test_hostile_geometry_is_skipped_by_reason_and_the_rest_renders():
    mask, ids, used, skipped = render_mask(10, 10, hostile_annotations(10, 10), class_table(CATEGORIES, "categories"))
    assert used == 1 and mask[3, 3] == 2 and mask[0, 0] == 0
    assert set(np.unique(ids)) == {0, 1} and (ids > 0).sum() == (mask == 2).sum()  # one object: the good one
    assert skipped == {"polygon coordinates not finite or far outside the image": 3, "bad RLE": 5}


def test_hostile_geometry_never_breaks_the_render_processes(tiny_demo, tmp_path):
    coco = json.loads((tiny_demo / "annotations/instances_val.json").read_text())
    for ann in hostile_annotations(48, 48)[:-1]:
        coco["annotations"].append({**ann, "id": 10_000 + len(coco["annotations"]), "image_id": 2})
    (tmp_path / "hostile.json").write_text(json.dumps(coco))
    summary = prepare_masks(
        tiny_demo / "images/val", tmp_path / "hostile.json", tmp_path / "m", workers=2, instances_dir=tmp_path / "i"
    )
    assert summary.written == 8 and summary.skipped["bad RLE"] == 5 and len(list((tmp_path / "i").iterdir())) == 8
    assert summary.skipped["polygon coordinates not finite or far outside the image"] == 3
    reference = prepare_masks(tiny_demo / "images/val", tiny_demo / "annotations/instances_val.json", tmp_path / "r")
    assert reference.written == 8
    for path in sorted((tmp_path / "r").glob("*.png")):
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(tmp_path / "m" / path.name)))


def test_group_priority_decides_an_overlap_and_categories_mode_prefers_the_smaller_object():
    big_person, small_bottle = square(0, 0, 8, 8), square(2, 2, 4, 4)
    anns = [annotation(44, small_bottle), annotation(1, big_person)]
    groups = class_table(CATEGORIES, "groups")
    mask, _, _, _ = render_mask(10, 10, anns, groups)
    assert mask[3, 3] == 1  # living (priority 4) beats kitchen (2) although the bottle is smaller
    assert groups.names[1] == "living" and groups.names[6] == "kitchen"
    mask, _, _, _ = render_mask(10, 10, anns, class_table(CATEGORIES, "categories"))
    assert mask[3, 3] == 3  # the bottle is in front


def test_an_interrupted_run_resumes_to_the_same_files(tiny_demo, tmp_path):
    images, annotations = tiny_demo / "images/train", tiny_demo / "annotations/instances_train.json"
    prepare_masks(images, annotations, tmp_path / "whole", workers=2)
    prepare_masks(images, annotations, tmp_path / "resumed", max_images=5)
    (tmp_path / "resumed" / ".train_00007.png.tmp999").write_bytes(b"half a png")  # left by a killed run
    summary = prepare_masks(images, annotations, tmp_path / "resumed")
    assert summary.existing == 5 and summary.written == 19
    for path in (tmp_path / "whole").glob("*.png"):
        assert path.read_bytes() == (tmp_path / "resumed" / path.name).read_bytes()


def test_missing_images_are_counted_and_not_coco_json_is_one_line(tiny_demo, tmp_path):
    coco = json.loads((tiny_demo / "annotations/instances_val.json").read_text())
    coco["images"][0]["file_name"] = "gone.jpg"
    (tmp_path / "a.json").write_text(json.dumps(coco))
    summary = prepare_masks(tiny_demo / "images/val", tmp_path / "a.json", tmp_path / "m")
    assert summary.missing_images == ["gone.jpg"] and summary.written == 7
    (tmp_path / "b.json").write_text(json.dumps({"images": []}))
    with pytest.raises(CocoError, match="b.json: not COCO instances format"):
        prepare_masks(tiny_demo / "images/val", tmp_path / "b.json", tmp_path / "m2")
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "prepare_masks.py"),
            "--images_dir",
            str(tiny_demo / "images/val"),
            "--annotations_file",
            str(tmp_path / "b.json"),
            "--output_dir",
            str(tmp_path / "m3"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "not COCO instances format" in result.stderr
    assert "Traceback" not in result.stderr


def test_train_reads_coco_annotations_directly(tiny_demo, tmp_path, monkeypatch):
    monkeypatch.setattr(coco, "COCO_CACHE", tmp_path / "cache")
    run_dir = tmp_path / "run"
    assert (
        train.main(
            [
                "--train-coco",
                str(tiny_demo / "annotations/instances_train.json"),
                "--train-images",
                str(tiny_demo / "images/train"),
                "--val-coco",
                str(tiny_demo / "annotations/instances_val.json"),
                "--val-images",
                str(tiny_demo / "images/val"),
                "--epochs",
                "1",
                "--run-dir",
                str(run_dir),
                *TINY_TRAIN_FLAGS,
            ]
        )
        == 0
    )
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert state["mapping"]["names"] == ["background", "ellipse", "rectangle", "triangle", "star"]
    assert len(list((tmp_path / "cache").glob("*-categories-????????????/*.png"))) == 32  # 24 + 8 masks
    assert len(list((tmp_path / "cache").glob("*-instances/*.png"))) == 32  # and each annotation an object
    assert state["objects"]["separation"] == "boundary"  # COCO is an instance format: the run learnt objects
