"""The VCNet training loss (docs/design.md §6.4, defect 12 fixed).

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


def masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                         weight: torch.Tensor | None = None, gce_q: float | None = None,
                         focal_gamma: float | None = None) -> torch.Tensor:
    """Cross-entropy averaged over the pixels whose target is not ``ignore_index``; 0 when none is.

    Args:
        logits: ``(B, K, H, W)`` (any float dtype; computed in float32).
        target: ``(B, H, W)`` int64 class indices.
        weight: optional ``(K,)`` class weights; the average is then weighted by the target's weight.
        gce_q: None for cross-entropy, else the generalised cross-entropy ``(1 - p_target ** q) / q``
            (Zhang and Sabuncu, NeurIPS 2018): it tends to cross-entropy as ``q -> 0`` and to the mean
            absolute error at ``q = 1``, so a pixel the network confidently disputes (a lawn inside
            a forest block) pulls less than under cross-entropy.
        focal_gamma: None, or the focal loss ``-(1 - p_target) ** gamma * log p_target`` (Lin et al.,
            ICCV 2017; not with ``gce_q``): pixels the network already gets right pull less, so once
            the common classes are learnt, a rare class's pixels carry more of the gradient.

    Returns:
        A scalar with a graph to ``logits``. Unlike ``F.cross_entropy(reduction="mean")`` it is
        never NaN: with no valid pixel both the sum and its gradient are zero. No host sync.
    """
    if gce_q is not None and focal_gamma is not None:
        raise ValueError("gce_q and focal_gamma are two different losses; give one")
    valid = target != ignore_index
    # ignored pixels may hold any index (-1, 255): look up and gather at a valid one, then mask them out
    safe = torch.where(valid, target, torch.zeros_like(target))
    if gce_q is None and focal_gamma is None:
        total = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum", weight=weight)
    else:
        log_p = torch.log_softmax(logits.float(), dim=1).gather(1, safe.unsqueeze(1)).squeeze(1)
        if gce_q is not None:
            per_pixel = (1.0 - torch.exp(gce_q * log_p)) / gce_q
        else:
            # 1 - p as -expm1(log p), floored so that (1 - p) ** gamma has a finite gradient at p = 1
            per_pixel = -(-torch.expm1(log_p)).clamp_min(1e-12) ** focal_gamma * log_p
        if weight is not None:
            per_pixel = per_pixel * weight[safe]
        total = (per_pixel * valid).sum()
    if weight is None:
        return total / valid.sum().clamp_min(1)
    return total / (weight[safe] * valid).sum().clamp_min(1e-12)


def agreement_target(cnn_logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``target`` where the CNN branch's argmax equals it, ``ignore_index`` elsewhere (no gradient)."""
    with torch.no_grad():
        agree = cnn_logits.argmax(dim=1) == target
    return torch.where(agree, target, torch.full_like(target, ignore_index))


def vcnet_loss(vit_logits: torch.Tensor, cnn_logits: torch.Tensor, target: torch.Tensor,
               aux_logits: torch.Tensor | None = None, *, aux_weight: float = AUX_WEIGHT,
               ignore_index: int = IGNORE_INDEX, class_weights: torch.Tensor | None = None,
               gce_q: float | None = None, focal_gamma: float | None = None) -> LossTerms:
    """The published dual loss, plus the optional auxiliary term.

    Args:
        vit_logits, cnn_logits: ``(B, K, H, W)`` in the model's output order.
        target: ``(B, H, W)`` LR class indices (0 = ignore).
        aux_logits: ``(B, K, H, W)`` of the auxiliary FCN head, or None (published: no aux loss).
        aux_weight: weight of the auxiliary term.
        class_weights: optional ``(K,)`` weights of the cross-entropies (``--class_balance``);
            None as published.
        gce_q: None (published), or the ``q`` of a generalised cross-entropy in place of both
            cross-entropies (``--label_loss gce``); the auxiliary term keeps cross-entropy.
        focal_gamma: None (published), or the ``gamma`` of a focal loss in place of both
            cross-entropies (``--label_loss focal``); the auxiliary term keeps cross-entropy.

    Returns:
        :class:`LossTerms`; ``total = 0.5 * cnn + 0.5 * vit (+ aux_weight * aux)``.
    """
    cnn = masked_cross_entropy(cnn_logits, target, ignore_index, class_weights, gce_q, focal_gamma)
    vit = masked_cross_entropy(vit_logits, agreement_target(cnn_logits, target, ignore_index), ignore_index,
                               class_weights, gce_q, focal_gamma)
    total = 0.5 * cnn + 0.5 * vit
    aux = None
    if aux_logits is not None:
        aux = masked_cross_entropy(aux_logits, target, ignore_index, class_weights)
        total = total + aux_weight * aux
        aux = aux.detach()
    return LossTerms(total, cnn.detach(), vit.detach(), aux)


def mix_loss(logits: torch.Tensor, codes: torch.Tensor, mix_table: torch.Tensor, cell: int,
             class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Label super-resolution loss: the pixels of one LR code inside one ``cell x cell`` square must
    together show that code's expected class mix (Malkin et al., ICLR 2019, simplified).

    An LR pixel says only which mix of classes its footprint holds ("developed, open space: under
    20% impervious, mostly lawn"), not which class each HR pixel has. So instead of forcing every
    pixel to the LR pixel's majority class, the mean predicted distribution of each group (chip,
    cell, code) is scored by cross-entropy against the code's mix, weighted by the group's pixel
    count. The network is free to place the minority classes (a road, a roof) where the image
    shows them.

    Args:
        logits: ``(B, K, H, W)``.
        codes: ``(B, H, W)`` raw LR codes (int64), each a row of ``mix_table``.
        mix_table: ``(codes, K)`` float32 from :meth:`dataset.DatasetDefinition.mix_table`; an
            all-zero row (no data) excludes the pixel.
        cell: side of the square cells, in pixels (about one LR pixel: 30 for NLCD at 1 m).
        class_weights: optional ``(K,)`` class weights; a group then weighs ``mix . class_weights``
            per pixel.

    Returns:
        A scalar with a graph to ``logits``; 0 when no pixel has a mix.
    """
    batch, classes, height, width = logits.shape
    probs = torch.softmax(logits.float(), dim=1).permute(0, 2, 3, 1).reshape(-1, classes)
    rows = (torch.arange(height, device=logits.device) // cell).view(1, -1, 1)
    cols = (torch.arange(width, device=logits.device) // cell).view(1, 1, -1)
    chips = torch.arange(batch, device=logits.device).view(-1, 1, 1)
    cells_per_row = -(-width // cell)
    cell_index = (chips * -(-height // cell) + rows) * cells_per_row + cols
    keys = (cell_index * mix_table.shape[0] + codes).reshape(-1)
    target = mix_table[codes.reshape(-1)]
    valid = target.sum(dim=1) > 0
    if not bool(valid.any()):
        return logits.sum() * 0.0
    groups, inverse = torch.unique(keys[valid], return_inverse=True)
    counts = torch.bincount(inverse, minlength=len(groups)).to(probs.dtype)
    mean = torch.zeros(len(groups), classes, dtype=probs.dtype, device=probs.device).index_add_(0, inverse, probs[valid])
    mean = mean / counts[:, None]
    mix = torch.zeros_like(mean).index_add_(0, inverse, target[valid]) / counts[:, None]
    per_group = -(mix * torch.log(mean.clamp_min(1e-6))).sum(dim=1)
    weight = counts if class_weights is None else counts * (mix @ class_weights.to(mix.dtype))
    return (per_group * weight).sum() / weight.sum().clamp_min(1e-12)


def mean_entropy(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean per-pixel entropy of ``softmax(logits)`` over the ``valid`` (B, H, W) pixels; pushes a
    mix-trained network to commit each pixel to one class."""
    log_p = torch.log_softmax(logits.float(), dim=1)
    entropy = -(log_p.exp() * log_p).sum(dim=1)
    return (entropy * valid).sum() / valid.sum().clamp_min(1)


class RecipeLoss:
    """The loss a recipe trains with, from the model's outputs ``(vit, cnn[, aux])``.

    ``label_loss="hard"`` is :func:`vcnet_loss` (published); ``"gce"`` is the same with the generalised
    cross-entropy of exponent ``gce_q``, ``"focal"`` with the focal loss of exponent ``focal_gamma``;
    ``"mix"`` scores both branches with
    :func:`mix_loss`. ``entropy_weight`` adds the mean entropy of both branches; ``class_weights``
    weighs every term by class. The auxiliary head, when present, keeps the hard cross-entropy.
    """

    def __init__(self, label_loss: str = "hard", *, mix_table: torch.Tensor | None = None, mix_cell: int = 30,
                 entropy_weight: float = 0.0, class_weights: torch.Tensor | None = None,
                 aux_weight: float = AUX_WEIGHT, gce_q: float = 0.7, focal_gamma: float = 1.0) -> None:
        if label_loss == "mix" and mix_table is None:
            raise ValueError("label_loss 'mix' needs a mix table")
        self.label_loss = label_loss
        self.mix_table = mix_table
        self.mix_cell = mix_cell
        self.entropy_weight = entropy_weight
        self.class_weights = class_weights
        self.aux_weight = aux_weight
        self.gce_q = gce_q
        self.focal_gamma = focal_gamma

    def __call__(self, outputs: tuple[torch.Tensor, ...], target: torch.Tensor,
                 codes: torch.Tensor | None = None) -> LossTerms:
        vit_logits, cnn_logits = outputs[0], outputs[1]
        aux_logits = outputs[2] if len(outputs) > 2 else None
        if self.label_loss in ("hard", "gce", "focal"):
            terms = vcnet_loss(vit_logits, cnn_logits, target, aux_logits, aux_weight=self.aux_weight,
                               class_weights=self.class_weights,
                               gce_q=self.gce_q if self.label_loss == "gce" else None,
                               focal_gamma=self.focal_gamma if self.label_loss == "focal" else None)
        else:
            cnn = mix_loss(cnn_logits, codes, self.mix_table, self.mix_cell, self.class_weights)
            vit = mix_loss(vit_logits, codes, self.mix_table, self.mix_cell, self.class_weights)
            total, aux = 0.5 * cnn + 0.5 * vit, None
            if aux_logits is not None:
                aux = masked_cross_entropy(aux_logits, target, weight=self.class_weights)
                total = total + self.aux_weight * aux
                aux = aux.detach()
            terms = LossTerms(total, cnn.detach(), vit.detach(), aux)
        if self.entropy_weight:
            valid = target != IGNORE_INDEX
            entropy = 0.5 * (mean_entropy(cnn_logits, valid) + mean_entropy(vit_logits, valid))
            terms = terms._replace(total=terms.total + self.entropy_weight * entropy)
        return terms
