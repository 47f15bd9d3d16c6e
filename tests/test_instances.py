"""Objects: the separation targets, the watershed that turns them back into objects, the object table, and the
object-level scores, checked against hand-computed cases and a brute-force reference written here apart from the
product (every pair of objects compared pixel by pixel, a Hungarian matching per threshold as Cellpose does)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment
from skimage.draw import disk
from skimage.measure import label

from instances import ObjectRule, object_table, objects_from, separation_target
from metrics import IOU_THRESHOLDS, InstanceScores


def two_touching_discs(shape=(40, 60)) -> np.ndarray:
    ids = np.zeros(shape, np.int32)
    ids[disk((20, 20), 12, shape=shape)] = 7
    ids[disk((20, 41), 12, shape=shape)] = 300  # overlaps the first disc's edge: they touch along a chord
    return ids


def test_the_distance_target_is_one_at_each_centre_and_small_at_every_edge_shared_or_not():
    ids = two_touching_discs()
    target = separation_target(ids, "distance")
    assert target[ids == 0].max() == 0
    for index in (7, 300):
        assert target[ids == index].max() == pytest.approx(1.0)
    contact = (ids[:, :-1] == 7) & (ids[:, 1:] == 300)  # pixels of disc 7 whose right neighbour is disc 300
    assert contact.any() and target[:, :-1][contact].max() <= 1 / 11  # one pixel in from a radius-12 disc's edge


def test_the_boundary_target_marks_each_objects_own_edge_pixels():
    ids = two_touching_discs()
    target = separation_target(ids, "boundary")
    contact = (ids[:, :-1] == 7) & (ids[:, 1:] == 300)
    assert (target[:, :-1][contact] == 1).all() and (target[:, 1:][contact] == 1).all()  # both sides of the contact
    assert target[20, 20] == 0 and target[ids == 0].max() == 0


@pytest.mark.parametrize("separation", ["distance", "boundary"])
def test_perfect_maps_give_back_two_touching_objects_where_components_give_one(separation):
    ids = two_touching_discs()
    foreground = ids > 0
    assert label(foreground).max() == 1  # what a class map split into components finds
    found = objects_from(foreground, separation_target(ids, separation), ObjectRule(separation, 0.5, 8))
    assert found.max() == 2 and found.dtype == np.int32
    scores = InstanceScores()
    result = scores.update(ids, found)
    assert result["ap50"] == 1.0 and result["ap90"] == 1.0 and result["seg"] > 0.95


def test_foreground_without_a_seed_is_an_object_and_specks_are_dropped():
    foreground = np.zeros((30, 30), bool)
    foreground[2:12, 2:12] = True  # no seed: the separation map is 0 there
    foreground[20, 20] = True  # a speck under min_size
    separation = np.zeros((30, 30), np.float32)
    found = objects_from(foreground, separation, ObjectRule("distance", 0.5, 4))
    assert found.max() == 1 and (found > 0).sum() == 100


def test_hand_computed_scores():
    """Truth: A (4x4 at 0,0) and B (4x4 at 0,6). Prediction: A exactly; B' covering 12 of B's 16 pixels and 4 more
    (IoU 12/20 = 0.6); a false object C. TP at 0.5..0.6 = 2, above = 1; FP = 1 + (B' unmatched above 0.6)."""
    truth, pred = np.zeros((8, 12), np.int32), np.zeros((8, 12), np.int32)
    truth[0:4, 0:4], truth[0:4, 6:10] = 1, 2
    pred[0:4, 0:4] = 5
    pred[1:5, 6:10] = 9  # rows 1-3 of B (12 pixels) and row 4 (4 more)
    pred[6:8, 0:2] = 3
    result = InstanceScores().update(truth, pred)
    assert result["ap50"] == pytest.approx(2 / (2 + 1 + 0)) and result["ap60"] == pytest.approx(2 / 3)
    assert result["ap65"] == pytest.approx(1 / (1 + 2 + 1))
    assert result["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 0))
    assert result["pq"] == pytest.approx((1.0 + 0.6) / (2 + 0.5 + 0))
    assert result["seg"] == pytest.approx((1.0 + 0.6) / 2)  # B' covers 12 > 8 of B's pixels
    assert (result["true_objects"], result["pred_objects"]) == (2, 3)


def brute_force(truth: np.ndarray, pred: np.ndarray) -> tuple[list[int], float, float]:
    """TP per threshold by a Hungarian matching of the IoU >= t pairs at each t (Cellpose's _true_positive), the
    summed IoU of the matches at 0.5, and the summed SEG: every pair of objects compared mask by mask."""
    true_ids, pred_ids = [i for i in np.unique(truth) if i], [i for i in np.unique(pred) if i]
    iou = np.zeros((len(true_ids), len(pred_ids)))
    seg = 0.0
    for r, t in enumerate(true_ids):
        a = truth == t
        for c, p in enumerate(pred_ids):
            b = pred == p
            iou[r, c] = (a & b).sum() / (a | b).sum()
            if (a & b).sum() > 0.5 * a.sum():
                seg += iou[r, c]
    tps, matched = [], 0.0
    for threshold in IOU_THRESHOLDS:
        rows, cols = linear_sum_assignment(-((iou >= threshold) * iou)) if iou.size else ([], [])
        good = [iou[r, c] for r, c in zip(rows, cols, strict=True) if iou[r, c] >= threshold]
        tps.append(len(good))
        matched = sum(good) if threshold == 0.5 else matched
    return tps, matched, seg


def random_objects(rng: np.random.Generator, shape=(48, 48), count=12) -> np.ndarray:
    """Rectangles painted over each other, so objects overlap, touch and break into pieces."""
    ids = np.zeros(shape, np.int32)
    for index in rng.choice(np.arange(1, 100_000), count, replace=False):
        top, left = rng.integers(0, shape[0] - 4), rng.integers(0, shape[1] - 4)
        ids[top : top + rng.integers(3, 16), left : left + rng.integers(3, 16)] = index
    return ids


def test_the_scores_equal_a_brute_force_reference_on_random_objects():
    rng = np.random.default_rng(0)
    dataset, true_total, pred_total, matched_total, seg_total = InstanceScores(), 0, 0, 0.0, 0.0
    tps_total = np.zeros(len(IOU_THRESHOLDS))
    for _ in range(30):
        truth = random_objects(rng)
        pred = np.where(rng.random(truth.shape) < 0.05, 0, truth)  # the truth with holes...
        pred = np.roll(pred, rng.integers(-2, 3), axis=int(rng.integers(0, 2)))  # ...shifted...
        pred[random_objects(rng, count=3) > 0] = 999_999  # ...and a false object painted over parts
        dataset.update(truth, pred)
        tps, matched, seg = brute_force(truth, pred)
        tps_total += tps
        true_total += len(set(np.unique(truth).tolist()) - {0})
        pred_total += len(set(np.unique(pred).tolist()) - {0})
        matched_total, seg_total = matched_total + matched, seg_total + seg
    result = dataset.compute()
    for threshold, tp in zip(IOU_THRESHOLDS, tps_total, strict=True):
        expected = tp / (tp + (pred_total - tp) + (true_total - tp))
        assert result[f"ap{round(threshold * 100)}"] == pytest.approx(expected)
    assert tps_total[0] > tps_total[-1] > 0  # the cases reach both ends of the thresholds
    tp = tps_total[0]
    assert result["pq"] == pytest.approx(matched_total / (tp + (pred_total - tp) / 2 + (true_total - tp) / 2))
    assert result["seg"] == pytest.approx(seg_total / true_total)


def test_the_object_table_measures_each_object():
    ids = two_touching_discs()
    classes = (ids > 0).astype(np.int64) + (ids == 300)  # disc 300 is class 2
    image = np.dstack([np.full(ids.shape, 10, np.uint8), np.where(ids == 7, 200, 0).astype(np.uint8)])
    confidence = np.where(ids > 0, 0.75, 0.0).astype(np.float32)
    found = objects_from(ids > 0, separation_target(ids, "distance"), ObjectRule("distance", 0.5, 8))
    rows = object_table(found, classes, image, confidence, ["background", "cell", "grain"])
    assert [row["class"] for row in rows] == ["cell", "grain"]
    first = rows[0]
    assert first["area"] == (found == 1).sum() and abs(first["area"] - (ids == 7).sum()) <= 12
    assert first["centroid_y"] == pytest.approx(20, abs=0.5) and first["mean_intensity_0"] == 10
    assert first["mean_intensity_1"] == pytest.approx(image[found == 1, 1].mean())
    assert first["confidence"] == pytest.approx(0.75)
    assert first["equivalent_diameter"] == pytest.approx(2 * np.sqrt(first["area"] / np.pi), rel=1e-3)
