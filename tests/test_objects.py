"""Objects end to end: train.py learns them wherever instance masks are found (and says so), validation scores
them, inference.py writes instance images, outlines, objects.csv and COCO results that pycocotools reads, the Python
API returns ids and the table, an object across a tile seam keeps one id, and score_masks.py --instances scores
any tool's label images."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import inference
import score_masks
import train
from checkpoints import load_checkpoint
from conftest import TINY_TRAIN_FLAGS, add_instance_masks, run_in_process
from instances import ObjectRule, separation_target
from labels import LabelMapping
from predictor import Predictor
from sampling import Sampling
from utils import Runtime


@pytest.fixture(scope="module")
def object_run(tiny_demo, tmp_path_factory) -> Path:
    root = add_instance_masks(Path(shutil.copytree(tiny_demo, tmp_path_factory.mktemp("objects") / "data")))
    run_dir = root.parent / "run"
    result = run_in_process(train.main, "--data-root", root, "--epochs", "2", "--run-dir", run_dir, *TINY_TRAIN_FLAGS)
    assert result.returncode == 0, result.stderr
    (run_dir / "stdout.txt").write_text(result.stdout)
    return run_dir


def test_instance_masks_are_found_trained_on_and_scored(object_run):
    out = (object_run / "stdout.txt").read_text()
    assert "instances: separate objects learnt from the instance masks found (boundary map" in out
    assert "objects AP50" in out
    state = load_checkpoint(object_run / "checkpoints/last.pt")
    assert state["model_args"]["extra_outputs"] == 1 and state["objects"]["separation"] == "boundary"
    rows = list(csv.DictReader((object_run / "results.csv").open()))
    assert {"ap50", "ap50_95", "pq", "seg"} <= set(rows[0]) and 0 <= float(rows[-1]["ap50"]) <= 1


def test_a_semantic_run_has_no_separation_head_and_no_object_columns(trained_run):
    state = load_checkpoint(trained_run / "checkpoints/last.pt")
    assert "extra_outputs" not in state["model_args"] and "objects" not in state
    assert "ap50" not in (trained_run / "results.csv").read_text().splitlines()[0]


def test_inference_writes_instances_outlines_a_table_and_coco_results(object_run, tiny_demo, tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    out = tmp_path / "out"
    checkpoint = object_run / "checkpoints/last.pt"
    flags = ["--input_dir", tiny_demo / "images/val", "--checkpoint", checkpoint, "--output_dir", out]
    result = run_in_process(inference.main, *flags, "--min-object-size", 1, "--seed-threshold", 0.9)
    assert result.returncode == 0, result.stderr
    names = sorted(p.stem for p in (tiny_demo / "images/val").iterdir())
    assert sorted(p.stem for p in (out / "instances").iterdir()) == names
    ids = np.asarray(Image.open(out / "instances" / f"{names[0]}.png"))
    assert ids.dtype == np.uint16 and ids.shape == (48, 48)
    rows = list(csv.DictReader((out / "objects.csv").open()))
    found = {(row["image"], int(row["id"])) for row in rows}
    for name in names:  # every object of every instance image has its row, and only those
        image_ids = np.asarray(Image.open(out / "instances" / f"{name}.png"))
        assert {i for n, i in found if n == f"{name}.jpg"} == set(np.unique(image_ids).tolist()) - {0}
    assert rows and f"{len(rows)} objects" in result.stdout
    results = COCO(str(out / "coco_images.json")).loadRes(str(out / "coco_results.json"))
    evaluation = COCOeval(results, results, "segm")  # against themselves: every object matches itself
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    assert evaluation.stats[0] == pytest.approx(1.0)
    rerun = run_in_process(inference.main, *flags)
    assert "0 images segmented" in rerun.stdout and f"{len(names)} already done" in rerun.stdout
    assert len(list(csv.DictReader((out / "objects.csv").open()))) == len(rows)  # merged again, not lost


def test_the_python_api_returns_ids_and_the_table(object_run, tiny_demo):
    predictor = Predictor.from_checkpoint(object_run / "checkpoints/last.pt", Runtime.from_flags("cpu", "fp32", False))
    image = sorted((tiny_demo / "images/val").iterdir())[0]
    ids, rows = predictor.predict_objects(image)
    assert ids.shape == (48, 48) and ids.dtype == np.int32
    assert sorted(row["id"] for row in rows) == sorted(set(np.unique(ids).tolist()) - {0})


def test_a_semantic_model_has_no_objects_to_give(trained_run, tiny_demo):
    predictor = Predictor.from_checkpoint(trained_run / "checkpoints/last.pt", Runtime.from_flags("cpu", "fp32", False))
    with pytest.raises(ValueError, match="no separation head"):
        predictor.predict_objects(sorted((tiny_demo / "images/val").iterdir())[0])


def test_an_object_across_a_tile_seam_keeps_one_id():
    """A disc straddling the seam of two slide tiles, through a network that reads its maps off the input (so each
    tile sees exactly its part): one object, as the whole image gives, not two halves."""
    height, width = 64, 200
    ids = np.zeros((height, width), np.int32)
    yy, xx = np.mgrid[:height, :width]
    ids[(yy - 32) ** 2 + (xx - 100) ** 2 < 20**2] = 1  # centred on the seam of two 112 px tiles
    ids[(yy - 32) ** 2 + (xx - 141) ** 2 < 20**2] = 2  # touching the first
    boundary = separation_target(ids, "boundary")
    pixels = np.stack([(ids > 0) * 8.0 - 4.0, (boundary - 0.5) * 16.0, np.zeros_like(boundary)]).astype(np.float32)

    def network(images: torch.Tensor) -> torch.Tensor:  # channel 0: foreground logit, 1: boundary logit
        return torch.stack([-images[:, 0], images[:, 0], images[:, 1]], 1)

    mapping = LabelMapping([0, 1], ["background", "cell"])
    sampling = Sampling("slide", image_size=64, tile=112)
    assert len(sampling.tile_grid(height, width)[2]) == 2  # two tiles across, meeting inside the first disc
    predictor = Predictor(
        network, mapping, sampling, Runtime(torch.device("cpu")), objects=ObjectRule("boundary", 0.5, 8)
    )
    predictor.normalize = lambda images: images.float()
    found = predictor.segment_objects([torch.from_numpy(pixels)])[0]
    first, second = np.unique(found.ids[ids == 1]), np.unique(found.ids[ids == 2])
    assert len(first) == 1 and len(second) == 1 and first[0] != second[0] and found.ids.max() == 2


def test_score_masks_scores_objects_per_image_and_overall(tmp_path):
    truth, pred = tmp_path / "truth", tmp_path / "pred"
    for folder in (truth, pred):
        folder.mkdir()
    a, b = np.zeros((8, 12), np.uint16), np.zeros((8, 12), np.uint16)
    a[0:4, 0:4], a[0:4, 6:10] = 1, 70  # two objects
    b[0:4, 0:4], b[1:5, 6:10] = 3, 4  # one exact, one at IoU 0.6
    Image.fromarray(a).save(truth / "x.png")
    Image.fromarray(b).save(pred / "x.png")
    Image.fromarray(a).save(truth / "y.png")
    Image.fromarray(a).save(pred / "y.png")
    result = run_in_process(
        score_masks.main, "--instances", "--pred", pred, "--truth", truth, "--csv", tmp_path / "s.csv"
    )
    assert result.returncode == 0, result.stderr
    assert "2 images, 4 true and 4 predicted objects: AP50 1.0000, AP75 0.6000" in result.stdout  # 3/(3+1+1)
    rows = list(csv.DictReader((tmp_path / "s.csv").open()))
    assert [row["image"] for row in rows] == ["x.png", "y.png", "all"] and float(rows[1]["ap90"]) == 1.0


def test_an_objects_rle_from_its_box_is_pycocotools_rle_of_the_whole_image():
    from pycocotools import mask as mask_utils

    from object_files import object_rle

    rng = np.random.default_rng(3)
    for _ in range(20):
        whole = np.zeros((37, 53), np.uint8)
        top, left = rng.integers(0, 30), rng.integers(0, 45)
        whole[top : top + rng.integers(1, 8), left : left + rng.integers(1, 9)] = rng.integers(0, 2, (1, 1))[0, 0] | 1
        whole[top, left] = 1
        rows, cols = np.nonzero(whole)
        box = (rows.min(), cols.min(), rows.max() + 1, cols.max() + 1)
        expected = mask_utils.encode(np.asfortranarray(whole))
        found = object_rle(whole[box[0] : box[2], box[1] : box[3]] > 0, box[0], box[1], whole.shape)
        assert found["counts"] == expected["counts"].decode("ascii") and found["size"] == [37, 53]


def test_the_onnx_path_gives_the_same_objects(object_run, tiny_demo, tmp_path):
    import export

    onnx_file = tmp_path / "m.onnx"
    result = run_in_process(export.main, "--checkpoint", object_run / "checkpoints/last.pt", "--output", onnx_file)
    assert result.returncode == 0, result.stderr
    image = sorted((tiny_demo / "images/val").iterdir())[1]
    torch_predictor = Predictor.from_checkpoint(
        object_run / "checkpoints/last.pt", Runtime.from_flags("cpu", "fp32", False), objects={"min_size": 1}
    )
    onnx_predictor = Predictor.from_onnx(onnx_file, objects={"min_size": 1})
    assert onnx_predictor.objects == torch_predictor.objects
    torch_ids, torch_rows = torch_predictor.predict_objects(image)
    onnx_ids, onnx_rows = onnx_predictor.predict_objects(image)
    assert (torch_ids == onnx_ids).mean() >= 0.999 and len(onnx_rows) == len(torch_rows)
