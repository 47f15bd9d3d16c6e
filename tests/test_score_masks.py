"""score_masks.py against torchmetrics on the same pixels, and its refusals."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.classification import MulticlassJaccardIndex

import score_masks
from conftest import run_in_process


def write_masks(folder, masks: dict[str, np.ndarray]):
    folder.mkdir(parents=True, exist_ok=True)
    for name, mask in masks.items():
        Image.fromarray(mask).save(folder / f"{name}.png")
    return folder


def one_pair(tmp_path, pred: np.ndarray, truth: np.ndarray) -> list:
    return [(write_masks(tmp_path / "p", {"a": pred}) / "a.png", write_masks(tmp_path / "t", {"a": truth}) / "a.png")]


def test_scores_equal_torchmetrics_over_all_pixels_of_all_images(tmp_path):
    rng = np.random.default_rng(0)
    values = np.array([0, 3, 7], dtype=np.uint8)  # label values, not indices: the scorer maps them
    truths = {f"im{i}": values[rng.integers(0, 3, (20 + i, 30))] for i in range(3)}
    preds = {n: np.where(rng.random(t.shape) < 0.7, t, values[rng.integers(0, 3, t.shape)]) for n, t in truths.items()}
    truths["im0"][:2] = 255  # ignored
    result = run_in_process(
        score_masks.main, "--pred", write_masks(tmp_path / "p", preds), "--truth", write_masks(tmp_path / "t", truths)
    )
    assert result.returncode == 0, result.stderr
    index = {0: 0, 3: 1, 7: 2, 255: 255}
    pred = torch.cat([torch.tensor(np.vectorize(index.get)(preds[n])).flatten() for n in sorted(truths)])
    truth = torch.cat([torch.tensor(np.vectorize(index.get)(truths[n])).flatten() for n in sorted(truths)])
    reference = MulticlassJaccardIndex(3, average="macro", ignore_index=255)(pred, truth).item()
    assert f"mIoU {reference:.4f}" in result.stdout and "3 images" in result.stdout


def test_a_predicted_value_the_truth_never_holds_is_an_error_not_a_class(tmp_path):
    truth = np.zeros((10, 10), np.uint8)
    truth[:, 5:] = 1
    pred = truth.copy()
    pred[:, 8:] = 2  # 2 is no class: 20 of the 50 foreground pixels missed
    result = score_masks.score(one_pair(tmp_path, pred, truth))
    assert [r["class"] for r in result["rows"]] == ["0", "1"]
    assert result["rows"][1]["iou"] == pytest.approx(30 / 50)
    assert result["miou"] == pytest.approx((1.0 + 0.6) / 2)
    assert result["pixel_acc"] == pytest.approx(80 / 100)


def test_binary_scores_0_255_predictions_against_0_1_truth(tmp_path):
    truth = np.zeros((8, 8), np.uint8)
    truth[2:6, 2:6] = 1
    assert score_masks.score(one_pair(tmp_path, truth * 255, truth), binary=True)["miou"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("preds", "message"),
    [
        ({"a": np.zeros((8, 8), np.uint8)}, "no prediction for 1 of 2 true masks (b.png"),
        ({"a": np.zeros((8, 8), np.uint8), "b": np.zeros((8, 9), np.uint8)}, "9x8, its true mask"),
        ({}, "every true-mask pixel is --ignore-value 255: nothing to score"),
    ],
)
def test_a_missing_or_misshapen_prediction_is_one_line(tmp_path, preds, message):
    truths = {"a": np.zeros((8, 8), np.uint8), "b": np.ones((8, 8), np.uint8)}
    if not preds:  # true masks that hold only the ignore value
        truths, preds = {"a": np.full((8, 8), 255, np.uint8)}, {"a": np.zeros((8, 8), np.uint8)}
    result = run_in_process(
        score_masks.main, "--pred", write_masks(tmp_path / "p", preds), "--truth", write_masks(tmp_path / "t", truths)
    )
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
