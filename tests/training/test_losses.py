"""The dual VCNet loss on hand-made tensors (spec 6.4, defect 12)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from training.losses import agreement_target, masked_cross_entropy, vcnet_loss


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
