import math

import pytest
import torch
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassJaccardIndex

from metrics import ConfusionMatrix

K = 5


def random_batches(seed: int, batches: int = 3):
    g = torch.Generator().manual_seed(seed)
    for _ in range(batches):
        target = torch.randint(0, K, (2, 24, 24), generator=g)
        pred = torch.where(
            torch.rand(target.shape, generator=g) < 0.6, target, torch.randint(0, K, target.shape, generator=g)
        )
        target[torch.rand(target.shape, generator=g) < 0.1] = 255
        yield pred, target


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_confusion_matrix_equals_torchmetrics(seed):
    cm = ConfusionMatrix(K)
    jaccard = MulticlassJaccardIndex(K, average=None, ignore_index=255)
    f1 = MulticlassF1Score(K, average=None, ignore_index=255, multidim_average="global")
    accuracy = MulticlassAccuracy(K, average="micro", ignore_index=255)
    for pred, target in random_batches(seed):
        cm.update(pred, target)
        for metric in (jaccard, f1, accuracy):
            metric.update(pred, target)
    result = cm.compute()
    torch.testing.assert_close(result["iou"], jaccard.compute().double(), atol=1e-6, rtol=0)
    torch.testing.assert_close(result["dice"], f1.compute().double(), atol=1e-6, rtol=0)
    assert result["miou"] == pytest.approx(jaccard.compute().mean().item(), abs=1e-6)
    assert result["pixel_acc"] == pytest.approx(accuracy.compute().item(), abs=1e-6)


def test_metrics_are_over_the_whole_set_not_a_mean_of_batches():
    batches = list(random_batches(3, batches=4))
    accumulated, whole = ConfusionMatrix(K), ConfusionMatrix(K)
    for pred, target in batches:
        accumulated.update(pred, target)
    whole.update(torch.cat([p for p, _ in batches]), torch.cat([t for _, t in batches]))
    assert torch.equal(accumulated.matrix, whole.matrix)
    per_batch = []
    for pred, target in batches:
        single = ConfusionMatrix(K)
        single.update(pred, target)
        per_batch.append(single.compute()["miou"])
    assert accumulated.compute()["miou"] != pytest.approx(sum(per_batch) / len(per_batch), abs=1e-9)


def test_class_absent_from_prediction_and_target_is_left_out_of_the_means():
    cm = ConfusionMatrix(3)
    target = torch.tensor([[0, 0, 1, 1]])
    pred = torch.tensor([[0, 1, 1, 1]])
    cm.update(pred, target)
    result = cm.compute()
    assert math.isnan(result["iou"][2].item())
    assert result["iou"][:2].tolist() == pytest.approx([1 / 2, 2 / 3])
    assert result["miou"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert result["pixel_acc"] == pytest.approx(3 / 4)


def test_ignored_pixels_are_not_counted_and_reset_clears():
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([1, 0, 1]), torch.tensor([255, 0, 1]))
    assert cm.matrix.sum().item() == 2
    cm.reset()
    assert cm.matrix.sum().item() == 0
