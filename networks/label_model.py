"""The local-appearance label model of ``--refine_labels local`` (docs/training.md).

Small per-pixel classifiers of a pixel's bands and their mean and spread over its 11 x 11
neighbourhood (1 x 1 convolutions: an MLP per pixel), several of them bagged. Training fits them to
the LR labels and uses them to refine those labels (``training.refine``); a checkpoint stores them
(``label_model``), and with ``--label_model_weight`` its maps add their log-probabilities to the
network's logits (:class:`LabelModelVote`). They live here, below both training and mapping.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

#: Half-side of the neighbourhood whose mean and spread describe a pixel (11 x 11 at 5).
RADIUS = 5
HIDDEN = 32


def local_features(x: torch.Tensor, radius: int = RADIUS, ndvi: NdviBand | None = None) -> torch.Tensor:
    """``(B, 3C, H, W)``: each band, its mean and its standard deviation over the ``2r+1`` square
    around the pixel (the part of the square inside the chip); with ``ndvi``, of the bands and NDVI."""
    side = 2 * radius + 1
    x = x.float() if ndvi is None else ndvi(x)
    mean = F.avg_pool2d(x, side, stride=1, padding=radius, count_include_pad=False)
    square = F.avg_pool2d(x * x, side, stride=1, padding=radius, count_include_pad=False)
    return torch.cat([x, mean, (square - mean * mean).clamp_min(0).sqrt()], dim=1)


def ndvi(raw: torch.Tensor, red: int, nir: int) -> torch.Tensor:
    """``(B, H, W)`` normalised difference vegetation index of raw ``(B, bands, H, W)`` pixels."""
    r, n = raw[:, red].float(), raw[:, nir].float()
    return (n - r) / (n + r).clamp_min(1e-6)


class NdviBand(nn.Module):
    """Appends NDVI as one more band to normalised ``(B, bands, H, W)`` images (``--refine_features ndvi``).

    The raw red and NIR values are recovered from the dataset's normalisation; the index is centred
    and scaled (``(ndvi - 0.2) / 0.2``, about unit spread over vegetated NAIP pixels) to sit beside
    the normalised bands. A ratio of two bands, it moves less than either band when a flight is
    brighter or darker. The constants are the dataset's, so it holds no state of its own.
    """

    CENTRE, SCALE = 0.2, 0.2

    def __init__(self, red: int, nir: int, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.red, self.nir = red, nir
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        index = ndvi(x * self.std + self.mean, self.red, self.nir)
        return torch.cat([x, ((index - self.CENTRE) / self.SCALE)[:, None]], dim=1)


class LocalLabelModel(nn.Module):
    """Per-pixel classifier of :func:`local_features` (1 x 1 convolutions: an MLP per pixel), of the image's
    bands and, with ``ndvi``, of its NDVI as one more band."""

    def __init__(self, bands: int, classes: int, radius: int = RADIUS, hidden: int = HIDDEN,
                 ndvi: NdviBand | None = None) -> None:
        super().__init__()
        self.radius = radius
        self.ndvi = ndvi
        inputs = 3 * (bands + (ndvi is not None))
        self.net = nn.Sequential(nn.Conv2d(inputs, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, classes, 1))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, F, H, W)`` per-pixel inputs of normalised ``(B, bands, H, W)`` images."""
        return local_features(x, self.radius, self.ndvi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.features(x))


class BaggedLabelModel(nn.Module):
    """The mean log-probabilities of several :class:`LocalLabelModel` (each fitted on its own chips)."""

    def __init__(self, members: Sequence[LocalLabelModel]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    @classmethod
    def empty(cls, bands: int, classes: int, count: int, ndvi: NdviBand | None = None) -> BaggedLabelModel:
        """``count`` unfitted members, to load a checkpoint's state into."""
        return cls([LocalLabelModel(bands, classes, ndvi=ndvi) for _ in range(count)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The members differ in their weights only: their features (box means of 12 or 15 channels, most of the
        # cost) are computed once for all that share a radius and an NDVI band, with the same numbers.
        features: dict[tuple[int, int], torch.Tensor] = {}
        log_probs = []
        for member in self.members:
            key = (member.radius, id(member.ndvi))
            if key not in features:
                features[key] = member.features(x)
            log_probs.append(torch.log_softmax(member.net(features[key]).float(), dim=1))
        return torch.stack(log_probs).mean(dim=0)


class LabelModelVote(nn.Module):
    """A network whose maps also hear its run's label model (``--label_model_weight W``).

    Returns the network's ``(vit_logits, cnn_logits)``, each plus ``W`` times the label model's mean
    log-probabilities, so that the map's published ``softmax((vit + cnn) / 2)`` becomes
    ``softmax((vit + cnn) / 2 + W * log p_label_model)``: a product of experts, the network's wide view
    and the classifiers' 11 x 11 one, where what only one of them supports loses weight. Why: whether
    the network takes a rare class up varies from seed to seed, while the classifiers are taught it
    directly (NDVI seeds) but alone also give it to look-alikes (docs/map_quality.md). Mapping only; the
    training loss never sees it.
    """

    def __init__(self, network: nn.Module, label_model: nn.Module, weight: float) -> None:
        super().__init__()
        self.network, self.label_model, self.label_model_weight = network, label_model, float(weight)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vit_logits, cnn_logits = self.network(x)
        vote = self.label_model(x).mul_(self.label_model_weight)
        return vit_logits.float() + vote, cnn_logits.float() + vote


def label_model_from_state(state: dict[str, torch.Tensor], bands: Sequence[str], num_classes: int,
                           mean: Sequence[float], std: Sequence[float], with_ndvi: bool) -> BaggedLabelModel:
    """The :class:`BaggedLabelModel` a checkpoint's ``label_model`` state describes (its member count read from
    the state; with ``with_ndvi``, NDVI from the bands named ``red`` and ``nir``), loaded strictly."""
    members = len({key.split(".")[1] for key in state if key.startswith("members.")})
    ndvi = NdviBand(list(bands).index("red"), list(bands).index("nir"), mean, std) if with_ndvi else None
    model = BaggedLabelModel.empty(len(bands), num_classes, members, ndvi)
    model.load_state_dict(state)
    return model.eval()
