"""Chip augmentation on the device: the eight flips and 90-degree rotations of a square (``--augment d4``).

Land cover has no preferred orientation in a nadir image, so every chip may be seen in any of the
eight orientations. The draws come from the global torch RNG, which the trainer reseeds from
``(seed, epoch, rank)``, so a resumed run draws the same orientations.
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
