"""The dual VCNet loss on hand-made tensors (docs/design.md §6.4, defect 12)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from training.losses import RecipeLoss, agreement_target, masked_cross_entropy, mean_entropy, mix_loss, vcnet_loss


def one_hot_logits(classes, num_classes=5, scale=4.0):
    """(1, K, H, W) logits whose argmax is ``classes`` (a nested list of ints)."""
    idx = torch.tensor(classes)
    return (F.one_hot(idx, num_classes).permute(2, 0, 1).float() * scale).unsqueeze(0)


def test_agreement_target_keeps_only_agreeing_pixels():
    target = torch.tensor([[[1, 2], [3, 0]]])
    cnn = one_hot_logits([[1, 3], [3, 3]])
    assert agreement_target(cnn, target).tolist() == [[[1, 0], [3, 0]]]


def test_loss_matches_hand_computation():
    target = torch.tensor([[[1, 2], [3, 0]]])
    cnn = one_hot_logits([[1, 3], [3, 3]])  # agrees at (0,0) and (1,0); (1,1) is ignore
    vit = torch.randn(1, 5, 2, 2, generator=torch.Generator().manual_seed(0))
    terms = vcnet_loss(vit, cnn, target)
    ce = lambda logits, y, x: -torch.log_softmax(logits[0, :, y, x], 0)[int(target[0, y, x])]  # noqa: E731
    cnn_expected = (ce(cnn, 0, 0) + ce(cnn, 0, 1) + ce(cnn, 1, 0)) / 3
    vit_expected = (ce(vit, 0, 0) + ce(vit, 1, 0)) / 2
    assert torch.allclose(terms.cnn, cnn_expected)
    assert torch.allclose(terms.vit, vit_expected)
    assert torch.allclose(terms.total, 0.5 * cnn_expected + 0.5 * vit_expected)
    assert terms.aux is None


def test_masked_ce_equals_torch_mean_when_pixels_are_valid():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 8, 8, generator=g)
    target = torch.randint(0, 5, (2, 8, 8), generator=g)
    assert torch.allclose(masked_cross_entropy(logits, target), F.cross_entropy(logits, target, ignore_index=0))


def test_no_valid_pixel_gives_zero_not_nan():
    target = torch.tensor([[[1, 1], [2, 2]]])
    cnn = one_hot_logits([[3, 3], [3, 3]]).requires_grad_()  # disagrees everywhere
    vit = torch.zeros(1, 5, 2, 2, requires_grad=True)
    terms = vcnet_loss(vit, cnn, target)
    assert terms.vit.item() == 0.0 and math.isfinite(terms.total.item())
    terms.total.backward()
    assert torch.count_nonzero(vit.grad) == 0
    assert torch.isfinite(cnn.grad).all()

    all_ignored = torch.zeros(1, 2, 2, dtype=torch.long)
    cnn2 = torch.zeros(1, 5, 2, 2, requires_grad=True)
    terms = vcnet_loss(vit, cnn2, all_ignored)
    assert terms.total.item() == 0.0
    terms.total.backward()
    assert torch.count_nonzero(cnn2.grad) == 0


def test_vit_gradient_only_on_agreeing_pixels_and_cnn_mask_has_no_gradient():
    target = torch.tensor([[[1, 2], [3, 4]]])
    cnn = one_hot_logits([[1, 1], [3, 1]]).requires_grad_()
    vit = torch.zeros(1, 5, 2, 2, requires_grad=True)
    vcnet_loss(vit, cnn, target).total.backward()
    grad = vit.grad.abs().sum(1)[0]
    assert grad[0, 0] > 0 and grad[1, 0] > 0
    assert grad[0, 1] == 0 and grad[1, 1] == 0
    # The CNN gradient comes from its own CE only: 0.5 * d CE_cnn.
    expected = torch.autograd.grad(0.5 * masked_cross_entropy(cnn, target), cnn)[0]
    assert torch.allclose(cnn.grad, expected)


def test_aux_term_weight():
    g = torch.Generator().manual_seed(2)
    target = torch.randint(0, 5, (2, 4, 4), generator=g)
    vit, cnn, aux = (torch.randn(2, 5, 4, 4, generator=g) for _ in range(3))
    plain = vcnet_loss(vit, cnn, target)
    with_aux = vcnet_loss(vit, cnn, target, aux)
    assert torch.allclose(with_aux.total, plain.total + 0.4 * masked_cross_entropy(aux, target))
    assert torch.allclose(with_aux.aux, masked_cross_entropy(aux, target))


def test_bfloat16_logits_are_reduced_in_float32():
    g = torch.Generator().manual_seed(3)
    target = torch.randint(1, 5, (2, 16, 16), generator=g)
    vit, cnn = (torch.randn(2, 5, 16, 16, generator=g) for _ in range(2))
    ref = vcnet_loss(vit, cnn, target).total
    low = vcnet_loss(vit.bfloat16(), cnn.bfloat16(), target).total
    assert low.dtype == torch.float32 and torch.allclose(low, ref, atol=0.05)


# ---------------------------------------------------------------------------- the mix (label super-resolution) loss

MIX = torch.tensor([[0, 0, 0, 0, 0],            # code 0: no data
                    [0, 0, 0.5, 0.5, 0],        # code 1: half tree, half low vegetation
                    [0, 0, 0, 0.9, 0.1]])       # code 2: 90% low vegetation, 10% impervious


def logits_of(classes, strength=30.0):
    """Confident logits for a (B, H, W) class map."""
    return torch.nn.functional.one_hot(torch.as_tensor(classes), 5).permute(0, 3, 1, 2).float() * strength


def test_mix_loss_lets_the_network_place_the_minority_classes():
    """Any pixel assignment with the code's mix scores the minimum (the mix's entropy); the majority
    class everywhere, which hard labels would teach, scores worse."""
    codes = torch.ones(1, 2, 2, dtype=torch.long)
    best = -(0.5 * math.log(0.5)) * 2
    for arrangement in ([[2, 3], [3, 2]], [[2, 2], [3, 3]]):
        assert mix_loss(logits_of([arrangement]), codes, MIX, cell=2).item() == pytest.approx(best, abs=1e-4)
    assert mix_loss(torch.zeros(1, 5, 2, 2).index_fill_(1, torch.tensor([2, 3]), 30.0), codes, MIX,
                    cell=2).item() == pytest.approx(best, abs=1e-3)
    assert mix_loss(logits_of([[[2, 2], [2, 2]]]), codes, MIX, cell=2).item() > best + 2


def test_mix_loss_groups_by_cell_code_and_chip_weighted_by_pixels():
    codes = torch.tensor([[[1, 1, 2, 0], [1, 1, 2, 2]]])            # one chip, 2 x 4, cells of 2
    classes = torch.tensor([[[2, 3, 3, 1], [3, 2, 4, 3]]])
    probs = torch.softmax(logits_of(classes, 3.0), dim=1)
    groups = {(0, 1): [(0, 0), (0, 1), (1, 0), (1, 1)], (1, 2): [(0, 2), (1, 2), (1, 3)]}  # (cell, code): pixels
    total, pixels = 0.0, 0
    for (_, code), where in groups.items():
        mean = torch.stack([probs[0, :, r, c] for r, c in where]).mean(0)
        total += -(MIX[code] * torch.log(mean.clamp_min(1e-6))).sum().item() * len(where)
        pixels += len(where)
    got = mix_loss(logits_of(classes, 3.0), codes, MIX, cell=2).item()
    assert got == pytest.approx(total / pixels, rel=1e-5)  # the no-data pixel (code 0) is left out
    two = mix_loss(logits_of(torch.cat([classes, classes]), 3.0), torch.cat([codes, codes]), MIX, cell=2)
    assert two.item() == pytest.approx(got, rel=1e-5)  # chips are separate groups, same figure


def test_mix_loss_without_mix_pixels_is_zero_with_zero_gradient():
    logits = torch.randn(1, 5, 3, 3, requires_grad=True)
    loss = mix_loss(logits, torch.zeros(1, 3, 3, dtype=torch.long), MIX, cell=3)
    loss.backward()
    assert loss.item() == 0 and torch.all(logits.grad == 0)


def test_recipe_loss_hard_is_the_published_loss_and_entropy_adds():
    g = torch.Generator().manual_seed(4)
    target = torch.randint(0, 5, (2, 8, 8), generator=g)
    vit, cnn = (torch.randn(2, 5, 8, 8, generator=g) for _ in range(2))
    published = vcnet_loss(vit, cnn, target)
    assert torch.equal(RecipeLoss("hard")((vit, cnn), target).total, published.total)
    valid = target != 0
    entropy = 0.5 * (mean_entropy(cnn, valid) + mean_entropy(vit, valid))
    with_entropy = RecipeLoss("hard", entropy_weight=0.2)((vit, cnn), target)
    assert torch.allclose(with_entropy.total, published.total + 0.2 * entropy)
    codes = torch.randint(0, 3, (2, 8, 8), generator=g)
    mixed = RecipeLoss("mix", mix_table=MIX, mix_cell=4)((vit, cnn), target, codes)
    expected = 0.5 * mix_loss(cnn, codes, MIX, 4) + 0.5 * mix_loss(vit, codes, MIX, 4)
    assert torch.allclose(mixed.total, expected) and torch.allclose(mixed.cnn, mix_loss(cnn, codes, MIX, 4))
    with pytest.raises(ValueError, match="mix table"):
        RecipeLoss("mix")


def test_class_weights_weigh_the_cross_entropy_and_the_mix_groups():
    g = torch.Generator().manual_seed(6)
    target = torch.randint(1, 5, (2, 6, 6), generator=g)
    logits = torch.randn(2, 5, 6, 6, generator=g)
    weight = torch.tensor([0.0, 1.0, 0.5, 2.0, 8.0])
    expected = F.cross_entropy(logits, target, weight=weight)  # torch's weighted mean
    assert torch.allclose(masked_cross_entropy(logits, target, weight=weight), expected)
    codes = torch.tensor([[[1, 1], [2, 2]]])
    logits = torch.randn(1, 5, 2, 2, generator=g)
    per_code = [mix_loss(logits[:, :, r:r + 1], codes[:, r:r + 1], MIX, cell=2) for r in (0, 1)]
    group_weight = MIX[1:] @ weight  # code 1: 0.5*0.5 + 0.5*2; code 2: 0.9*2 + 0.1*8
    weighted = mix_loss(logits, codes, MIX, cell=2, class_weights=weight)
    assert torch.allclose(weighted, (per_code[0] * group_weight[0] + per_code[1] * group_weight[1]) / group_weight.sum())


def test_gce_matches_its_formula_and_weighs_confident_disputes_less_than_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 4, 4, requires_grad=True)
    target = torch.randint(1, 5, (2, 4, 4))
    target[0, 0, 0] = 0  # ignored
    weight = torch.tensor([0.0, 1.0, 2.0, 0.5, 3.0])
    p = torch.softmax(logits, 1).gather(1, target.unsqueeze(1)).squeeze(1)
    per_pixel = (1 - p ** 0.7) / 0.7 * weight[target] * (target != 0)
    expected = per_pixel.sum() / (weight[target] * (target != 0)).sum()
    assert torch.allclose(masked_cross_entropy(logits, target, weight=weight, gce_q=0.7), expected, atol=1e-6)
    # q -> 0 is cross-entropy
    assert math.isclose(masked_cross_entropy(logits, target, gce_q=1e-5).item(),
                        masked_cross_entropy(logits, target).item(), rel_tol=1e-3)
    # a pixel whose label the network confidently disputes pulls less under GCE than under CE
    disputed = torch.tensor([[8.0, -8.0]]).view(1, 2, 1, 1).requires_grad_()
    label = torch.ones(1, 1, 1, dtype=torch.long)
    grad_ce = torch.autograd.grad(masked_cross_entropy(disputed, label, ignore_index=-1), disputed)[0]
    grad_gce = torch.autograd.grad(masked_cross_entropy(disputed, label, ignore_index=-1, gce_q=0.7), disputed)[0]
    assert grad_gce.abs().max() < 1e-3 * grad_ce.abs().max()


@pytest.mark.parametrize("setting", [{}, {"gce_q": 0.7}, {"focal_gamma": 1.0}])
def test_weighted_losses_take_an_ignore_index_outside_the_classes(setting):
    torch.manual_seed(4)
    logits = torch.randn(1, 3, 2, 2)
    weight = torch.tensor([1.0, 2.0, 3.0])
    outside = torch.tensor([[[1, 255], [2, 0]]])
    inside = torch.tensor([[[1, 0], [2, 0]]])  # the same pixel as class 0: counted, so the loss differs
    expected = masked_cross_entropy(logits, torch.where(outside == 255, -1, outside), ignore_index=-1,
                                    weight=weight, **setting)
    assert torch.allclose(masked_cross_entropy(logits, outside, ignore_index=255, weight=weight, **setting), expected)
    assert not torch.allclose(masked_cross_entropy(logits, inside, ignore_index=255, weight=weight, **setting),
                              expected)


def test_focal_matches_its_formula_and_weighs_well_predicted_pixels_less_than_cross_entropy():
    torch.manual_seed(2)
    logits = torch.randn(2, 5, 4, 4)
    target = torch.randint(1, 5, (2, 4, 4))
    target[1, 2, 3] = 0  # ignored
    weight = torch.tensor([0.0, 1.0, 2.0, 0.5, 3.0])
    p = torch.softmax(logits, 1).gather(1, target.unsqueeze(1)).squeeze(1)
    per_pixel = -(1 - p) ** 2 * p.log() * weight[target] * (target != 0)
    expected = per_pixel.sum() / (weight[target] * (target != 0)).sum()
    assert torch.allclose(masked_cross_entropy(logits, target, weight=weight, focal_gamma=2.0), expected, atol=1e-6)
    # gamma -> 0 is cross-entropy
    assert math.isclose(masked_cross_entropy(logits, target, focal_gamma=1e-6).item(),
                        masked_cross_entropy(logits, target).item(), rel_tol=1e-4)
    # a pixel already right (p = 0.98) pulls far less against a wrong one than under cross-entropy
    both = torch.tensor([[4.0, -4.0], [-4.0, 4.0]]).T.reshape(1, 2, 1, 2).requires_grad_()
    label = torch.zeros(1, 1, 2, dtype=torch.long)  # right at pixel 0, wrong at pixel 1
    grad_ce = torch.autograd.grad(masked_cross_entropy(both, label, ignore_index=-1), both)[0]
    grad_focal = torch.autograd.grad(masked_cross_entropy(both, label, ignore_index=-1, focal_gamma=1.0), both)[0]
    ratio_ce = grad_ce[0, 0, 0, 0].abs() / grad_ce[0, 0, 0, 1].abs()
    ratio_focal = grad_focal[0, 0, 0, 0].abs() / grad_focal[0, 0, 0, 1].abs()
    assert ratio_focal < 0.1 * ratio_ce


def test_focal_gradient_is_finite_on_certain_and_ignored_pixels():
    logits = torch.tensor([[[[200.0, 0.0]]], [[[-200.0, 0.0]]]]).permute(1, 0, 2, 3).requires_grad_()  # p = 1 at pixel 0
    target = torch.tensor([[[0, 1]]])  # pixel 0 right and certain, pixel 1 ignored (index 1)
    for gamma in (0.5, 1.0, 2.0):
        loss = masked_cross_entropy(logits, target, ignore_index=1, focal_gamma=gamma)
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
    with pytest.raises(ValueError, match="give one"):
        masked_cross_entropy(logits, target, gce_q=0.7, focal_gamma=1.0)


@pytest.mark.parametrize("label_loss, setting", [("gce", {"gce_q": 0.5}), ("focal", {"focal_gamma": 1.5})])
def test_recipe_loss_gce_and_focal_use_the_dual_structure(label_loss, setting):
    torch.manual_seed(1)
    vit, cnn = torch.randn(2, 5, 8, 8), torch.randn(2, 5, 8, 8)
    target = torch.randint(0, 5, (2, 8, 8))
    terms = RecipeLoss(label_loss, **setting)((vit, cnn), target)
    assert torch.allclose(terms.cnn, masked_cross_entropy(cnn, target, **setting))
    assert torch.allclose(terms.vit, masked_cross_entropy(vit, agreement_target(cnn, target), **setting))
    assert torch.allclose(terms.total, 0.5 * terms.cnn + 0.5 * terms.vit)
