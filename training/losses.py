"""The VCNet training loss (spec 6.4, defect 12 fixed).

``loss = 0.5 * CE(cnn_logits, LR) + 0.5 * CE(vit_logits, LR where argmax(cnn_logits) == LR)``,
both with ignore index 0 and averaged over their non-ignored pixels. The ViT branch learns only
where the CNN branch already agrees with the low-resolution label. A term with no valid pixel is 0
(with zero gradient), never NaN. An optional auxiliary FCN head adds ``aux_weight * CE(aux, LR)``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = 0
AUX_WEIGHT = 0.4


class LossTerms(NamedTuple):
    """The total loss (with graph) and its terms (detached scalars, for logging)."""

    total: torch.Tensor
    cnn: torch.Tensor
    vit: torch.Tensor
    aux: torch.Tensor | None


def masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Cross-entropy averaged over the pixels whose target is not ``ignore_index``; 0 when none is.

    Args:
        logits: ``(B, K, H, W)`` (any float dtype; computed in float32).
        target: ``(B, H, W)`` int64 class indices.

    Returns:
        A scalar with a graph to ``logits``. Unlike ``F.cross_entropy(reduction="mean")`` it is
        never NaN: with no valid pixel both the sum and its gradient are zero. No host sync.
    """
    total = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum")
    count = (target != ignore_index).sum().clamp_min(1)
    return total / count


def agreement_target(cnn_logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``target`` where the CNN branch's argmax equals it, ``ignore_index`` elsewhere (no gradient)."""
    with torch.no_grad():
        agree = cnn_logits.argmax(dim=1) == target
    return torch.where(agree, target, torch.full_like(target, ignore_index))


def vcnet_loss(vit_logits: torch.Tensor, cnn_logits: torch.Tensor, target: torch.Tensor,
               aux_logits: torch.Tensor | None = None, *, aux_weight: float = AUX_WEIGHT,
               ignore_index: int = IGNORE_INDEX) -> LossTerms:
    """The published dual loss, plus the optional auxiliary term.

    Args:
        vit_logits, cnn_logits: ``(B, K, H, W)`` in the model's output order.
        target: ``(B, H, W)`` LR class indices (0 = ignore).
        aux_logits: ``(B, K, H, W)`` of the auxiliary FCN head, or None (published: no aux loss).
        aux_weight: weight of the auxiliary term.

    Returns:
        :class:`LossTerms`; ``total = 0.5 * cnn + 0.5 * vit (+ aux_weight * aux)``.
    """
    cnn = masked_cross_entropy(cnn_logits, target, ignore_index)
    vit = masked_cross_entropy(vit_logits, agreement_target(cnn_logits, target, ignore_index), ignore_index)
    total = 0.5 * cnn + 0.5 * vit
    aux = None
    if aux_logits is not None:
        aux = masked_cross_entropy(aux_logits, target, ignore_index)
        total = total + aux_weight * aux
        aux = aux.detach()
    return LossTerms(total, cnn.detach(), vit.detach(), aux)
