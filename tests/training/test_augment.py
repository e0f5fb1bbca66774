"""--augment d4: the eight orientations of a chip, the same for its image and labels, reproducible."""

from __future__ import annotations

import torch

from training.augment import random_d4, random_jitter


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


def test_jitter_is_a_gain_and_offset_per_chip_and_band_within_its_strength():
    torch.manual_seed(3)
    image = torch.randn(16, 4, 8, 8)
    assert random_jitter(image, 0.0) is image
    out = random_jitter(image, 0.2)
    flat_in, flat_out = image.flatten(2), out.flatten(2)
    # recover gain and offset of each (chip, band) by least squares: exact affine maps
    x_mean, y_mean = flat_in.mean(-1, keepdim=True), flat_out.mean(-1, keepdim=True)
    gain = ((flat_in - x_mean) * (flat_out - y_mean)).sum(-1) / ((flat_in - x_mean) ** 2).sum(-1)
    offset = y_mean.squeeze(-1) - gain * x_mean.squeeze(-1)
    assert torch.allclose(flat_out, flat_in * gain[..., None] + offset[..., None], atol=1e-5)
    assert (gain - 1).abs().max() <= 0.2 + 1e-5 and offset.abs().max() <= 0.2 + 1e-5
    # drawn per chip (differs across chips for every band) and per band (differs within every chip)
    assert gain.std(dim=0).min() > 0.05 and gain.std(dim=1).min() > 0.01 and offset.std(dim=0).min() > 0.05
