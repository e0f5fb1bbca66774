"""Chip augmentation on the device.

* ``--augment d4``: the eight flips and 90-degree rotations of a square. Land cover has no
  preferred orientation in a nadir image, so every chip may be seen in any of the eight.
* ``--jitter S``: a random gain and offset per chip and band on the normalised image. Aerial
  flights differ in sun, season and radiometric processing from one tile (or strip) to the next,
  and the network should not tie a class to one tile's brightness.

The draws come from the global torch RNG, which the trainer reseeds from ``(seed, epoch, rank)``,
so a resumed run draws the same augmentations.
"""

from __future__ import annotations

import torch


def random_d4(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Turn each chip of a batch by a random element of the dihedral group D4.

    Args:
        tensors: ``(B, ..., S, S)`` tensors of the same chips (image, labels, codes); None passes
            through. All get the same orientation per chip.
    """
    first = next(t for t in tensors if t is not None)
    draws = torch.randint(0, 8, (first.shape[0],)).tolist()
    out = []
    for tensor in tensors:
        if tensor is None:
            out.append(None)
            continue
        chips = []
        for chip, draw in zip(tensor, draws):
            turned = torch.rot90(chip, draw % 4, dims=(-2, -1))
            chips.append(turned.flip(-1) if draw >= 4 else turned)
        out.append(torch.stack(chips))
    return tuple(out)


def random_jitter(image: torch.Tensor, strength: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``image * gain + offset`` per chip and band, gain in ``1 +- strength``, offset in ``+- strength``.

    Args:
        image: ``(B, bands, H, W)`` normalised chips (zero mean, unit spread per band).
        strength: 0 returns ``image`` unchanged.
        generator: CPU generator of the draws (default: the global torch RNG).
    """
    if not strength:
        return image
    shape = (image.shape[0], image.shape[1], 1, 1)
    gain = 1.0 + strength * (2.0 * torch.rand(shape, generator=generator) - 1.0)
    offset = strength * (2.0 * torch.rand(shape, generator=generator) - 1.0)
    return image * gain.to(image) + offset.to(image)
