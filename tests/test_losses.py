import pytest
import torch
import torch.nn.functional as F

from losses import build_loss


def test_dice_ce_gradient_is_finite_and_perfect_prediction_costs_nothing():
    target = torch.randint(0, 4, (2, 16, 16))
    target[0, :2] = 255
    logits = torch.randn(2, 4, 16, 16, requires_grad=True)
    loss = build_loss("dice_ce")(logits, target)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    perfect = 30.0 * F.one_hot(target.clamp(max=3), 4).permute(0, 3, 1, 2).float()
    assert build_loss("dice_ce")(perfect, target).item() < 1e-3
    assert loss.item() > 0.5


@pytest.mark.parametrize("name", ["ce", "dice_ce", "weighted_ce"])
def test_ignored_pixels_do_not_change_the_loss(name):
    target = torch.randint(0, 3, (1, 8, 8))
    target[0, :4] = 255
    logits = torch.randn(1, 3, 8, 8)
    changed = logits.clone()
    changed[0, :, :4] = torch.randn(3, 4, 8) * 10
    loss = build_loss(name, class_weights=torch.tensor([0.5, 1.0, 2.0]))
    assert loss(logits, target).item() == pytest.approx(loss(changed, target).item(), rel=1e-6)


def test_weighted_ce_is_the_weighted_mean_of_negative_log_likelihoods():
    weights = torch.tensor([0.2, 1.0, 3.0])
    target = torch.randint(0, 3, (2, 5, 5))
    logits = torch.randn(2, 3, 5, 5)
    log_probs = logits.log_softmax(1).gather(1, target.unsqueeze(1)).squeeze(1)
    w = weights[target]
    expected = -(w * log_probs).sum() / w.sum()
    assert build_loss("weighted_ce", class_weights=weights)(logits, target).item() == pytest.approx(
        expected.item(), rel=1e-5
    )


def test_unknown_loss_and_missing_weights_are_refused():
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss("focal")
    with pytest.raises(ValueError, match="class_weights"):
        build_loss("weighted_ce")


def test_dice_ce_term_weights():
    target = torch.randint(0, 3, (2, 6, 6))
    logits = torch.randn(2, 3, 6, 6)
    ce = F.cross_entropy(logits, target)
    assert build_loss("dice_ce", dice_weight=0.0)(logits, target).item() == pytest.approx(ce.item(), rel=1e-6)
    both = build_loss("dice_ce")(logits, target).item()
    dice_only = build_loss("dice_ce", ce_weight=0.0)(logits, target).item()
    assert both == pytest.approx(ce.item() + dice_only, rel=1e-6)
