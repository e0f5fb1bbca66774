"""--augment d4: the eight orientations of a chip, the same for its image and labels, reproducible."""

from __future__ import annotations

import torch

from training.augment import random_d4


def test_image_labels_and_codes_turn_together_through_all_eight_orientations():
    torch.manual_seed(0)
    chip = torch.arange(16).view(1, 1, 4, 4).repeat(64, 3, 1, 1)
    label = chip[:, 0].clone()
    image, turned_label, none = random_d4(chip, label, None)
    assert none is None and image.shape == chip.shape
    assert torch.equal(image[:, 0], turned_label) and torch.equal(image[:, 1], image[:, 2])
    orientations = {tuple(x.flatten().tolist()) for x in turned_label}
    assert len(orientations) == 8  # 64 draws reach every element of D4
    for x in turned_label:  # each is a rotation or reflection of the original, never a scramble
        assert any(torch.equal(x, torch.rot90(label[0], k, (0, 1)).flip(-1) if flip else
                               torch.rot90(label[0], k, (0, 1))) for k in range(4) for flip in (0, 1))


def test_draws_follow_the_torch_seed():
    chip = torch.arange(16.0).view(1, 1, 4, 4).repeat(8, 1, 1, 1)
    torch.manual_seed(5)
    first = random_d4(chip)[0]
    torch.manual_seed(5)
    assert torch.equal(random_d4(chip)[0], first)
