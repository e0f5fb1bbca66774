"""Label refinement by local appearance (``--refine_labels local``).

An LR label gives one class to every 1 m pixel of a 30 m block, so a lawn inside a forest block is
labelled "tree canopy". A network with a wide receptive field learns the blocks themselves: it
reads "this is a forest area" from the context and paints the whole block tree canopy, on the
tiles it trained on and on new ones. A classifier that sees only a pixel and its 11 x 11
neighbourhood cannot learn the blocks; it learns what each class looks like, and because the
mislabelled pixels are a minority of their class's appearance, it outvotes them (class-balanced,
so that a rare class is not simply absorbed by a common one).

So before the first step small per-pixel classifiers (the pixel's bands and the local mean and
spread of each band, into a 32-unit hidden layer) are fitted to the LR labels of chips sampled from
the training tiles: several, each on its own sample of chips, whose log-probabilities are averaged
(bagging), because one classifier's choice on the ambiguous pixels varies with the chips it saw. During training each chip's label is replaced by that classifier's argmax
among the classes its LR code allows (the dataset's ``lr_mixes``: a forest block may hold tree
canopy and low vegetation, never water), and the network learns from the refined labels with its
usual loss. No-data pixels stay ignored. The classifier is fitted on the CPU from the run's seed,
so every rank, and a resumed run, gets the same one; it is stored in the checkpoint.

A class that the LR labels almost never give (impervious surfaces, where few blocks are coded
"developed" above open space) would never be learnt, by the classifiers or the network. With
``--refine_seeds`` the least vegetated pixels (lowest NDVI) of the codes whose mix holds some of the
dataset's non-vegetated class are given that class in the classifiers' targets
(:func:`seed_non_vegetated`), and the classifiers extend it to what looks like them.

With ``--refine_features ndvi`` the classifiers also see NDVI as one more band (:class:`NdviBand`).

The classifiers themselves live in ``networks/label_model.py``: a checkpoint carries them, and with
``--label_model_weight`` its maps use them too. This module fits them and refines the labels.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from networks.label_model import RADIUS, LocalLabelModel, NdviBand, local_features, ndvi
from training.losses import IGNORE_INDEX

FIT_STEPS = 300
FIT_BATCH = 8192
FIT_LR = 1e-2
#: Pixels drawn from each sampled chip to fit the classifier, and at most this many in all (memory).
PIXELS_PER_CHIP = 4096
MAX_FIT_PIXELS = 2_000_000


def seed_non_vegetated(raw: torch.Tensor, codes: torch.Tensor, label: torch.Tensor, shares: torch.Tensor,
                       red: int, nir: int, target: int) -> torch.Tensor:
    """LR labels with, in each chip, the lowest-NDVI ``shares[code]`` of each LR code's pixels set to ``target``.

    An LR code that expects some non-vegetated cover (NLCD's developed open space: under 20 %
    impervious) still labels every pixel with its majority class, so the local classifier never
    sees a road or a roof when the LR labels rarely say "developed". The least vegetated pixels of
    such a code are confident examples; a small share of them (a fraction of the code's expected
    share) is taken, so that the classifier, not the seeds, decides how far the class extends.
    """
    out = label.clone()
    index = ndvi(raw, red, nir)
    for chip in range(label.shape[0]):
        chip_codes, chip_index, chip_label = codes[chip].long().reshape(-1), index[chip].reshape(-1), out[chip].view(-1)
        for code in torch.unique(chip_codes).tolist():
            share = float(shares[code]) if code < len(shares) else 0.0
            if share <= 0:  # most codes (forests, fields) expect no non-vegetated cover
                continue
            where = torch.nonzero((chip_codes == code) & (chip_label != IGNORE_INDEX)).squeeze(1)
            count = int(round(share * len(where)))
            if count > 0:
                chip_label[where[torch.topk(-chip_index[where], count).indices]] = target
    return out


def fit_local_model(chips: Iterable[tuple[torch.Tensor, torch.Tensor]], classes: int, balance: float, seed: int,
                    radius: int = RADIUS, chip_count: int | None = None, ndvi: NdviBand | None = None
                    ) -> tuple[LocalLabelModel, dict[str, float]]:
    """Fit :class:`LocalLabelModel` to LR labels, on the CPU, reproducibly from ``seed``.

    Args:
        chips: ``(image, target)`` pairs: normalised ``(B, bands, S, S)`` float32 images, and either
            ``(B, S, S)`` int64 LR classes (0 = no data) or ``(B, S, S, classes)`` float class mixes
            (all zero = no data); pixels without a label are left out.
        classes: number of classes, no-data class 0 included.
        balance: class weights ``share ** -balance`` (1: every class counts as much in total).
        seed: seed of the pixel draws and of the initialisation.
        chip_count: how many chips ``chips`` yields at most, so that they can be read one batch at
            a time (only the drawn pixels' features are kept); None reads them all first to count.
        ndvi: NDVI as one more band of the features (``--refine_features ndvi``), or None.

    Returns:
        The model (eval mode) and figures for the log: ``pixels`` used and ``agreement``, the
        share of those pixels whose fitted class is their label's (majority) class.
    """
    generator = torch.Generator().manual_seed(seed)
    if chip_count is None:
        chips = list(chips)
        chip_count = sum(image.shape[0] for image, _ in chips)
    per_chip = max(1, min(PIXELS_PER_CHIP, MAX_FIT_PIXELS // max(1, chip_count)))
    features, targets = [], []
    for image, target in chips:
        feats = local_features(image, radius, ndvi)
        feats = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
        soft = F.one_hot(target, classes).float() if target.dtype == torch.int64 else target.float()
        soft = soft.reshape(-1, classes)
        soft[:, IGNORE_INDEX] = 0.0
        keep = torch.nonzero(soft.sum(dim=1) > 0).squeeze(1)
        per_batch = per_chip * image.shape[0]
        if len(keep) > per_batch:
            keep = keep[torch.randperm(len(keep), generator=generator)[:per_batch]]
        features.append(feats[keep])
        targets.append(soft[keep] / soft[keep].sum(dim=1, keepdim=True))
    x, y = torch.cat(features), torch.cat(targets)
    if len(y) == 0:
        raise ValueError("no labelled pixel to fit the label model")
    share = y.double().mean(dim=0)
    weights = torch.where(share > 0, share.clamp_min(1e-12) ** -balance, torch.zeros_like(share))
    weights = (weights / (weights * share).sum()).float()

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LocalLabelModel(x.shape[1] // 3 - (ndvi is not None), classes, radius, ndvi=ndvi)
    head = model.net  # the per-pixel layers, applied to drawn pixels as (N, F, 1, 1) inputs
    optimizer = torch.optim.Adam(model.parameters(), lr=FIT_LR)
    for _ in range(FIT_STEPS):
        pick = torch.randint(0, len(y), (min(FIT_BATCH, len(y)),), generator=generator)
        log_p = torch.log_softmax(head(x[pick][:, :, None, None])[:, :, 0, 0], dim=1)
        weighted = y[pick] * weights
        loss = -(weighted * log_p).sum() / weighted.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        fitted = head(x[:, :, None, None])[:, :, 0, 0]
        fitted[:, IGNORE_INDEX] = float("-inf")
        agreement = float((fitted.argmax(1) == y.argmax(1)).float().mean())
    return model, {"pixels": float(len(y)), "agreement": agreement}


class LabelRefiner:
    """Replaces each chip's LR classes by the local model's argmax among the classes its code allows."""

    def __init__(self, model: nn.Module, allowed: np.ndarray, device: torch.device) -> None:
        """``allowed``: ``(codes, classes)`` bool, the classes each raw LR code may hold."""
        self.model = model.to(device).eval()
        self.allowed = torch.from_numpy(np.asarray(allowed, dtype=bool)).to(device)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, codes: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Refined ``(B, H, W)`` int64 labels of normalised chips ``x``; no-data pixels stay 0."""
        logits = self.model(x).float()
        allowed = self.allowed[codes.long()].permute(0, 3, 1, 2)
        refined = logits.masked_fill(~allowed, float("-inf")).argmax(dim=1)
        return torch.where(label == IGNORE_INDEX, label, refined)
